"""DIFT's HPatches homography protocol (pipeline.matching.homography, pipeline.evaluation.homography) against
transcriptions of DIFT's own lines (Tsingularity/dift @ 9421eb2034396c5b66f1aff37f03e540c264e52f,
eval_hpatches.py and eval_homography.py), hand-computed values and synthetic pairs of known geometry."""

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.evaluation.homography import THRESHOLDS, accuracy
from pipeline.matching.homography import (corner_error, estimate_homography, match_pair, mutual_nearest,
                                          sample_descriptors, unique_keypoints)

W, H = 300, 200  # a non-square original image
h, w = 12, 20  # a non-square map


# ---- DIFT's code, transcribed (not imported); Tsingularity/dift @ 9421eb2034396c5b66f1aff37f03e540c264e52f ----

def dift_sample(ft: torch.Tensor, coord_np: np.ndarray, w: int, h: int) -> np.ndarray:
    """eval_hpatches.py, main(): `w, h = img.size` of the ORIGINAL image; coord is the DataLoader's batch of 1."""
    coord = torch.from_numpy(coord_np.astype(np.float32))[None]
    c = torch.Tensor([(w - 1) / 2., (h - 1) / 2.]).to(coord.device).float()
    coord_norm = (coord - c) / c
    feat = F.grid_sample(ft, coord_norm.unsqueeze(2)).squeeze(-1)
    feat = feat.transpose(1, 2)
    return feat.squeeze(0).detach().cpu().numpy()


def mnn_matcher(descriptors_a, descriptors_b, metric='cosine'):
    """eval_homography.py, mnn_matcher, verbatim."""
    device = descriptors_a.device
    if metric == 'cosine':
        descriptors_a = F.normalize(descriptors_a)
        descriptors_b = F.normalize(descriptors_b)
        sim = descriptors_a @ descriptors_b.t()
    elif metric == 'l2':
        dist = torch.sum(descriptors_a**2, dim=1, keepdim=True) + torch.sum(descriptors_b**2, dim=1, keepdim=True).t() - \
            2 * descriptors_a.mm(descriptors_b.t())
        sim = -dist
    nn12 = torch.max(sim, dim=1)[1]
    nn21 = torch.max(sim, dim=0)[1]
    ids1 = torch.arange(0, sim.shape[0], device=device)
    mask = (ids1 == nn21[nn12])
    matches = torch.stack([ids1[mask], nn12[mask]])
    return matches.t().data.cpu().numpy()


def dift_eval(sequences, metric, mode):
    """eval_homography.py, __main__, with read_function / cv2.imread replaced by the data given:
    sequences = [(seq_name, keypoints_a, descriptors_a, h, w, [(keypoints_b, descriptors_b, H_gt), ...])].
    Returns (overall, i, v) accuracies x 100 and the mean_dist of every pair."""
    th = np.linspace(1, 5, 3)
    i_accuracy, v_accuracy, dists = [], [], []
    for seq_name, keypoints_a, descriptors_a, h, w, others in sequences:
        keypoints_a, unique_idx = np.unique(keypoints_a, return_index=True, axis=0)
        descriptors_a = descriptors_a[unique_idx]
        for keypoints_b, descriptors_b, H_gt in others:
            keypoints_b, unique_idx = np.unique(keypoints_b, return_index=True, axis=0)
            descriptors_b = descriptors_b[unique_idx]
            matches = mnn_matcher(torch.from_numpy(descriptors_a), torch.from_numpy(descriptors_b), metric=metric)
            pts_a = keypoints_a[matches[:, 0]].reshape(-1, 1, 2).astype(np.float32)
            pts_b = keypoints_b[matches[:, 1]].reshape(-1, 1, 2).astype(np.float32)
            if mode == 'ransac':
                H, mask = cv2.findHomography(pts_a, pts_b, cv2.RANSAC, ransacReprojThreshold=3)
            elif mode == 'lmeds':
                H, mask = cv2.findHomography(pts_a, pts_b, cv2.LMEDS, ransacReprojThreshold=3)
            corners = np.array([[0, 0, 1], [0, h - 1, 1], [w - 1, 0, 1], [w - 1, h - 1, 1]])
            real_warped_corners = np.dot(corners, np.transpose(H_gt))
            real_warped_corners = real_warped_corners[:, :2] / real_warped_corners[:, 2:]
            warped_corners = np.dot(corners, np.transpose(H))
            warped_corners = warped_corners[:, :2] / warped_corners[:, 2:]
            mean_dist = np.mean(np.linalg.norm(real_warped_corners - warped_corners, axis=1))
            dists.append(mean_dist)
            correctness = mean_dist <= th
            if seq_name[0] == 'i':
                i_accuracy.append(correctness)
            elif seq_name[0] == 'v':
                v_accuracy.append(correctness)
    i_accuracy, v_accuracy = np.array(i_accuracy), np.array(v_accuracy)
    overall = np.mean(np.concatenate((i_accuracy, v_accuracy), axis=0), axis=0)
    return overall * 100, np.mean(i_accuracy, axis=0) * 100, np.mean(v_accuracy, axis=0) * 100, dists


# ---- synthetic pairs of known geometry ----

def project(H_: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ H_.T
    return p[:, :2] / p[:, 2:]


def random_homography(rng, width, height) -> np.ndarray:
    A = np.eye(3) + np.diag([1, 1, 0]) * rng.uniform(-0.1, 0.1, (3, 3))
    A[:2, 2] = rng.uniform(-10, 10, 2)
    A[2, :2] = rng.uniform(-2e-4, 2e-4, 2)
    return A


def phi(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """A smooth, injective function of the image-1 position (random Fourier features and the position)."""
    r = np.random.default_rng(seed)
    z = points @ r.normal(0, 0.05, (2, 16)) + r.uniform(0, 2 * np.pi, 16)
    return np.concatenate([np.cos(z), np.sin(z), points / 100.0], 1).astype(np.float32)


def synthetic_pair(rng, n=60, width=120, height=90, jitter=0.0, noise=0.0, distractors=10, image_1=None):
    """Image-1 keypoints (with duplicates) and descriptors phi(position) + `noise` (or `image_1`'s), their
    images under a random known H jittered by `jitter` px plus `distractors`, with descriptors phi(image-1
    position) + `noise`."""
    if image_1 is None:
        kp_a = np.round(rng.uniform(0, [width - 1, height - 1], (n, 2)), 1).astype(np.float32)
        kp_a = np.concatenate([kp_a, kp_a[:3]])  # duplicates, as SuperPoint files can hold
        image_1 = kp_a, phi(kp_a) + rng.normal(0, noise, (len(kp_a), 34)).astype(np.float32)
    kp_a, desc_a = image_1
    truth = random_homography(rng, width, height)
    exact_b = project(truth, kp_a)
    kp_b = np.concatenate([exact_b + rng.normal(0, jitter, exact_b.shape),
                           rng.uniform(0, [width - 1, height - 1], (distractors, 2))]).astype(np.float32)
    desc_b = np.concatenate([phi(kp_a), phi(project(np.linalg.inv(truth), kp_b[len(kp_a):]))])
    desc_b = desc_b + rng.normal(0, noise, desc_b.shape)
    return kp_a, desc_a, kp_b, desc_b.astype(np.float32), truth


# ---- (a) descriptor sampling ----

def test_sampling_is_difts_grid_sample_on_a_non_square_image():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((h, w, 7)).astype(np.float32)
    keypoints = np.concatenate([[[0, 0], [W - 1, H - 1], [W - 1, 0], [0, H - 1]],
                                rng.uniform(0, [W - 1, H - 1], (30, 2))]).astype(np.float32)
    ours = sample_descriptors(features, keypoints, W, H)
    ref = dift_sample(torch.from_numpy(features).permute(2, 0, 1)[None], keypoints, W, H)
    assert ours.shape == (len(keypoints), 7) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_sampling_by_hand():
    """Channel 0 = column + 1, channel 1 = row + 1: an interior x reads map column ((x - c) / c + 1) w / 2 - 0.5
    (align_corners=False with c = (W - 1) / 2); an image corner reads half a cell past the edge per axis, so
    1/4 of the corner cell (zero padding). Transposed x / y or align_corners=True fail here."""
    j, i = np.meshgrid(np.arange(w), np.arange(h))
    features = np.stack([j + 1, i + 1], -1).astype(np.float32)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    inner = np.array([[100, 50], [cx, cy], [12.5, 180], [289, 10]], np.float32)
    got = sample_descriptors(features, inner, W, H)
    u = ((inner[:, 0] - cx) / cx + 1) * w / 2 - 0.5
    v = ((inner[:, 1] - cy) / cy + 1) * h / 2 - 0.5
    np.testing.assert_allclose(got, np.c_[u + 1, v + 1], rtol=1e-5)
    np.testing.assert_allclose(got[0], [1 + (100 - 149.5) / 149.5 * 10 + 9.5, 1 + (50 - 99.5) / 99.5 * 6 + 5.5], rtol=1e-5)
    corners = sample_descriptors(features, np.array([[0, 0], [W - 1, H - 1], [W - 1, 0]], np.float32), W, H)
    np.testing.assert_allclose(corners, [[0.25, 0.25], [0.25 * w, 0.25 * h], [0.25 * w, 0.25 * 1]], rtol=1e-6)


# ---- (b) the whole protocol against DIFT's transcribed evaluation ----

@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("method", ["lmeds", "ransac"])
def test_accuracies_equal_difts_evaluation(metric, method):
    rng = np.random.default_rng(1)
    width, height = 120, 90
    sequences, rows = [], []
    for s, name in enumerate(["i_a", "i_b", "i_c", "v_a", "v_b", "v_c"]):
        others, image_1 = [], None
        for k in range(5):
            kp_a, desc_a, kp_b, desc_b, truth = synthetic_pair(
                np.random.default_rng(100 * s + k), width=width, height=height, image_1=image_1,
                jitter=[0.0, 0.7, 1.5, 3.0, 6.0][k], noise=[0.0, 0.05, 0.2][s % 3])
            image_1 = kp_a, desc_a  # image 1 of the sequence, shared by its 5 pairs
            others.append((kp_b, desc_b, truth))
            result = match_pair(desc_a, kp_a, desc_b, kp_b, truth, width, height, metric, method, 3.0)
            rows.append({"sequence": name, "corner_error": result["corner_error"], "backbone": "x"})
        sequences.append((name, *image_1, height, width, others))
    overall, i_acc, v_acc, dists = dift_eval(sequences, metric, method)
    table = pd.DataFrame(rows)
    np.testing.assert_allclose(table["corner_error"], dists, rtol=1e-12)
    got = accuracy(table, ["backbone"]).set_index(["subset", "threshold"])["accuracy"]
    for subset, ref in (("i", i_acc), ("v", v_acc), ("all", overall)):
        np.testing.assert_allclose([got[(subset, t)] for t in THRESHOLDS], ref, rtol=0, atol=1e-12)
    assert 0 < overall[0] < 100 or 0 < overall[1] < 100, "the synthetic pairs should not all pass or all fail"


# ---- (c) corner error by hand ----

def test_corner_error_by_hand():
    translation = np.array([[1, 0, 3], [0, 1, 4], [0, 0, 1]], float)
    assert corner_error(np.eye(3), translation, 10, 20) == 5.0
    # scaling by 2 about the origin on a 10 x 20 image: corners (0,0), (0,19), (9,0), (9,19) move by 0, 19, 9, |(9,19)|
    assert corner_error(np.eye(3), np.diag([2.0, 2.0, 1.0]), 10, 20) == pytest.approx((0 + 19 + 9 + np.hypot(9, 19)) / 4)
    # x only: 0, 0, 9, 9 (with width and height swapped it would be 0, 19, 0, 19)
    assert corner_error(np.eye(3), np.diag([2.0, 1.0, 1.0]), 10, 20) == pytest.approx(4.5)
    assert corner_error(2 * np.eye(3), np.eye(3), 10, 20) == 0.0  # homogeneous: divided by the third coordinate
    assert corner_error(None, np.eye(3), 10, 20) == float("inf")


# ---- (d) descriptors that are exact functions of position ----

@pytest.mark.parametrize("method", ["lmeds", "ransac"])
def test_exact_descriptors_recover_the_homography_and_shuffled_ones_do_not(method):
    rows = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        kp_a, desc_a, kp_b, desc_b, truth = synthetic_pair(rng, n=80, distractors=0)
        good = match_pair(desc_a, kp_a, desc_b, kp_b, truth, 120, 90, "cosine", method)
        assert good["homography_found"] and good["corner_error"] < 1.0
        assert good["inliers"] >= 60 and len(good["matches"]) == 80  # 83 keypoints, 3 duplicates
        np.testing.assert_allclose(np.reshape(good["estimate"], (3, 3)) / good["estimate"][8], truth, atol=1e-2)
        shuffled = match_pair(desc_a, kp_a, rng.permutation(desc_b), kp_b, truth, 120, 90, "cosine", method)
        assert shuffled["corner_error"] > 5.0
        rows += [{"sequence": "i_s", "case": "exact", "corner_error": good["corner_error"]},
                 {"sequence": "v_s", "case": "exact", "corner_error": good["corner_error"]},
                 {"sequence": "i_s", "case": "shuffled", "corner_error": shuffled["corner_error"]}]
    table = accuracy(pd.DataFrame(rows), ["case"]).set_index(["case", "subset", "threshold"])
    assert (table.loc["exact", "accuracy"] == 100).all()
    assert table.loc[("shuffled", "all"), "accuracy"].max() == 0


# ---- (e) mutual nearest neighbours and unique keypoints ----

def test_a_nearest_neighbour_that_is_not_mutual_is_dropped():
    a = np.array([[1.0, 0.0], [0.95, 0.312]])
    b = np.array([[0.9, 0.436], [0.0, 1.0]])
    # a0 -> b0, but b0 -> a1 (a1 -> b0 too): only (1, 0) survives; b1's nearest is a1, which prefers b0
    for metric in ("cosine", "l2"):
        np.testing.assert_array_equal(mutual_nearest(a, b, metric), [[1, 0]])
        np.testing.assert_array_equal(mutual_nearest(a, b, metric), mnn_matcher(
            torch.from_numpy(a).float(), torch.from_numpy(b).float(), metric))
    # cosine ignores the norm, l2 does not
    np.testing.assert_array_equal(mutual_nearest([[10.0, 0.0]], [[1.0, 0.0], [7.0, 7.0]], "cosine"), [[0, 0]])
    np.testing.assert_array_equal(mutual_nearest([[10.0, 0.0]], [[1.0, 0.0], [7.0, 7.0]], "l2"), [[0, 1]])
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    for metric in ("cosine", "l2"):
        np.testing.assert_array_equal(mutual_nearest(x, y, metric),
                                      mnn_matcher(torch.from_numpy(x), torch.from_numpy(y), metric))
    with pytest.raises(PipelineError):
        mutual_nearest(x, y, "dot")


def test_unique_keypoints_reindex_their_descriptors():
    kp = np.array([[5, 5], [1, 2], [5, 5], [0, 9]], np.float32)
    desc = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    kp_u, desc_u = unique_keypoints(kp, desc)
    np.testing.assert_array_equal(kp_u, [[0, 9], [1, 2], [5, 5]])  # sorted, first occurrence kept
    np.testing.assert_array_equal(desc_u[:, 0], [3, 1, 0])  # not [0, 1, 2]: the descriptors follow their points
    # so the order and the duplicates of the input do not matter to a pair's result
    rng = np.random.default_rng(4)
    kp_a, desc_a, kp_b, desc_b, truth = synthetic_pair(rng, jitter=1.0)
    order = rng.permutation(len(kp_b))
    one = match_pair(desc_a, kp_a, desc_b, kp_b, truth, 120, 90, "cosine", "lmeds")
    two = match_pair(desc_a, kp_a, desc_b[order], kp_b[order], truth, 120, 90, "cosine", "lmeds")
    assert len(one["keypoints_a"]) == len(kp_a) - 3
    np.testing.assert_array_equal(one["matches"], two["matches"])
    assert one["corner_error"] == two["corner_error"] < 5


def test_too_few_matches_is_a_failure_without_cv2():
    assert estimate_homography(np.zeros((3, 2)), np.zeros((3, 2)), "ransac") is None
    with pytest.raises(PipelineError):
        estimate_homography(np.zeros((5, 2)), np.zeros((5, 2)), "magsac")
    kp = np.array([[0, 0], [5, 5], [9, 1]], np.float32)
    out = match_pair(np.eye(3, dtype=np.float32), kp, np.eye(3, dtype=np.float32), kp, np.eye(3), 10, 10, "cosine", "lmeds")
    assert out["homography_found"] is False and out["estimate"] is None and out["inliers"] == 0
    assert out["corner_error"] == float("inf") and len(out["matches"]) == 3


# ---- (f) accuracy ----

def test_accuracy_splits_i_v_all_and_counts_the_threshold_itself():
    errors = {"i_x": [0.5, 3.0, 4.0, float("inf")], "v_y": [1.0, 6.0]}
    rows = [{"backbone": b, "sequence": s, "corner_error": e + (0 if b == "a" else 10)}
            for b in ("a", "b") for s, es in errors.items() for e in es]
    table = accuracy(pd.DataFrame(rows), ["backbone"])
    assert list(table.columns) == ["backbone", "subset", "threshold", "accuracy", "pairs"]
    got = table.set_index(["backbone", "subset", "threshold"])
    expected = {("i", 1): 25, ("i", 3): 50, ("i", 5): 75, ("v", 1): 50, ("v", 3): 50, ("v", 5): 50,
                ("all", 1): 200 / 6, ("all", 3): 300 / 6, ("all", 5): 400 / 6}
    for (subset, t), value in expected.items():
        assert got.loc[("a", subset, t), "accuracy"] == pytest.approx(value)
        assert got.loc[("b", subset, t), "accuracy"] == 0
    assert got.loc[("a", "i", 1), "pairs"] == 4 and got.loc[("a", "v", 1), "pairs"] == 2
    assert got.loc[("a", "all", 5), "pairs"] == 6
    only_i = accuracy(pd.DataFrame(rows[:4]), [])
    assert only_i.set_index(["subset", "threshold"]).loc[("v", 3), "pairs"] == 0
    with pytest.raises(PipelineError):
        accuracy(pd.DataFrame([{"sequence": "x_z", "corner_error": 1.0}]), [])
    with pytest.raises(PipelineError):
        accuracy(pd.DataFrame([{"sequence": "i_z"}]), [])
