"""DVC stage `demo-model@<name>`: build the demo's tiny random model into models/<name> (params:
demo.models.<name>, its seed). Kept apart from `model@`, so no real stage depends on the fixtures."""

import shutil
import sys
from pathlib import Path

from pipeline.config import PARAMS_FILE, load_params
from pipeline.demo import tiny_models
from pipeline.errors import PipelineError
from stages import run


def main(name: str) -> None:
    seed = load_params().demo.models[name]
    if name not in tiny_models.TINY_BUILDERS:
        raise PipelineError(PARAMS_FILE, f"demo.models.{name}",
                            f"no such tiny model; expected one of {sorted(tiny_models.TINY_BUILDERS)}")
    out = Path("models") / name
    if out.exists():  # this stage's own output, left by an earlier run
        shutil.rmtree(out)
    tiny_models.make_tiny(name, out, seed)


if __name__ == "__main__":
    run(main, sys.argv[1])
