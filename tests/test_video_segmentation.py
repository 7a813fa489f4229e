"""DAVIS-2017 semi-supervised scoring (pipeline.evaluation.video_segmentation) against a transcription of the
official code (davisvideochallenge/davis2017-evaluation @ ac7c43f), hand-computed values and synthetic videos."""

import math
import warnings
import weakref

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.video_segmentation import (COLUMNS, _boundary_map, _disk, boundary_measure,
                                                    region_similarity, score_video, statistics, summary)


# ---- The official code, transcribed (not imported): davisvideochallenge/davis2017-evaluation @ ac7c43f ----
# Same operations, same order. The one substitution: skimage.morphology.disk (scikit-image is not installed)
# by its definition with the default strict_radius=True, in numpy (`official_disk`).

def official_disk(radius):
    """skimage.morphology.disk(radius): L = arange(-r, r + 1); X, Y = meshgrid(L, L); X**2 + Y**2 <= r**2."""
    L = np.arange(-radius, radius + 1)
    X, Y = np.meshgrid(L, L)
    return np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=np.uint8)


def official_db_eval_iou(annotation, segmentation, void_pixels=None):
    """davis2017/metrics.py, db_eval_iou."""
    assert annotation.shape == segmentation.shape
    annotation = annotation.astype(bool)
    segmentation = segmentation.astype(bool)
    if void_pixels is not None:
        void_pixels = void_pixels.astype(bool)
    else:
        void_pixels = np.zeros_like(segmentation)
    inters = np.sum((segmentation & annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    union = np.sum((segmentation | annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inters / union
    if j.ndim == 0:
        j = 1 if np.isclose(union, 0) else j
    else:
        j[np.isclose(union, 0)] = 1
    return j


def official_db_eval_boundary(annotation, segmentation, void_pixels=None, bound_th=0.008):
    """davis2017/metrics.py, db_eval_boundary."""
    assert annotation.shape == segmentation.shape
    if annotation.ndim == 3:
        n_frames = annotation.shape[0]
        f_res = np.zeros(n_frames)
        for frame_id in range(n_frames):
            void_pixels_frame = None if void_pixels is None else void_pixels[frame_id, :, :, ]
            f_res[frame_id] = official_f_measure(segmentation[frame_id, :, :, ], annotation[frame_id, :, :],
                                                 void_pixels_frame, bound_th=bound_th)
    elif annotation.ndim == 2:
        f_res = official_f_measure(segmentation, annotation, void_pixels, bound_th=bound_th)
    else:
        raise ValueError
    return f_res


def official_f_measure(foreground_mask, gt_mask, void_pixels=None, bound_th=0.008):
    """davis2017/metrics.py, f_measure (foreground_mask is the prediction)."""
    assert np.atleast_3d(foreground_mask).shape[2] == 1
    if void_pixels is not None:
        void_pixels = void_pixels.astype(bool)
    else:
        void_pixels = np.zeros_like(foreground_mask).astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary = official_seg2bmap(foreground_mask * np.logical_not(void_pixels))
    gt_boundary = official_seg2bmap(gt_mask * np.logical_not(void_pixels))
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), official_disk(bound_pix).astype(np.uint8))
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), official_disk(bound_pix).astype(np.uint8))
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg = np.sum(fg_boundary)
    n_gt = np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision = 1
        recall = 0
    elif n_fg > 0 and n_gt == 0:
        precision = 0
        recall = 1
    elif n_fg == 0 and n_gt == 0:
        precision = 1
        recall = 1
    else:
        precision = np.sum(fg_match) / float(n_fg)
        recall = np.sum(gt_match) / float(n_gt)
    if precision + recall == 0:
        F = 0
    else:
        F = 2 * precision * recall / (precision + recall)
    return F


def official_seg2bmap(seg):
    """davis2017/metrics.py, _seg2bmap with width = height = None (the only use)."""
    seg = seg.astype(bool)
    seg[seg > 0] = 1
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def official_db_statistics(per_frame_values):
    """davis2017/utils.py, db_statistics."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        M = np.nanmean(per_frame_values)
        O = np.nanmean(per_frame_values > 0.5)  # noqa: E741  (the official's name)
    N_bins = 4
    ids = np.round(np.linspace(1, len(per_frame_values), N_bins + 1) + 1e-10) - 1
    ids = ids.astype(np.uint8)
    D_bins = [per_frame_values[ids[i]:ids[i + 1] + 1] for i in range(0, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        D = np.nanmean(D_bins[0]) - np.nanmean(D_bins[3])
    return M, O, D


def official_semisupervised(gt_frames, res_frames):
    """davis2017/davis.py get_all_masks(seq, True), the semi-supervised slice in evaluation.py evaluate(),
    results.py read_masks on the scored ids, evaluation.py _evaluate_semisupervised(..., None, metric) and the
    per-object db_statistics: {object: (JM, JR, JD, FM, FR, FD)}."""
    masks = np.array(gt_frames)
    masks_void = np.zeros_like(masks)
    for i in range(masks.shape[0]):
        masks_void[i, ...] = masks[i, ...] == 255
        masks[i, masks[i, ...] == 255] = 0
    num_objects = int(np.max(masks[0, ...]))
    tmp = np.ones((num_objects, *masks.shape))
    tmp = tmp * np.arange(1, num_objects + 1)[:, None, None, None]
    all_gt_masks = (tmp == masks[None, ...]) > 0
    all_gt_masks = all_gt_masks[:, 1:-1, :, :]

    res = np.array(res_frames)[1:-1]  # read_masks(seq, masks_id[1:-1])
    masks = np.zeros((len(res), *res[0].shape))
    for ii in range(len(res)):
        masks[ii, ...] = res[ii]
    num_objects = int(np.max(masks))
    tmp = np.ones((num_objects, *masks.shape))
    tmp = tmp * np.arange(1, num_objects + 1)[:, None, None, None]
    all_res_masks = (tmp == masks[None, ...]) > 0

    if all_res_masks.shape[0] > all_gt_masks.shape[0]:
        raise SystemExit("In your PNG files there is an index higher than the number of objects in the sequence!")
    elif all_res_masks.shape[0] < all_gt_masks.shape[0]:
        zero_padding = np.zeros((all_gt_masks.shape[0] - all_res_masks.shape[0], *all_res_masks.shape[1:]))
        all_res_masks = np.concatenate([all_res_masks, zero_padding], axis=0)
    j_metrics_res, f_metrics_res = np.zeros(all_gt_masks.shape[:2]), np.zeros(all_gt_masks.shape[:2])
    for ii in range(all_gt_masks.shape[0]):
        j_metrics_res[ii, :] = official_db_eval_iou(all_gt_masks[ii, ...], all_res_masks[ii, ...], None)
        f_metrics_res[ii, :] = official_db_eval_boundary(all_gt_masks[ii, ...], all_res_masks[ii, ...], None)
    return {ii + 1: (*official_db_statistics(j_metrics_res[ii]), *official_db_statistics(f_metrics_res[ii]))
            for ii in range(all_gt_masks.shape[0])}


# ---- helpers ----

def square(shape, top, left, size=10):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def blob_video(rng, shape, n_objects, n_frames):
    """Truth and prediction label maps of a video of moving ellipses (some touching the image's edges), with
    void, a late object above the first frame's count in the truth, and a prediction that drifts, loses
    objects and swaps labels."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    centres = rng.uniform([0, 0], [h, w], size=(n_objects, 2))
    velocity = rng.uniform(-3, 3, size=(n_objects, 2))
    radii = rng.uniform(4, min(h, w) / 3, size=(n_objects, 2))
    truth, predicted = [], []
    for t in range(n_frames):
        label = np.zeros(shape, np.uint8)
        guess = np.zeros(shape, np.uint8)
        for k in range(n_objects):
            cy, cx = centres[k] + t * velocity[k]
            label[((yy - cy) / radii[k, 0]) ** 2 + ((xx - cx) / radii[k, 1]) ** 2 <= 1] = k + 1
            dy, dx = rng.normal(0, 2, 2)
            inside = ((yy - cy - dy) / radii[k, 0] / rng.uniform(0.8, 1.2)) ** 2 + \
                     ((xx - cx - dx) / radii[k, 1] / rng.uniform(0.8, 1.2)) ** 2 <= 1
            if rng.random() > 0.15:  # sometimes the prediction loses the object
                guess[inside] = k + 1 if rng.random() > 0.1 else rng.integers(1, n_objects + 1)
        if t == 0:
            label[label == 0] = 0
        else:
            label[rng.random(shape) < 0.02] = 255  # void specks
            if t >= 2:
                label[:4, :4] = n_objects + 1  # an object absent from frame 0: never scored
        guess[rng.random(shape) < 0.01] = rng.integers(0, n_objects + 1)  # noise
        truth.append(label)
        predicted.append(guess)
    assert truth[0].max() == n_objects, "every object must be in the first frame"
    return truth, predicted


def assert_matches_official(ours: pd.DataFrame, official: dict):
    assert list(ours.columns) == COLUMNS
    assert list(ours["object"]) == list(official)
    for row in ours.itertuples(index=False):
        expected = official[row.object]
        got = (row.J_mean, row.J_recall, row.J_decay, row.F_mean, row.F_recall, row.F_decay)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


# ---- the disk and the boundary map ----

def test_disk_is_skimages_disk():
    # skimage.morphology.disk(1), disk(2), disk(3) as its documentation prints them.
    assert (_disk(1.0) == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]).all()
    assert (_disk(2.0) == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]).all()
    assert (_disk(3.0) == [[0, 0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0], [1] * 7,
                           [0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0]]).all()
    assert _disk(2.0).dtype == np.uint8
    for radius in (1.0, 2.0, 5.0, 8.0, 2.5):
        assert (_disk(radius) == official_disk(radius)).all()


def test_boundary_map_of_a_rectangle_is_the_ring_offset_towards_the_origin():
    # A rectangle on rows 3..6, cols 5..11 (4 x 7): _seg2bmap marks the ring of the box rows 2..6, cols 4..11,
    # i.e. 2 x 4 + 2 x 7 = 22 pixels.
    mask = np.zeros((12, 17), bool)
    mask[3:7, 5:12] = True
    ring = np.zeros_like(mask)
    ring[2:7, 4:12] = True
    ring[3:6, 5:11] = False
    assert (_boundary_map(mask) == ring).all()
    assert ring.sum() == 22
    # The bottom and right edges of the image are not boundary; the top and left are (offset half a pixel).
    full = np.ones((5, 8), bool)
    assert not _boundary_map(full).any()
    rng = np.random.default_rng(3)
    stack = rng.random((4, 23, 31)) < 0.4
    assert (_boundary_map(stack) == np.stack([official_seg2bmap(m) for m in stack])).all()


# ---- J and F by hand ----

def test_offset_squares_by_hand():
    # 10 x 10 squares offset by 3 rows: intersection 7 x 10 = 70, union 200 - 70 = 130.
    truth, predicted = square((40, 40), 10, 10), square((40, 40), 13, 10)
    assert region_similarity(truth, predicted) == pytest.approx(70 / 130, abs=1e-15)
    assert region_similarity(predicted, truth) == pytest.approx(70 / 130, abs=1e-15)


def test_identical_and_empty_masks():
    mask = square((37, 91), 5, 40)
    empty = np.zeros((37, 91), bool)
    assert region_similarity(mask, mask) == 1 and boundary_measure(mask, mask) == 1
    # Both empty: union 0 -> J 1; no boundary on either side -> precision = recall = 1 -> F 1.
    assert region_similarity(empty, empty) == 1 and boundary_measure(empty, empty) == 1
    # Nothing predicted: J 0; precision 1, recall 0 -> F 0. And the reverse.
    assert region_similarity(mask, empty) == 0 and boundary_measure(mask, empty) == 0
    assert region_similarity(empty, mask) == 0 and boundary_measure(empty, mask) == 0


def test_boundary_within_and_beyond_bound_pix():
    # 100 x 200: diagonal 223.6, 0.008 x 223.6 = 1.79 -> bound_pix 2. Each square's boundary is the ring of
    # an 11 x 11 box (40 pixels). Shifted by 2 columns, every ring pixel lies 2 from its copy: F = 1, while
    # J = 8 x 10 / (200 - 80) = 2/3.
    shape = (100, 200)
    truth = square(shape, 40, 50)
    assert boundary_measure(truth, square(shape, 40, 52)) == 1
    assert region_similarity(truth, square(shape, 40, 52)) == pytest.approx(2 / 3, abs=1e-15)
    # Shifted by 3: of the prediction's 40 ring pixels, the top and bottom rows match 10 of 11 each (the last
    # is 3 from the truth's corner), the left column 4 of its 9 inner pixels (those within 2 rows of the
    # truth's top or bottom row), the right column none: precision 24/40; recall the same by symmetry.
    # F = 0.6, J = 70/130.
    assert boundary_measure(truth, square(shape, 40, 53)) == pytest.approx(0.6, abs=1e-15)
    assert region_similarity(truth, square(shape, 40, 53)) == pytest.approx(7 / 13, abs=1e-15)
    # The same shift downwards (rows) gives the same by symmetry.
    assert boundary_measure(truth, square(shape, 43, 50)) == pytest.approx(0.6, abs=1e-15)


def test_bound_pix_uses_the_diagonal_of_a_non_square_image():
    # 37 x 91: diagonal 98.2, 0.008 x 98.2 = 0.79 -> bound_pix 1 (the plus-shaped disk). Shift 1: F = 1,
    # J = 90/110. Shift 2 (columns): top and bottom rows match 10 of 11, left column 2 of 9 (its pixels next
    # to the truth's top and bottom rows), right column 0: precision = recall = 22/40 -> F 0.55; J = 80/120.
    shape = (37, 91)
    truth = square(shape, 12, 60)
    assert boundary_measure(truth, square(shape, 12, 61)) == 1
    assert region_similarity(truth, square(shape, 12, 61)) == pytest.approx(9 / 11, abs=1e-15)
    assert boundary_measure(truth, square(shape, 12, 62)) == pytest.approx(0.55, abs=1e-15)
    assert boundary_measure(truth, square(shape, 14, 60)) == pytest.approx(0.55, abs=1e-15)
    assert region_similarity(truth, square(shape, 12, 62)) == pytest.approx(2 / 3, abs=1e-15)
    # The same masks in a 91 x 237 image (diagonal 253.9 -> bound_pix 3): shift 2 is now F = 1.
    big = (91, 237)
    assert boundary_measure(square(big, 12, 60), square(big, 12, 62)) == 1
    # bound_th >= 1 is a number of pixels, as officially.
    assert boundary_measure(truth, square(shape, 12, 62), bound_th=2) == 1
    # Transposed inputs do not pass for the same image.
    with pytest.raises(PipelineError, match="same"):
        region_similarity(truth, truth.T)


def test_single_frame_measures_equal_the_transcription():
    rng = np.random.default_rng(0)
    for shape in [(37, 91), (64, 48), (120, 90)]:
        for _ in range(5):
            truth = cv2.dilate((rng.random(shape) < 0.01).astype(np.uint8), np.ones((7, 9), np.uint8)) > 0
            predicted = cv2.dilate((rng.random(shape) < 0.01).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            predicted |= np.roll(truth, rng.integers(-3, 4, 2), axis=(0, 1))
            assert region_similarity(truth, predicted) == pytest.approx(float(official_db_eval_iou(truth, predicted)),
                                                                        abs=1e-12)
            assert boundary_measure(truth, predicted) == pytest.approx(official_f_measure(predicted, truth), abs=1e-12)


# ---- statistics ----

def test_statistics_by_hand():
    # 3 frames: ids = round([1, 1.5, 2, 2.5, 3] + 1e-10) - 1 = [0, 1, 1, 2, 2] (halves round up): the first
    # bin is frames 0..1, the last frame 2. [1, .5, 0]: mean .5, recall 1/3 (.5 is not above .5), decay
    # (1 + .5)/2 - 0 = .75 (round-half-to-even would have given .5).
    mean, recall, decay = statistics(np.array([1.0, 0.5, 0.0]))
    assert (mean, recall, decay) == pytest.approx((0.5, 1 / 3, 0.75), abs=1e-15)
    # 4 frames: ids [0, 1, 2, 2, 3]: decay = mean(frames 0, 1) - mean(frames 2, 3) = 1.
    assert statistics(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx((0.5, 0.5, 1.0), abs=1e-15)
    # One frame: every bin is that frame, decay 0. No frame: all NaN (nanmean of nothing).
    assert statistics(np.array([0.7])) == pytest.approx((0.7, 1.0, 0.0), abs=1e-15)
    assert all(math.isnan(v) for v in statistics(np.array([])))


def test_statistics_equal_the_transcription():
    rng = np.random.default_rng(1)
    for n in [1, 2, 3, 5, 6, 7, 9, 10, 13, 42, 97, 104, 254, 255]:
        values = rng.random(n)
        values[rng.random(n) < 0.1] = np.nan
        np.testing.assert_allclose(statistics(values), official_db_statistics(values), rtol=0, atol=1e-12)


def test_statistics_past_255_frames_keep_the_intended_bins():
    # The official's uint8 bin edges wrap past 255 frames (numpy 2 also wraps ids[4] + 1 = 256 to 0, emptying
    # the last bin: decay NaN). Ours stay unwrapped. 300 frames: ids = round([1, 75.75, 150.5, 225.25, 300]) - 1
    # = [0, 75, 150, 224, 299]: the first bin is frames 0..75, the last 224..299.
    values = np.zeros(300)
    values[:76] = 1.0
    values[224:] = 0.25
    assert statistics(values) == pytest.approx(((76 + 0.25 * 76) / 300, 76 / 300, 0.75), abs=1e-15)
    assert statistics(np.ones(256)) == (1, 1, 0)  # the official under numpy 2: decay NaN


# ---- whole videos ----

@pytest.mark.parametrize("shape, n_objects, n_frames", [((37, 91), 2, 7), ((48, 64), 3, 10), ((90, 60), 3, 8),
                                                       ((64, 64), 2, 3), ((40, 70), 3, 4)])
def test_videos_equal_the_transcription(shape, n_objects, n_frames):
    # n_frames - 2 scored: 5, 8, 6, 1, 2 (5, 6, 1, 2 not divisible by the 4 decay bins).
    rng = np.random.default_rng(n_frames * 100 + n_objects)
    truth, predicted = blob_video(rng, shape, n_objects, n_frames)
    ours = score_video(iter(truth), iter(predicted))
    assert list(ours["frames"]) == [n_frames - 2] * n_objects
    assert_matches_official(ours, official_semisupervised(truth, predicted))


def test_first_and_last_frames_are_not_scored():
    rng = np.random.default_rng(7)
    truth, predicted = blob_video(rng, (48, 64), 3, 9)
    reference = score_video(truth, predicted)
    wrong = [p.copy() for p in predicted]
    wrong[0][:] = 0
    wrong[-1] = np.roll(truth[-1], 11, axis=1)
    wrong[-1][:3] = 9  # not even a valid label: the official never reads these frames
    pd.testing.assert_frame_equal(score_video(truth, wrong), reference)
    wrong[4] = np.zeros_like(wrong[4])
    changed = score_video(truth, wrong)
    assert (changed["J_mean"] != reference["J_mean"]).any() and (changed["F_mean"] != reference["F_mean"]).any()
    assert_matches_official(changed, official_semisupervised(truth, wrong))


def test_objects_come_from_the_first_frame_and_missing_ones_are_empty():
    shape = (30, 50)
    first = np.zeros(shape, np.uint8)
    first[2:8, 2:8], first[20:26, 30:36] = 1, 2
    first[0, :] = 255  # void: not an object, so 2 objects
    later = first.copy()
    later[10:14, 40:44] = 3  # appears later: not scored
    truth = [first, later, later, later, later]
    predicted = [np.where(t == 2, 0, np.where(t == 255, 0, t)).astype(np.uint8) for t in truth]  # object 2 lost
    predicted = [np.where(p == 3, 0, p) for p in predicted]
    scores = score_video(truth, predicted)
    assert list(scores["object"]) == [1, 2] and list(scores["frames"]) == [3, 3]
    # Object 1 exact: J = F = 1 on every frame; object 2 never predicted: J = F = 0.
    assert scores.iloc[0][["J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"]].tolist() == \
        [1, 1, 0, 1, 1, 0]
    assert scores.iloc[1][["J_mean", "J_recall", "F_mean", "F_recall"]].tolist() == [0, 0, 0, 0]
    assert_matches_official(scores, official_semisupervised(truth, predicted))


def test_void_is_background_in_the_truth():
    # Truth: object 1 on a 10 x 10 square plus a 5 x 10 void strip under it; a prediction that covers both
    # counts the strip as wrong: J = 100 / 150.
    shape = (40, 40)
    first = square(shape, 5, 5).astype(np.uint8)
    middle = first.copy()
    middle[15:20, 5:15] = 255
    truth = [first, middle, first]
    predicted = [first, (square(shape, 5, 5) | (middle == 255)).astype(np.uint8), first]
    scores = score_video(truth, predicted)
    assert scores["J_mean"].iloc[0] == pytest.approx(100 / 150, abs=1e-15)
    assert_matches_official(scores, official_semisupervised(truth, predicted))


def test_errors_name_the_frame():
    shape = (20, 30)
    truth = [square(shape, 2, 2).astype(np.uint8)] * 4
    predicted = [t.copy() for t in truth]
    predicted[2][0, 0] = 2  # one object only
    with pytest.raises(PipelineError, match=r"frame 2: predicted label 2 above the 1 object"):
        score_video(truth, predicted)
    with pytest.raises(SystemExit):  # the official stops on it too
        official_semisupervised(truth, predicted)
    with pytest.raises(PipelineError, match=r"frame 1: truth \(20, 30\) and prediction \(30, 20\)"):
        score_video(truth, [truth[0], truth[1].T, truth[2], truth[3]])
    with pytest.raises(PipelineError, match=r"frame 3: no prediction frame"):
        score_video(truth, truth[:3])
    with pytest.raises(PipelineError, match=r"frame 4: no truth frame"):
        score_video(truth, truth + truth[:1])
    with pytest.raises(PipelineError, match="no frames"):
        score_video([], [])


def test_short_videos_score_nothing():
    one = [square((20, 30), 2, 2).astype(np.uint8)]
    for frames in (one, one * 2):
        scores = score_video(frames, frames)
        assert list(scores["object"]) == [1] and list(scores["frames"]) == [0]
        assert scores[COLUMNS[2:]].isna().all(axis=None)
    # No object in the first frame: no rows.
    empty = [np.zeros((20, 30), np.uint8)] * 5
    assert score_video(empty, empty).empty


def test_frames_are_streamed():
    # A few frames alive at any time (the current and the pending pair, and the generators' own), whatever the
    # video's length: here 24 frames pass through, at most 5 are alive at once.
    alive = [0]
    peak = [0]

    def frames(source):
        for frame in source:
            frame = frame.copy()
            alive[0] += 1
            weakref.finalize(frame, lambda: alive.__setitem__(0, alive[0] - 1))
            peak[0] = max(peak[0], alive[0])
            yield frame

    rng = np.random.default_rng(11)
    truth, predicted = blob_video(rng, (30, 40), 2, 12)
    scores = score_video(frames(truth), frames(predicted))
    assert peak[0] <= 5
    assert_matches_official(scores, official_semisupervised(truth, predicted))


def test_summary_is_the_official_global_table():
    objects = pd.DataFrame({"sequence": ["a", "a", "b"], "object": [1, 2, 1], "frames": [5, 5, 8],
                            "J_mean": [0.9, 0.6, 0.3], "J_recall": [1.0, 0.8, 0.0], "J_decay": [0.1, 0.2, 0.3],
                            "F_mean": [0.8, 0.5, 0.2], "F_recall": [1.0, 0.4, 0.1], "F_decay": [0.0, -0.3, 0.0]})
    result = summary(objects)
    # J = (.9 + .6 + .3)/3 = .6, F = (.8 + .5 + .2)/3 = .5, J&F = .55.
    assert result == pytest.approx({"J&F": 0.55, "J": 0.6, "J_recall": 0.6, "J_decay": 0.2, "F": 0.5,
                                    "F_recall": 0.5, "F_decay": -0.1, "objects": 3, "sequences": 2}, abs=1e-15)
    # A video with nothing scored makes the plain mean NaN, as the official's np.mean would.
    short = pd.concat([objects, pd.DataFrame([{"sequence": "c", "object": 1, "frames": 0}])], ignore_index=True)
    assert math.isnan(summary(short)["J&F"]) and summary(short)["sequences"] == 3


def test_summary_over_scored_videos_equals_the_official_means():
    rng = np.random.default_rng(5)
    tables, official_j, official_f = [], [], []
    for name, (shape, k, n) in {"x": ((37, 91), 2, 6), "y": ((40, 50), 3, 7)}.items():
        truth, predicted = blob_video(rng, shape, k, n)
        tables.append(score_video(truth, predicted).assign(sequence=name))
        for JM, JR, JD, FM, FR, FD in official_semisupervised(truth, predicted).values():
            official_j.append(JM)
            official_f.append(FM)
    result = summary(pd.concat(tables, ignore_index=True))
    assert result["objects"] == 5 and result["sequences"] == 2
    assert result["J&F"] == pytest.approx((np.mean(official_j) + np.mean(official_f)) / 2., abs=1e-12)
