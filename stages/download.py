"""DVC stage `download@<name>`: fetch, verify and unpack one dataset archive, or generate the demo dataset
(params: download.<name>)."""

import sys
from pathlib import Path

from pipeline.demo import davis, hpatches
from pipeline.demo.dataset import DemoSpec, generate
from pipeline.config import load_params
from pipeline.data.download import DATASETS, download
from pipeline.errors import PipelineError
from stages import run


def main(name: str) -> None:
    spec = load_params().download[name]
    root = Path(spec.root)
    if spec.demo is not None and spec.demo.dataset == "hpatches":
        # No keypoint files: they would lie outside the stage's output; the demo's params detect SIFT points.
        hpatches.generate(root, hpatches.HPatchesDemoSpec(seed=spec.demo.seed, sequences=spec.demo.sequences, keypoints=None))
        return
    if spec.demo is not None and spec.demo.dataset == "davis":
        davis.generate(root, davis.DavisDemoSpec(seed=spec.demo.seed, sequences=spec.demo.sequences, frames=spec.demo.frames))
        return
    if spec.demo is not None:
        generate(root, DemoSpec(spec.demo.seed, spec.demo.sources_per_category))
        return
    expected = DATASETS[name].folder if name in DATASETS else root.name
    if root.name != expected:
        raise PipelineError("params.yaml", f"download.{name}.root", f"the archive unpacks to {expected!r}; "
                            f"end the path with it, e.g. {(root.parent / expected).as_posix()}")
    download(name, root.parent, url=spec.url, sha256=spec.sha256)


if __name__ == "__main__":
    run(main, sys.argv[1])
