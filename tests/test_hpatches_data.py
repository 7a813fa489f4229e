"""HPatches sequences: the reader on the seeded demo (which must be right for matching to be scored against
it), and one-line faults for each kind of bad input."""

import shutil

import cv2
import numpy as np
import pytest

from pipeline.data import hpatches
from pipeline.data.hpatches import Pair, images_table, keypoint_file, pairs, read_homography, read_keypoints
from pipeline.demo.hpatches import HPatchesDemoSpec, generate
from conftest import one_line_fault, tree_files

SPEC = HPatchesDemoSpec(seed=0, sequences=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("hp") / "hpatches-sequences-release", SPEC)


@pytest.fixture
def copy(demo, tmp_path):
    """A copy of the demo (root and keypoints) a test may damage."""
    shutil.copytree(demo, tmp_path / demo.name)
    shutil.copytree(demo.parent / SPEC.keypoints, tmp_path / SPEC.keypoints)
    return tmp_path / demo.name


def _apply(matrix, points):
    mapped = np.c_[points, np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def test_images_table_has_six_images_per_sequence_at_their_true_size(demo):
    table = images_table(demo)
    assert list(table.columns) == ["image", "path", "category", "width", "height"]
    assert hpatches.sequences(demo) == ["i_demo0", "i_demo1", "v_demo0", "v_demo1"]
    assert len(table) == 24 and (table.groupby("category").size() == 6).all()
    assert table["image"].iloc[:6].tolist() == [f"i_demo0/{k}" for k in range(1, 7)]
    assert table["path"].iloc[0] == "i_demo0/1.ppm"
    for row in table.itertuples():
        height, width = cv2.imread(str(demo / row.path)).shape[:2]
        assert (row.width, row.height) == (width, height)
    first = table[table["image"].str.endswith("/1")]
    assert (first["width"] == SPEC.size[0]).all() and (first["height"] == SPEC.size[1]).all()
    assert table[table["category"].str.startswith("v_")]["width"].nunique() > 1  # other sizes, as in the release


def test_five_pairs_per_sequence_with_kinds(demo):
    found = pairs(demo)
    assert len(found) == 20
    assert [(p.sequence, p.target) for p in found[:5]] == [("i_demo0", k) for k in range(2, 7)]
    assert {p.kind for p in found} == {"i", "v"}
    for pair in found:
        assert pair.homography.shape == (3, 3) and pair.homography.dtype == np.float64
        assert np.allclose(pair.homography, np.eye(3)) == (pair.kind == "i")


def test_keypoints_of_image_one_land_on_image_k_keypoints(demo):
    table = images_table(demo).set_index("image")
    folder = demo.parent / SPEC.keypoints
    checked = 0
    for pair in pairs(demo):
        w1, h1 = table.loc[f"{pair.sequence}/1", ["width", "height"]]
        wk, hk = table.loc[f"{pair.sequence}/{pair.target}", ["width", "height"]]
        first = read_keypoints(keypoint_file(folder, f"{pair.sequence}/1"), w1, h1)
        target = read_keypoints(keypoint_file(folder, f"{pair.sequence}/{pair.target}"), wk, hk)
        mapped = _apply(pair.homography, first)
        inside = (mapped >= 0).all(1) & (mapped[:, 0] <= wk - 1) & (mapped[:, 1] <= hk - 1)
        assert inside.mean() > 0.5, pair  # most of the scene stays in view
        nearest = np.abs(mapped[inside][:, None] - target[None]).max(-1).min(1)
        assert nearest.max() < 1e-3, pair
        assert len(target) > inside.sum()  # unmatched extras too
        checked += inside.sum()
    assert checked > 1000


def _patch(image, matrix, point, offset=(0.0, 0.0), half=10):
    """Image sampled at H(point + d) + offset for d on a (2 half + 1)^2 grid: the patch around `point` seen
    through `matrix`."""
    d = np.mgrid[-half:half + 1, -half:half + 1][::-1].reshape(2, -1).T.astype(np.float64)
    xy = _apply(matrix, point + d) + offset
    maps = xy.reshape(2 * half + 1, 2 * half + 1, 2).astype(np.float32)
    return cv2.remap(image, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR).astype(np.float64)


def _correlation(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-9))  # a flat patch: 0


def test_homography_maps_image_one_pixels_to_image_k_pixels(demo):
    table = images_table(demo).set_index("image")
    folder = demo.parent / SPEC.keypoints
    true, shifted, inverse = [], [], []
    for pair in (p for p in pairs(demo) if p.kind == "v"):
        one = cv2.imread(str(demo / pair.sequence / "1.ppm"), cv2.IMREAD_GRAYSCALE)
        other = cv2.imread(str(demo / pair.sequence / f"{pair.target}.ppm"), cv2.IMREAD_GRAYSCALE)
        size = table.loc[f"{pair.sequence}/1", ["width", "height"]]
        points = read_keypoints(keypoint_file(folder, f"{pair.sequence}/1"), *size)
        mapped = _apply(pair.homography, points)
        height, width = other.shape
        keep = (points >= 15).all(1) & (points <= [one.shape[1] - 16, one.shape[0] - 16]).all(1) & \
               (mapped >= 15).all(1) & (mapped <= [width - 16, height - 16]).all(1)
        for point in points[keep][:25]:
            patch = _patch(one, np.eye(3), point)
            if patch.std() < 8:
                continue  # inside a filled shape: nothing to locate
            true.append(_correlation(patch, _patch(other, pair.homography, point)))
            shifted.append(_correlation(patch, _patch(other, pair.homography, point, offset=(12.0, -9.0))))
            inverse.append(_correlation(patch, _patch(other, np.linalg.inv(pair.homography), point)))
    assert len(true) >= 100
    assert np.median(true) > 0.9
    assert np.median(true) > np.median(shifted) + 0.4
    assert np.median(true) > np.median(inverse) + 0.4  # the other convention would not match


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = tree_files(generate(tmp_path / "a" / "hp", HPatchesDemoSpec(seed=3, sequences=2)).parent)
    b = tree_files(generate(tmp_path / "b" / "hp", HPatchesDemoSpec(seed=3, sequences=2)).parent)
    c = tree_files(generate(tmp_path / "c" / "hp", HPatchesDemoSpec(seed=4, sequences=2)).parent)
    assert a == b
    assert a.keys() == c.keys() and len(a) == 2 * (6 + 5 + 6)
    for name in ("hp/i_demo0/1.ppm", "hp/v_demo0/3.ppm", "hp/v_demo0/H_1_3", "superpoint-1k/v_demo0-4.kp"):
        assert a[name] != c[name], name


def test_excluded_sequences_are_skipped_by_default(copy):
    shutil.copytree(copy / "v_demo0", copy / "v_talent")
    (copy / "README.txt").write_text("not a sequence")
    (copy / "notes").mkdir()
    assert "v_talent" not in hpatches.sequences(copy)
    assert "v_talent" not in set(images_table(copy)["category"])
    assert "v_talent" not in {p.sequence for p in pairs(copy)}
    assert "v_talent" in hpatches.sequences(copy, exclude=())
    assert len(hpatches.sequences(copy, exclude=())) == 5
    assert set(hpatches.D2NET_EXCLUDED) >= {"i_contruction", "v_astronautis", "v_talent"}
    assert len(hpatches.D2NET_EXCLUDED) == 8


def test_missing_root_image_and_homography(copy, tmp_path):
    one_line_fault(lambda: hpatches.sequences(tmp_path / "nowhere"), "nowhere", "no HPatches sequences here")
    (copy / "v_demo1" / "4.ppm").unlink()
    one_line_fault(lambda: images_table(copy), "v_demo1/4.ppm", "missing image")
    (copy / "v_demo0" / "H_1_5").unlink()
    one_line_fault(lambda: pairs(copy), "v_demo0/H_1_5", "missing ground-truth homography")


def test_unreadable_image_is_one_line(copy):
    (copy / "i_demo1" / "2.ppm").write_bytes(b"P6\n320 240\n255\n" + b"\0" * 100)  # truncated
    one_line_fault(lambda: images_table(copy), "i_demo1/2.ppm")


@pytest.mark.parametrize("text, why", [
    ("1 0 0\n0 1 0\n0 0\n", "3 rows of 3"),  # 8 numbers
    ("1 0 0\n0 1 0\n0 0 x\n", "malformed homography"),  # a non-number
    ("1 0 0\n0 1 0\n0 0 nan\n", "not finite"),
    ("1 0 0\n0 1 0\n0 0 0\n", "last element is 0"),
    ("1 2 0\n2 4 0\n0 0 1\n", "singular"),
])
def test_malformed_homography(copy, text, why):
    path = copy / "v_demo0" / "H_1_3"
    path.write_text(text)
    message = one_line_fault(lambda: pairs(copy), "v_demo0/H_1_3", "malformed homography", why)
    assert message == one_line_fault(lambda: read_homography(path))


def test_keypoint_faults(copy, tmp_path):
    folder = copy.parent / SPEC.keypoints
    path = keypoint_file(folder, "v_demo0/1")
    assert path == folder / "v_demo0-1.kp"
    width, height = SPEC.size
    assert read_keypoints(path, width, height).shape == (300, 2)

    path.write_text("1.5 2.5\n")
    single = read_keypoints(path, width, height)
    assert single.shape == (1, 2) and single.dtype == np.float64 and single.tolist() == [[1.5, 2.5]]

    path.write_text("1 2 3\n4 5 6\n")
    one_line_fault(lambda: read_keypoints(path, width, height), "v_demo0-1.kp", "must have 2 columns (x y), found 3")
    path.write_text("1 2\n4 5 6\n")
    one_line_fault(lambda: read_keypoints(path, width, height), "v_demo0-1.kp", "2 columns")
    path.write_text(f"1 2\n{width - 1} 5\n{width - 0.5} 5\n")
    one_line_fault(lambda: read_keypoints(path, width, height), "v_demo0-1.kp",
           f"keypoint 2 at ({width - 0.5:g}, 5) is outside the {width} x {height} (W x H) image")
    path.write_text("3 -0.25\n")
    one_line_fault(lambda: read_keypoints(path, width, height), "keypoint 0 at (3, -0.25) is outside")
    path.write_text("3 4\nnan 4\n")
    one_line_fault(lambda: read_keypoints(path, width, height), "v_demo0-1.kp", "keypoint 1 is not finite")
    one_line_fault(lambda: read_keypoints(tmp_path / "gone-1.kp", width, height), "gone-1.kp", "missing")
    edges = np.array([[0, 0], [width - 1, height - 1]], float)
    np.savetxt(path, edges, fmt="%.4f")
    assert (read_keypoints(path, width, height) == edges).all()  # the pixel centres at the edges are inside


def test_pair_is_frozen():
    pair = Pair("v_x", 2, np.eye(3))
    assert pair.kind == "v"
    with pytest.raises(AttributeError):
        pair.target = 3
