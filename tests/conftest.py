import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "spair-sample"


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
    from pipeline.demo import generate

    return generate(tmp_path_factory.mktemp("demo") / "demo")
