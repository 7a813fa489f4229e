"""DAVIS-2017 (semi-supervised): the reader on the seeded demo, the demo's masks against its known motions
(which must be right for label propagation to be scored against them), DIFT's frame size, and one-line faults
for each kind of bad input."""

import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.cache.encode import canvas_shape
from pipeline.data import davis
from pipeline.data.davis import (annotation_path, frames, images_table, objects, read_labels,
                                 sequences, write_labels)
from pipeline.demo.davis import DavisDemoSpec, generate, motions, names
from conftest import one_line_fault, tree_files

SPEC = DavisDemoSpec()  # 3 sequences of 8 frames, (W, H) = (240, 128)
OBJECTS = {"demo0-duo": 2, "demo1-solo": 1, "demo2-trio": 3}


def voc_palette():
    """The PASCAL VOC colour map as the VOC devkit's VOClabelcolormap.m builds it (and davis2017-evaluation's
    davis2017/utils.py color_map, commit ac7c43f, transcribes it): for each index, its bits three at a time go
    to r, g, b, filling each from bit 7 down."""
    colours = []
    for index in range(256):
        code, rgb = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] += ((code >> channel) & 1) * 2 ** bit
            code //= 8
        colours.append(rgb)
    return np.array(colours, dtype=np.uint8)


def dift_read_frame_size(width, height, scale=480):
    """(W, H) by read_frame of Tsingularity/dift eval_davis.py (commit 9421eb2), float arithmetic and all."""
    if height > width:
        tw = scale
        th = int(((tw * height) / width // 32) * 32)
    else:
        th = scale
        tw = int(((th * width) / height // 32) * 32)
    return tw, th


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("davis") / "DAVIS", SPEC)


@pytest.fixture(scope="module")
def labels(demo):
    """{sequence: (frames, H, W) uint8} read back from the annotations."""
    return {seq: np.stack([read_labels(annotation_path(demo, f"{seq}/{name}")) for name in frames(demo, seq)])
            for seq in sequences(demo)}


@pytest.fixture
def copy(demo, tmp_path):
    """A copy of the demo a test may damage."""
    return shutil.copytree(demo, tmp_path / "DAVIS")


def _carried(labels, transform):
    """For each pixel p of frame k: the frame-0 pixel the motion brings there (nearest), and whether it is in
    frame 0."""
    height, width = labels.shape[1:]
    y, x = np.mgrid[0:height, 0:width]
    back = np.linalg.inv(transform)
    pre = np.stack([back[0, 0] * x + back[0, 1] * y + back[0, 2], back[1, 0] * x + back[1, 1] * y + back[1, 2]])
    nearest = np.floor(pre + 0.5).astype(int)
    inside = (nearest[0] >= 0) & (nearest[0] < width) & (nearest[1] >= 0) & (nearest[1] < height)
    return np.clip(nearest[0], 0, width - 1), np.clip(nearest[1], 0, height - 1), inside, pre


def test_layout_reads_back_in_listed_order_at_its_true_size(demo):
    assert (demo / "ImageSets" / "2017" / "val.txt").read_text() == "demo0-duo\ndemo1-solo\ndemo2-trio\n"
    assert sequences(demo) == names(SPEC) == list(OBJECTS)
    assert frames(demo, "demo1-solo") == [f"{k:05d}" for k in range(8)]
    table = images_table(demo)
    assert list(table.columns[:5]) == ["image", "path", "category", "width", "height"]
    assert len(table) == 24 and (table.groupby("category", sort=False).size() == 8).all()
    assert table["category"].unique().tolist() == list(OBJECTS)
    assert table["image"].iloc[:3].tolist() == ["demo0-duo/00000", "demo0-duo/00001", "demo0-duo/00002"]
    assert table["path"].iloc[9] == "JPEGImages/480p/demo1-solo/00001.jpg"
    assert table["frame"].tolist() == list(range(8)) * 3 and (table["sequence"] == table["category"]).all()
    assert (table["width"] == 240).all() and (table["height"] == 128).all()  # (W, H), not (H, W)
    for row in table.itertuples():
        assert cv2.imread(str(demo / row.path)).shape[:2] == (row.height, row.width)
        assert annotation_path(demo, row.image) == demo / "Annotations" / "480p" / row.category / \
            f"{row.image.split('/')[1]}.png"
    assert "exif" not in Image.open(demo / table["path"].iloc[0]).info
    one_line_fault(lambda: sequences(demo, "train"), "ImageSets/2017/train.txt", "missing sequence list")  # val only


def test_split_file_order_is_kept_and_blank_lines_ignored(copy):
    (copy / "ImageSets" / "2017" / "val.txt").write_text("demo2-trio\n\n  demo0-duo  \n\n")
    assert sequences(copy) == ["demo2-trio", "demo0-duo"]
    assert images_table(copy)["category"].unique().tolist() == ["demo2-trio", "demo0-duo"]


def test_annotations_are_indexed_pngs_with_the_voc_palette(demo, labels):
    palette = voc_palette()
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[255].tolist() == [224, 224, 192]  # VOC's void colour
    assert (davis.PALETTE == palette).all()
    for seq, count in OBJECTS.items():
        for k, name in enumerate(frames(demo, seq)):
            with Image.open(annotation_path(demo, f"{seq}/{name}")) as image:
                assert image.mode == "P"
                assert np.array_equal(np.array(image.getpalette(), np.uint8).reshape(-1, 3), palette)
                assert np.array_equal(np.array(image), labels[seq][k])  # what the official reader sees
        assert labels[seq].dtype == np.uint8 and labels[seq].shape == (8, 128, 240)
        assert objects(labels[seq][0]) == count
        for k in range(8):  # every object is in view in every frame, none beyond
            assert set(np.unique(labels[seq][k])) == set(range(count + 1)), (seq, k)


def test_motions_are_varied_and_moderate():
    found = motions(SPEC)
    assert list(found) == list(OBJECTS)
    assert {seq: len(objs) for seq, objs in found.items()} == OBJECTS
    kinds = {m.kind for objs in found.values() for m in objs}
    assert kinds == {"shift", "turn", "drift"}
    for objs in found.values():
        assert [m.object_id for m in objs] == list(range(1, len(objs) + 1))
        for m in objs:
            assert m.transforms.shape == (8, 3, 3) and np.array_equal(m.transforms[0], np.eye(3))
            assert np.allclose(m.transforms[:, 2], [0, 0, 1])
            steps = np.diff(m.transforms[:, :2, 2], axis=0) if m.kind != "turn" else None
            linear = m.transforms[:, :2, :2]
            if m.kind == "shift":
                assert np.array_equal(linear, np.broadcast_to(np.eye(2), linear.shape))
                assert np.array_equal(steps, np.round(steps)) and 2 <= np.abs(steps).max() <= 3
            elif m.kind == "drift":
                assert np.array_equal(linear, np.broadcast_to(np.eye(2), linear.shape))
                assert not np.array_equal(steps, np.round(steps)) and np.abs(steps).max() <= 2
            else:
                scale = np.sqrt(np.linalg.det(linear[1]))
                angle = np.degrees(np.arctan2(linear[1, 1, 0], linear[1, 0, 0]))
                assert 0.97 < scale < 0.99 or 1.01 < scale < 1.03
                assert 3 <= abs(angle) <= 6


def test_masks_are_the_painted_regions_carried_by_the_known_motions(labels):
    """Frame k's pixel p belongs to object j exactly when the frame-0 pixel the motion brings to p does, where
    no later object (on top) covers either; exact for whole-pixel shifts, up to the edge's rounding else."""
    occluded = 0
    for seq, objs in motions(SPEC).items():
        stack = labels[seq]
        for m in objs:
            j = m.object_id
            for k in range(1, 8):
                x0, y0, inside, _ = _carried(stack, m.transforms[k])
                before = stack[0][y0, x0]
                keep = inside & (before <= j) & (stack[k] <= j)
                was, now = (before == j) & keep, (stack[k] == j) & keep
                occluded += int(((before == j) & inside & (stack[k] > j)).sum())
                assert now.sum() > 100, (seq, j, k)
                if m.kind == "shift":
                    assert np.array_equal(was, now), (seq, j, k)
                    wrong = np.linalg.inv(m.transforms[k])  # the other direction does not match
                    xw, yw, inw, _ = _carried(stack, wrong)
                    assert ((stack[0][yw, xw] == j) & inw & keep != now).sum() > 20, (seq, j, k)
                else:
                    assert (was != now).sum() <= 0.1 * (was | now).sum(), (seq, j, k, (was != now).sum())
    assert occluded > 0  # a later object passes over an earlier one somewhere


def test_frames_show_the_object_textures_moved_and_the_background_still(demo, labels):
    """Inside an object (away from its edge) frame k shows frame 0's texture carried by the motion (bilinear,
    so sub-pixel and turning motions too), not what frame 0 had in that place; the background stays put."""
    kernel = np.ones((7, 7), np.uint8)
    for seq, objs in motions(SPEC).items():
        stack = labels[seq]
        images = [cv2.imread(str(demo / "JPEGImages/480p" / seq / f"{name}.jpg")).astype(np.float32)
                  for name in frames(demo, seq)]
        cores = [[cv2.erode((ids == j).astype(np.uint8), kernel).astype(bool) for ids in stack]
                 for j in range(len(objs) + 1)]
        for m in objs:
            true, still = [], []
            for k in range(3, 8):  # a few pixels of travel and more
                x0, y0, inside, pre = _carried(stack, m.transforms[k])
                both = cores[m.object_id][k] & inside & cores[m.object_id][0][y0, x0]
                moved = cv2.remap(images[0], *pre.astype(np.float32), cv2.INTER_LINEAR)
                true += list(np.abs(images[k] - moved).mean(-1)[both])
                still += list(np.abs(images[k] - images[0]).mean(-1)[both])
            assert len(true) > 100, (seq, m.object_id)
            assert np.median(true) < 6, (seq, m.object_id, np.median(true))
            assert np.median(still) > np.median(true) + 8, (seq, m.object_id, np.median(still))  # it did move
        background = cores[0][0] & cores[0][7]
        assert np.median(np.abs(images[7] - images[0]).mean(-1)[background]) < 2


def test_mask_edges_are_the_painted_edges(demo, labels):
    """At a whole-pixel `shift`, over background that frame 0 showed: the 1-pixel inner rim of frame k's mask
    shows the object's texture moved there, the 1-pixel outer rim the still background. A mask one pixel
    wider or narrower than the painting fails one side."""
    inner, outer = [], []
    ring = np.ones((3, 3), np.uint8)
    for seq, objs in motions(SPEC).items():
        stack = labels[seq]
        images = [cv2.imread(str(demo / "JPEGImages/480p" / seq / f"{name}.jpg")).astype(np.float32)
                  for name in frames(demo, seq)]
        for m in (m for m in objs if m.kind == "shift"):
            for k in range(1, 8):
                x0, y0, inside, _ = _carried(stack, m.transforms[k])
                mask = (stack[k] == m.object_id).astype(np.uint8)
                rim_in = mask.astype(bool) & ~cv2.erode(mask, ring).astype(bool)
                rim_out = cv2.dilate(mask, ring).astype(bool) & ~mask.astype(bool) & (stack[k] == 0)
                moved = np.abs(images[k] - images[0][y0, x0]).mean(-1)
                still = np.abs(images[k] - images[0]).mean(-1)
                telling = inside & (stack[0] == 0) & (np.abs(images[0] - images[0][y0, x0]).mean(-1) > 12)
                inner += list((moved < still)[rim_in & telling & (stack[0][y0, x0] == m.object_id)])
                outer += list((still < moved)[rim_out & telling])
    assert len(inner) > 1000 and len(outer) > 1000
    assert np.mean(inner) > 0.95 and np.mean(outer) > 0.95, (np.mean(inner), np.mean(outer))


def test_same_seed_same_bytes_rerun_in_place_and_other_seed_differs(tmp_path):
    spec = DavisDemoSpec(seed=5, sequences=2, frames=3)
    a = tree_files(generate(tmp_path / "a" / "DAVIS", spec))
    b = tree_files(generate(tmp_path / "b" / "DAVIS", spec))
    assert a == b
    assert len(a) == 1 + 2 * 3 * 2
    assert tree_files(generate(tmp_path / "a" / "DAVIS", spec)) == a  # rerun in place: the same bytes
    c = tree_files(generate(tmp_path / "c" / "DAVIS", DavisDemoSpec(seed=6, sequences=2, frames=3)))
    assert a.keys() == c.keys()
    for name in ("JPEGImages/480p/demo0-duo/00002.jpg", "Annotations/480p/demo1-solo/00000.png"):
        assert a[name] != c[name], name
    shorter = DavisDemoSpec(seed=5, sequences=2, frames=2)  # over the longer run: its third frames go
    assert tree_files(generate(tmp_path / "a" / "DAVIS", shorter)) == tree_files(generate(tmp_path / "d" / "DAVIS", shorter))
    assert len(tree_files(tmp_path / "a" / "DAVIS")) == 1 + 2 * 2 * 2


@pytest.mark.parametrize("size, expected", [
    ((854, 480), (832, 480)),  # DAVIS 480p
    ((480, 854), (480, 832)),  # portrait
    ((500, 333), (704, 480)),  # 480 * 500 / 333 = 720.7 -> 704
    ((333, 500), (480, 704)),
    ((480, 480), (480, 480)),
    ((1920, 1080), (832, 480)),  # 853.3 -> 832
    ((240, 128), (896, 480)),  # the demo: 900 -> 896
])
def test_canvas_shape_is_difts_read_frame_rule(size, expected):
    """The canvas the stores of DAVIS frames use (pipeline/cache/encode.py, `short-side`) is DIFT's frame size."""
    assert canvas_shape(*size, 480, "short-side") == expected == dift_read_frame_size(*size)


def test_canvas_shape_agrees_with_dift_over_a_sweep_of_sizes():
    assert canvas_shape(854, 480, 240, "short-side") == (416, 240) == dift_read_frame_size(854, 480, 240)  # 427 -> 416
    for w in range(100, 2000, 37):
        for h in (97, 333, 480, 1080):
            assert canvas_shape(w, h, 480, "short-side") == dift_read_frame_size(w, h), (w, h)


def test_labels_round_trip_and_objects(tmp_path):
    ids = np.zeros((5, 7), np.uint8)
    ids[1, 2], ids[3, 4], ids[4, 6] = 2, 1, 255
    path = write_labels(tmp_path / "a" / "00000.png", ids)
    assert np.array_equal(read_labels(path), ids) and read_labels(path).dtype == np.uint8
    assert path.read_bytes() == write_labels(tmp_path / "b.png", ids.astype(np.int64)).read_bytes()
    assert objects(ids) == 2 and objects(np.zeros((2, 2), np.uint8)) == 0
    assert objects(np.full((2, 2), 255, np.uint8)) == 0  # void only
    one_line_fault(lambda: write_labels(tmp_path / "c.png", np.full((2, 2), 256)), "c.png", "0..255")
    one_line_fault(lambda: write_labels(tmp_path / "d.png", np.zeros((2, 2, 3), np.uint8)), "d.png", "(H, W)")
    one_line_fault(lambda: annotation_path(tmp_path, "no-slash"), "no-slash", "<seq>/<frame>")


def test_missing_or_empty_split_file(copy, tmp_path):
    listing = copy / "ImageSets" / "2017" / "val.txt"
    one_line_fault(lambda: sequences(tmp_path / "nowhere"), "nowhere/ImageSets/2017/val.txt", "no DAVIS here")
    listing.write_text("\n  \n")
    one_line_fault(lambda: sequences(copy), "ImageSets/2017/val.txt", "empty sequence list")
    listing.write_text("demo0-duo\ndemo0-duo\n")
    one_line_fault(lambda: sequences(copy), "ImageSets/2017/val.txt", "'demo0-duo'", "more than once")
    listing.unlink()
    one_line_fault(lambda: images_table(copy), "ImageSets/2017/val.txt", "missing sequence list")


def test_sequence_without_frames_or_first_annotation(copy):
    for jpg in (copy / "JPEGImages" / "480p" / "demo1-solo").glob("*.jpg"):
        jpg.unlink()
    one_line_fault(lambda: sequences(copy), "JPEGImages/480p/demo1-solo", "'demo1-solo'", "no frames")
    shutil.rmtree(copy / "JPEGImages" / "480p" / "demo1-solo")
    one_line_fault(lambda: images_table(copy), "JPEGImages/480p/demo1-solo", "'demo1-solo'", "no frame folder")
    (copy / "ImageSets" / "2017" / "val.txt").write_text("demo0-duo\n")
    assert sequences(copy) == ["demo0-duo"]
    (copy / "Annotations" / "480p" / "demo0-duo" / "00000.png").unlink()
    one_line_fault(lambda: sequences(copy), "Annotations/480p/demo0-duo/00000.png", "'demo0-duo'", "first frame")


def test_non_indexed_annotation_is_refused(copy):
    path = copy / "Annotations" / "480p" / "demo2-trio" / "00003.png"
    Image.fromarray(davis.PALETTE[read_labels(path)]).save(path)  # the colours, as RGB
    one_line_fault(lambda: read_labels(path), "demo2-trio/00003.png", "not an indexed", "RGB")
    path.write_bytes(path.read_bytes()[:60])
    one_line_fault(lambda: read_labels(path), "demo2-trio/00003.png", "unreadable annotation")
    one_line_fault(lambda: read_labels(path.with_name("09999.png")), "09999.png", "missing annotation")


def test_truncated_or_odd_sized_frames_and_annotations(copy):
    frame = copy / "JPEGImages" / "480p" / "demo0-duo" / "00004.jpg"
    original = frame.read_bytes()
    frame.write_bytes(original[:300])
    one_line_fault(lambda: images_table(copy), "demo0-duo/00004.jpg", "unreadable image")
    Image.fromarray(np.zeros((64, 120, 3), np.uint8)).save(frame)
    one_line_fault(lambda: images_table(copy), "demo0-duo/00004.jpg", "120 x 64 (W x H)", "240 x 128 (W x H)")
    frame.write_bytes(original)
    write_labels(copy / "Annotations" / "480p" / "demo1-solo" / "00000.png", np.zeros((128, 128), np.uint8))
    one_line_fault(lambda: images_table(copy), "demo1-solo/00000.png", "annotation is 128 x 128 (W x H)", "240 x 128 (W x H)")
