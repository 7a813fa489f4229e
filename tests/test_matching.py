"""The exact DIFT protocol at feature resolution against a naive upsample-then-cosine implementation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.matching.protocols import FeatureMap, argmax_points, axis_weights, match_dift, match_geoaware, match_queries


def naive_upsample(features: np.ndarray, height: int, width: int) -> torch.Tensor:
    """DIFT's code: F.interpolate(bilinear, align_corners=False) to the original image size, (C, H, W)."""
    x = torch.from_numpy(features).permute(2, 0, 1)[None].double()
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0]


def naive_match(source: FeatureMap, target: FeatureMap, points: np.ndarray):
    s = naive_upsample(source.features, source.height, source.width)
    t = naive_upsample(target.features, target.height, target.width)
    vectors = s[:, points[:, 1], points[:, 0]].T
    cos = F.cosine_similarity(vectors[:, :, None, None], t[None], dim=1)
    flat = cos.reshape(len(points), -1).argmax(1).numpy()
    return np.stack([flat % target.width, flat // target.width], 1), cos.numpy()


def smooth_map(rng, h, w, c, smooth=3):
    """Spatially correlated features, like a network's (neighbouring cells are similar)."""
    coarse = rng.standard_normal((h // smooth + 2, w // smooth + 2, c))
    up = F.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                       align_corners=False)[0].permute(1, 2, 0).numpy()
    return (up + 0.3 * rng.standard_normal((h, w, c))).astype(np.float32)


def squash(features, width, height):
    h, w, _ = features.shape
    return FeatureMap(features, width, height, valid_x1=w * 16.0, valid_y1=h * 16.0, stride=16.0)


@pytest.mark.parametrize("pixels, cells", [(500, 48), (333, 48), (37, 12), (12, 12), (7, 12)])
def test_axis_weights_match_pytorch_interpolation(pixels, cells):
    axis = axis_weights(pixels, cells, float(cells))
    eye = torch.eye(cells, dtype=torch.float64)[None]  # interpolate each unit impulse along one axis
    expected = F.interpolate(eye, size=pixels, mode="linear", align_corners=False)[0].T.numpy()
    np.testing.assert_allclose(axis.matrix(cells), expected, atol=1e-12)


@pytest.mark.parametrize("size", [(40, 30, 9, 7), (53, 71, 12, 10), (64, 64, 8, 8)])
def test_cosine_map_equals_naive_upsampled_cosine(size):
    width, height, w, h = size
    rng = np.random.default_rng(0)
    source = squash(smooth_map(rng, h, w, 24), width + 3, height - 2)
    target = squash(smooth_map(rng, h, w, 24), width, height)
    points = np.stack([rng.integers(0, width + 3, 12), rng.integers(0, height - 2, 12)], 1)
    mine = target.cosine(source.vectors_at(points))
    _, expected = naive_match(source, target, points)
    np.testing.assert_allclose(mine, expected, atol=2e-5)
    naive_vectors = naive_upsample(source.features, source.height, source.width)[:, points[:, 1], points[:, 0]].T
    np.testing.assert_allclose(source.vectors_at(points), naive_vectors.numpy(), atol=1e-5)
    np.testing.assert_allclose(target.norm2(), (naive_upsample(target.features, height, width) ** 2).sum(0).numpy(),
                               rtol=1e-5)


def test_dift_argmax_equals_naive_on_many_keypoints():
    """Identical argmaxes, ties aside: on the half-cell border bands the upsampled map is constant
    along an axis, and which pixel of such a plateau wins is decided by rounding."""
    rng = np.random.default_rng(1)
    ties = total = 0
    for _ in range(20):
        source, target = (squash(smooth_map(rng, 12, 12, 32), 90, 70) for _ in range(2))
        points = np.stack([rng.integers(0, 90, 20), rng.integers(0, 70, 20)], 1)
        predicted, stats = match_dift(source, target, points)
        expected, cos = naive_match(source, target, points)
        agree = (predicted == expected).all(1)
        for k in np.flatnonzero(~agree):
            (x, y), (ex, ey) = predicted[k], expected[k]
            assert cos[k, y, x] == pytest.approx(cos[k, ey, ex], abs=1e-6)  # a tie
        ties += (~agree).sum()
        total += len(points)
        # The basic statistics, computed from cell-level sums, are those of the full upsampled map.
        flat = cos.reshape(len(points), -1)
        assert set(stats) == {"sim_max", "sim_mean", "sim_std"}
        for name, expected_values in (("sim_max", flat.max(1)), ("sim_mean", flat.mean(1)), ("sim_std", flat.std(1))):
            np.testing.assert_allclose(stats[name], expected_values, atol=1e-5, err_msg=name)
    assert ties / total < 0.05


def test_identity_pair_finds_its_own_keypoints():
    rng = np.random.default_rng(2)
    features = smooth_map(rng, 10, 14, 32)
    image = squash(features, 140, 100)
    points = np.stack([rng.integers(0, 140, 30), rng.integers(0, 100, 30)], 1)
    predicted, _ = match_dift(image, image, points)
    # The source vector's own pixel scores cosine 1; ties on a plateau stay within a cell.
    assert np.hypot(*(predicted - points).T).max() <= 10


def test_pad_mode_searches_only_the_valid_region():
    # Canvas 64 px, stride 8: the 100 x 50 image fills the top half (64 x 32 px) of the canvas.
    rng = np.random.default_rng(4)
    features = smooth_map(rng, 8, 8, 16)
    features[4:] = features[0, 0]  # padding cells: make them the best match for a corner query
    target = FeatureMap(features, 100, 50, valid_x1=64.0, valid_y1=32.0, stride=8.0)
    assert target.rows.i0.max() <= 3  # image rows only ever read cell rows 0..3
    naive = naive_upsample(features, 100, 100)[:, :50, :]  # upsample the whole canvas, crop the image
    scores = target.cosine(features[0, 0][None])
    expected = F.cosine_similarity(torch.from_numpy(features[0, 0]).double()[:, None, None], naive, dim=0).numpy()
    np.testing.assert_allclose(scores[0], expected, atol=2e-5)


def test_center_mode_reads_and_searches_only_the_centred_region():
    # Canvas 64 px, stride 8: the 100 x 50 image covers canvas rows 16..48 (cell rows 2..5), centred. DIFT's
    # upsampling of it is the whole canvas upsampled to 100 x 100, cropped to rows 25..75.
    rng = np.random.default_rng(7)
    features = smooth_map(rng, 8, 8, 16)
    features[:2] = features[6:] = features[2, 0]  # padding cells: the best match for a query of cell (2, 0)
    target = FeatureMap(features, 100, 50, valid_x1=64.0, valid_y1=48.0, stride=8.0, valid_x0=0.0, valid_y0=16.0)
    assert (target.rows.i0.min(), target.rows.i0.max()) == (1, 5)  # the first image row blends cell rows 1 and 2
    naive = naive_upsample(features, 100, 100)[:, 25:75, :]
    queries = np.concatenate([features[2, 0][None], features[rng.integers(2, 6, 20), rng.integers(0, 8, 20)]])
    expected = F.cosine_similarity(torch.from_numpy(queries).double()[:, :, None, None], naive[None], dim=1).numpy()
    np.testing.assert_allclose(target.cosine(queries), expected, atol=2e-5)
    np.testing.assert_allclose(target.norm2(), (naive ** 2).sum(0).numpy(), rtol=1e-5)
    predicted, _ = match_queries(target, queries)
    np.testing.assert_array_equal(predicted, argmax_points(target.cosine(queries)))
    source = FeatureMap(features, 100, 50, valid_x1=64.0, valid_y1=48.0, stride=8.0, valid_x0=0.0, valid_y0=16.0)
    points = np.array([[0, 0], [99, 49], [50, 20]])
    np.testing.assert_allclose(source.vectors_at(points), naive[:, points[:, 1], points[:, 0]].T.numpy(), atol=1e-5)


def test_similarity_stats_equal_their_definitions():
    from pipeline.matching.protocols import similarity_stats

    scores = np.random.default_rng(5).random((3, 50, 60)).astype(np.float32)
    best = np.array([[1, 2], [30, 20], [59, 49]])
    stats = similarity_stats(scores, best)
    flat = scores.reshape(3, -1).astype(np.float64)
    p = flat - flat.min(1, keepdims=True)
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1) / np.log(flat.shape[1])
    np.testing.assert_allclose(stats["sim_entropy"], entropy, atol=1e-7)
    np.testing.assert_allclose(stats["sim_std"], flat.std(1), atol=1e-7)
    np.testing.assert_allclose(stats["sim_mean"], flat.mean(1), atol=1e-7)
    yy, xx = np.mgrid[0:50, 0:60]
    for k, (x, y) in enumerate(best):
        far = (yy - y) ** 2 + (xx - x) ** 2 > 6.0**2  # a tenth of the longer side (60)
        assert stats["sim_peak_ratio"][k] == pytest.approx(scores[k][far].max() / scores[k].max())
    assert (scores == np.random.default_rng(5).random((3, 50, 60)).astype(np.float32)).all()  # left untouched


def test_geoaware_on_a_hand_computed_case():
    # A 2 x 3 grid of 16-px cells over a 90 x 60 image (canvas 48 x 32, squash). The keypoint (70, 10) lies
    # in canvas (37.3, 5.3): cell row 0, column 2. In the target that vector sits at row 1, column 0, whose
    # centre (8, 24) on the canvas is (15, 45) in the image.
    source = np.eye(6, dtype=np.float32).reshape(2, 3, 6)
    target = source.copy()
    target[1, 0], target[0, 2] = source[0, 2], source[1, 0]
    geometry = dict(width=90, height=60, valid_x1=48.0, valid_y1=32.0, stride=16.0)
    predicted, stats = match_geoaware(FeatureMap(source, **geometry), FeatureMap(target, **geometry), np.array([[70, 10]]))
    np.testing.assert_allclose(predicted, [[15.0, 45.0]])
    assert stats["sim_max"][0] == pytest.approx(1.0) and stats["sim_mean"][0] == pytest.approx(1 / 6)


def test_dift_branch_and_bound_stays_in_the_image_in_pad_mode():
    # Canvas 64 px, stride 8: the 100 x 50 image covers cell rows 0-3 only; rows 4-7 (padding) hold the query
    # vector itself, the best match anywhere on the canvas, yet never a prediction.
    rng = np.random.default_rng(6)
    features = smooth_map(rng, 8, 8, 16)
    features[4:] = features[0, 0]
    target = FeatureMap(features, 100, 50, valid_x1=64.0, valid_y1=32.0, stride=8.0)
    queries = np.concatenate([features[0, 0][None], features[rng.integers(0, 4, 20), rng.integers(0, 8, 20)]])
    predicted, _ = match_queries(target, queries)
    np.testing.assert_array_equal(predicted, argmax_points(target.cosine(queries)))
    assert predicted[:, 1].max() < 50
