import json

import numpy as np

from pipeline.demo.dataset import DemoSpec, generate
from pipeline.data.spair import load_split


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(generate(tmp_path / "a", DemoSpec(seed=3)))
    b = _files(generate(tmp_path / "b", DemoSpec(seed=3)))
    c = _files(generate(tmp_path / "c", DemoSpec(seed=4)))
    assert a == b
    assert a.keys() == c.keys()
    assert a["JPEGImages/star/demo_00000.jpg"] != c["JPEGImages/star/demo_00000.jpg"]


def test_spair_layout_read_by_the_same_reader(demo_root):
    for split in ("trn", "val", "test"):
        tables = load_split(demo_root, split)
        assert len(tables.pairs) > 0
    assert (demo_root / "Segmentation" / "star" / "demo_00000.png").is_file()
    listed = (demo_root / "Layout" / "large" / "test.txt").read_text().split()
    assert len(load_split(demo_root, "test", layout="large").pairs) == len(listed)
    assert all(":" in name for name in listed)


def test_sizes_cover_landscape_portrait_square(demo_root):
    images = load_split(demo_root, "test").images
    assert (images["width"] > images["height"]).any()
    assert (images["width"] < images["height"]).any()
    assert (images["width"] == images["height"]).any()


def test_ground_truth_is_the_known_transform(demo_root):
    transforms = json.loads((demo_root / "DemoTransforms.json").read_text())
    pairs = load_split(demo_root, "test").pairs
    kinds = set()
    for _, pair in pairs.iterrows():
        transform = transforms[f"test/{pair['filename']}"]
        kinds.add(transform["kind"])
        if transform["kind"] == "instance":
            assert pair["src_image"] != pair["trg_image"]
            continue
        src = np.array([list(p) for p in pair["src_kps"]], float)
        trg = np.array([list(p) for p in pair["trg_kps"]], float)
        mapped = np.c_[src, np.ones(len(src))] @ np.array(transform["matrix"]).T
        mapped = mapped[:, :2] / mapped[:, 2:]
        # Source keypoints are themselves rounded, so the warp moves that error by up to its scale.
        assert np.abs(mapped - trg).max() <= 1.5, pair["filename"]
        if transform["kind"] == "identity":
            assert pair["src_image"] == pair["trg_image"] and (src == trg).all()
        w, h = pair["trg_width"], pair["trg_height"]
        assert ((trg >= 0) & (trg <= [w - 1, h - 1])).all()
    assert kinds == {"identity", "similarity", "affine", "perspective", "occlusion", "instance"}


def test_occlusion_hides_keypoints(demo_root):
    pairs = load_split(demo_root, "test").pairs
    occluded = pairs[pairs["occlusion"] > 0]
    assert len(occluded) > 0
    for _, pair in occluded.iterrows():
        src_annotation = json.loads((demo_root / "ImageAnnotation" / pair["category"] / pair["src_imname"].replace(".jpg", ".json")).read_text())
        visible_src = sum(v is not None for v in src_annotation["kps"].values())
        assert len(pair["kps_ids"]) < visible_src
