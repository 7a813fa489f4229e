import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "spair-sample"

from pipeline.matching.maps import Variant  # noqa: E402  (after the thread count above)


def identity_pairs_scored_exactly(path, predictions) -> bool:
    """On identity pairs `dift` finds each keypoint itself; `geoaware` the centre of its cell, so within half a
    cell's diagonal (in image pixels) of it."""
    from pipeline.matching.maps import StoreMaps

    maps = StoreMaps(path)
    image = maps.images.loc[predictions["trg_image"]]
    stride = predictions["layer"].map(lambda layer: maps.root[layer].attrs["stride"]).to_numpy()
    half = 0.5 * np.hypot(stride * image["width"].to_numpy() / (image["valid_x1"] - image["valid_x0"]).to_numpy(),
                          stride * image["height"].to_numpy() / (image["valid_y1"] - image["valid_y0"]).to_numpy())
    limit = np.where(predictions["protocol"] == "geoaware", half + 1e-9, 0.0)
    return bool((predictions["distance"].to_numpy() <= limit).all())


def demo_project(demo_stores, folder: Path) -> Path:
    """`folder` as a project over the demo split: its pairs and images tables, and a params.yaml naming them."""
    import yaml

    demo_stores["pairs"].to_parquet(folder / "pairs.parquet")
    demo_stores["images"].to_parquet(folder / "images.parquet")
    params = {"data": {"root": str(demo_stores["root"]), "pairs": "pairs.parquet", "images": "images.parquet"}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


PROJECT_FILES = ["pipeline", "stages", "cli.py", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots", ".dvcignore",
                 ".gitignore"]


def copy_project(root: Path) -> Path:
    """The project's code, dvc.yaml and params.yaml (no outputs) copied into a new folder `root`."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    return root


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store except per-image timings, which measure the machine, not the features."""
    timing = ("images/seconds", "images/peak_memory")
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(Path(path).rglob("*"))
            if p.is_file() and not p.relative_to(path).as_posix().startswith(timing)}


def tree_files(base: Path) -> dict[str, bytes]:
    """Every file under `base`, by relative path: what a generated dataset wrote, byte for byte."""
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(Path(base).rglob("*")) if p.is_file()}


def one_line_fault(call, *names) -> str:
    """`call` raises a PipelineError of one line naming each of `names`; its text."""
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    for name in names:
        assert name in text, text
    return text


def differing_files(found: dict[str, bytes], expected: dict[str, bytes]) -> list[str]:
    """The keys two `store_files` disagree on, each with how (a failed comparison then names the files, not
    the whole stores' bytes)."""
    return sorted([f"{key}: only in the first" for key in found.keys() - expected.keys()]
                  + [f"{key}: only in the second" for key in expected.keys() - found.keys()]
                  + [f"{key}: {len(found[key])} vs {len(expected[key])} bytes" for key in found.keys() & expected.keys()
                     if found[key] != expected[key]])


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory) -> Path:
    """Model files' digests (pipeline/cache/provenance.py) cached in the session's temporary folder, not the
    user's ~/.cache; stages run in subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("dift-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFT_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def spair_sample(tmp_path) -> Path:
    """A copy of the real SPair annotation sample with placeholder JPEGs of the annotated sizes."""
    if not SHARED_SAMPLE.is_dir():
        pytest.skip("../shared/spair-sample is absent")
    from PIL import Image

    root = tmp_path / "spair"
    shutil.copytree(SHARED_SAMPLE, root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for annotation in (root / "ImageAnnotation").glob("*/*.json"):
        record = json.loads(annotation.read_text())
        folder = root / "JPEGImages" / record["category"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (record["image_width"], record["image_height"])).save(folder / record["filename"])
    return root


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from pipeline.demo.dataset import generate

    return generate(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from pipeline.demo.tiny_models import make_tiny

    base = tmp_path_factory.mktemp("models")
    return {name: str(make_tiny(name, base / name)) for name in ("tiny-sd2", "tiny-sd3")}


@pytest.fixture(scope="session")
def demo_stores(tmp_path_factory, demo_root, tiny_models):
    """The demo's test split with small stores of every backbone kind (128-px canvas)."""
    from pipeline.config import BackboneParams, EncoderParams
    from pipeline.cache.encode import encode
    from pipeline.cache.extract import extract
    from pipeline.data.spair import load_split

    base = tmp_path_factory.mktemp("stores")
    split = load_split(demo_root, "test")
    latents = {name: encode(EncoderParams(model=model, canvas=128), split.images, demo_root, base / f"latents-{name}.zarr")
               for name, model in tiny_models.items()}
    backbones = {
        "tiny-sd2": ("sd2", "tiny-sd2", ["up_blocks.1", "up_blocks.2"]),
        "tiny-sd3": ("sd3", "tiny-sd3", ["transformer_blocks.1", "transformer_blocks.3"]),
        "vae-sd2": ("vae-sd2", "tiny-sd2", ["latent"]),
        "vae-sd3": ("vae-sd3", "tiny-sd3", ["latent"]),
    }
    stores = {}
    for name, (kind, model, layers) in backbones.items():
        params = BackboneParams(kind=kind, model=tiny_models[model], latents=model, layers=layers, timesteps=[261],
                                ensemble=1, noise=not kind.startswith("vae"))
        stores[name] = extract(params, name, latents[model], base / f"{name}.zarr")
    return {"pairs": split.pairs, "images": split.images, "stores": stores, "root": demo_root, "latents": latents,
            "models": tiny_models}


# The explorer's tests: variants of the demo stores (`explored`), two of sd3 and one of sd2.
EXPLORED_SD3 = [Variant("tiny-sd3", "transformer_blocks.3", 261, "raw"),
                Variant("tiny-sd3", "transformer_blocks.1", 261, "drop:auto+adaln")]
EXPLORED_SD2 = Variant("tiny-sd2", "up_blocks.1", 261, "raw")


@pytest.fixture(scope="session")
def explored(demo_stores, tmp_path_factory):
    """An explorer over the demo stores, with predictions tables of two of them for the comparisons."""
    from pipeline.explorer.explorer import Explorer
    from pipeline.matching.match import match_store

    folder = tmp_path_factory.mktemp("predictions")
    pairs = demo_stores["pairs"]
    predictions = {}
    for name, specs in (("tiny-sd2", ["raw"]), ("tiny-sd3", ["raw", "drop:auto+adaln"])):
        table = match_store(demo_stores["stores"][name], pairs, transform_specs=specs)
        predictions[name] = folder / f"{name}.parquet"
        table.to_parquet(predictions[name])
    best = {"tiny-sd2": {"layer": "up_blocks.1", "timestep": 261, "transform": "raw"},
            "tiny-sd3": {"layer": "transformer_blocks.3", "timestep": 261, "transform": "raw"}}
    explorer = Explorer(list(demo_stores["stores"].values()), pairs, demo_stores["images"], demo_stores["root"],
                        transforms={"tiny-sd3": ["raw", "drop:auto+adaln"]}, predictions=predictions, best=best)
    return explorer, {name: pd.read_parquet(path) for name, path in predictions.items()}


def cross_pair(pairs: pd.DataFrame, index: int = 4) -> pd.Series:
    return pairs[pairs["src_image"] != pairs["trg_image"]].iloc[index]
