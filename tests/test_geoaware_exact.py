"""`geoaware` is GeoAware-SC's evaluation and `sd-dino` sd-dino's, exactly, on the `center` canvas.

The reference below is an independent transcription of their maths (not their code), from
- GeoAware-SC, Junyi42/GeoAware-SC @ 166f87304fcfd957c49fbe1bc4dae699bf97dff2: utils/utils_correspondence.py
  (`resize`, `kpts_to_patch_idx`, `calculate_keypoint_transformation` with SOFT_EVAL off),
  utils/utils_dataset.py (`preprocess_kps_pad`, `load_spair_data`'s thresholds), pck_train.py (`compute_pck`);
- sd-dino, Junyi42/sd-dino @ b85df18ea232fa27ed572b4d2cee6751aac49c2c: pck_spair_pascal.py (its prediction
  `(index - 1) * stride + stride + patch_size // 2 - .5`; everything else as GeoAware-SC).
It keeps their dtypes: keypoints are float32 torch tensors, the box threshold a float64 tensor (numpy int x
Python float), alpha a float32 tensor, the image threshold `alpha * ANNO_SIZE` float32.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from pipeline.cache.encode import canvas_layout, encode, load_canvas
from pipeline.cache.extract import extract
from pipeline.matching.maps import StoreMaps
from pipeline.config import BackboneParams, EncoderParams
from pipeline.data.spair import load_split
from pipeline.demo.tiny_models import make_tiny
from pipeline.evaluation.analysis import correct, load_predictions
from pipeline.evaluation.metrics import pck_table, verdicts
from pipeline.matching.match import match_store
from pipeline.matching.protocols import FeatureMap, canvas_columns, geoaware_cells, match_geoaware

CANVAS, PATCHES = 112, 8  # 8 x 8 patches of 14 px, as DINOv2 at 840 px gives 60 x 60
LAYER = "encoder.layer.2"
ALPHAS = (0.05, 0.1, 0.15)


# ---- the transcription ----------------------------------------------------------------------------

def their_resize(image: Image.Image, size: int) -> np.ndarray:
    """`resize` (edge=False): the long side to `size`, the short one to np.around(size x short / long), Lanczos,
    on a black uint8 square, centred: rows (or columns) from (size - short) // 2."""
    width, height = image.size
    canvas = np.zeros((size, size, 3), np.uint8)
    if height <= width:
        short = int(np.around(size * height / width))
        canvas[(size - short) // 2:(size + short) // 2] = np.asarray(image.resize((size, short), Image.Resampling.LANCZOS))
    else:
        short = int(np.around(size * width / height))
        canvas[:, (size - short) // 2:(size + short) // 2] = np.asarray(image.resize((short, size), Image.Resampling.LANCZOS))
    return canvas


def their_keypoints(points, width: int, height: int, size: int) -> torch.Tensor:
    """`preprocess_kps_pad`: every coordinate x ONE factor size / max(W, H) (a float32 tensor times a Python
    float), then the short axis's offset int((size - np.around(size x short / long)) / 2)."""
    kps = torch.tensor(np.asarray(points, dtype=np.float32))
    kps = kps * (size / max(width, height))
    if height < width:
        kps[:, 1] += int((size - int(np.around(size * height / width))) / 2)
    elif width < height:
        kps[:, 0] += int((size - int(np.around(size * width / height))) / 2)
    return kps


def their_threshold(bndbox, width: int, height: int, size: int):
    """`load_spair_data`: max(y2 - y1, x2 - x1) of the target box (numpy ints) x the factor: a float64."""
    box = np.asarray(bndbox)
    return max(box[3] - box[1], box[2] - box[0]) * (size / max(width, height))


def their_cells(kps: torch.Tensor, patches: int, size: int) -> np.ndarray:
    """`kpts_to_patch_idx`: (patches / size x coordinate) on the float32 numpy array, truncated by astype(int32)."""
    y = (patches / size * kps[:, 1].numpy()).astype(np.int32)
    x = (patches / size * kps[:, 0].numpy()).astype(np.int32)
    return patches * y + x


def their_best(source: np.ndarray, target: np.ndarray, cells: np.ndarray) -> torch.Tensor:
    """Nearest neighbours: cosine of each source cell against every target cell (here in float64, so that
    the comparison does not hang on BLAS's summation order), first maximum."""
    a = torch.from_numpy(source.reshape(-1, source.shape[-1]).astype(np.float64))
    b = torch.from_numpy(target.reshape(-1, target.shape[-1]).astype(np.float64))
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    return torch.argmax((a @ b.T)[torch.from_numpy(cells.astype(np.int64))], dim=-1)


def their_prediction(best: torch.Tensor, patches: int, size: int, protocol: str) -> torch.Tensor:
    """(K, 2) canvas points of the best patches. GeoAware-SC: patch x stride + stride // 2 with stride =
    ANNO_SIZE / num_patches (a float); sd-dino: (patch - 1) x stride + stride + patch_size // 2 - .5 with
    integer stride = patch_size (DINOv2: 14)."""
    y_patch, x_patch = best // patches, best % patches
    if protocol == "geoaware":
        stride = size / patches
        x, y = x_patch * stride + stride // 2, y_patch * stride + stride // 2
    else:
        stride = patch_size = size // patches
        x = (x_patch - 1) * stride + stride + patch_size // 2 - .5
        y = (y_patch - 1) * stride + stride + patch_size // 2 - .5
    return torch.stack([x, y]).permute(1, 0)


def their_verdicts(truth: torch.Tensor, predicted: torch.Tensor, threshold, alphas, size: int) -> np.ndarray:
    """`compute_pck` (per image): err = norm of (gt - pred) over (y, x) in float32; correct when
    err < alpha x threshold (bbox: a float64 tensor, the float32 alpha promoted) or err < alpha x ANNO_SIZE
    (threshold None: img, float32). (len(alphas), K) booleans."""
    err = (truth[:, [1, 0]] - predicted[:, [1, 0]]).norm(dim=-1).unsqueeze(0)
    alpha = torch.tensor(alphas)  # float32
    if threshold is not None:
        thresholds = torch.tensor([threshold])  # float64
        return (err < alpha.unsqueeze(-1) * thresholds.repeat(err.shape[1]).unsqueeze(0)).numpy()
    return (err < (alpha * size).unsqueeze(-1)).numpy()


# ---- hand-made cases ------------------------------------------------------------------------------

def test_center_layout_is_their_resize_geometry():
    # 500 x 333 at 840: the short side np.around(559.44) = 559, centred at (840 - 559) // 2 = 140; the
    # keypoints' single factor 1.68 would make it 559.44 tall.
    assert canvas_layout(500, 333, 840, "center") == (0, 140, 840, 559)
    assert canvas_layout(333, 500, 840, "center") == (140, 0, 559, 840)
    assert canvas_layout(500, 500, 840, "center") == (0, 0, 840, 840)
    assert canvas_layout(500, 333, 840, "pad") == (0, 0, 840, 559)  # the same size, at the top-left
    rng = np.random.default_rng(0)
    for width, height in rng.integers(60, 1000, (300, 2)):
        x0, y0, w, h = canvas_layout(int(width), int(height), 840, "center")
        their = their_resize(Image.new("RGB", (int(width), int(height)), (255, 255, 255)), 840)
        rows, columns = np.flatnonzero(their[:, :, 0].any(1)), np.flatnonzero(their[:, :, 0].any(0))
        assert (x0, y0, w, h) == (columns[0], rows[0], len(columns), len(rows)), (width, height)
        # ... and where `preprocess_kps_pad` puts the image's corner
        assert their_keypoints([[0, 0]], int(width), int(height), 840)[0].tolist() == [x0, y0]


def test_center_canvas_equals_their_resize_bit_for_bit(tmp_path):
    rng = np.random.default_rng(1)
    for width, height in ((50, 33), (33, 50), (47, 47), (61, 29)):
        path = tmp_path / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        expected = (their_resize(Image.open(path).convert("RGB"), CANVAS).astype(np.float64) / 127.5 - 1).astype(np.float32)
        got = load_canvas(path, CANVAS, "center").permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), (width, height)
        assert (got == -1).all(-1).any() == (width != height)  # black padding, uint8 0


def _map(width: int, height: int, size: int, patches: int, mode: str = "center", features=None) -> FeatureMap:
    x0, y0, w, h = canvas_layout(width, height, size, mode)
    features = np.ones((patches, patches, 1), np.float32) if features is None else features
    return FeatureMap(features, width, height, float(x0 + w), float(y0 + h), size / patches, float(x0), float(y0))


@pytest.mark.parametrize("width, height", [(500, 333), (333, 500), (400, 300), (500, 375)])
def test_source_cells_are_theirs_for_every_pixel(width, height):
    # Every integer keypoint of the image: the single factor and the float32 truncation, as theirs.
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    points = np.stack([xs.ravel(), ys.ravel()], 1)
    rows, columns = geoaware_cells(_map(width, height, 840, 60), points)
    expected = their_cells(their_keypoints(points, width, height, 840), 60, 840)
    np.testing.assert_array_equal(rows * 60 + columns, expected)
    # The rules this replaces would not pass: each axis its own rounded factor (559 / 333 rather than 1.68) ...
    x0, y0, w, h = canvas_layout(width, height, 840, "center")
    per_axis = (np.floor((y0 + points[:, 1] * (h / height)) / 14) * 60 + np.floor((x0 + points[:, 0] * (w / width)) / 14))
    if 333 in (width, height):
        assert (per_axis != expected).any()
    # ... or exact (float64) truncation: 400 x 300 at 840 puts x = 180 at 378.0 = 27 x 14, which their float32
    # product puts in cell 26.
    if (width, height) == (400, 300):
        exact = np.floor((x0 + points[:, 0] * (840 / width)) / 14)
        assert (exact != expected % 60).any()
        assert geoaware_cells(_map(width, height, 840, 60), np.array([[180, 0]]))[1][0] == 26


def test_an_error_of_exactly_alpha_times_the_box_is_correct_as_in_float32():
    # Canvas 840, the image 840 x 840 (factor 1): the truth (105, 103), the prediction cell (7, 8) -> (105, 119):
    # an error of exactly 16 = 0.1 x 160. float32(0.1) x 160 in float64 is 16.0000002 > 16: correct there; an
    # error of 84 against the image side (0.1 x 840 in float32 = 84.0) is not; against a box of 840 (float64) it is.
    frame = pd.DataFrame({"trg_x": [105.0, 105.0], "trg_y": [103.0, 35.0], "pred_x": [105.0, 105.0],
                          "pred_y": [119.0, 119.0], "threshold": [160.0, 840.0], "image_size": [840.0, 840.0],
                          "protocol": "geoaware", "canvas_scale": 1.0, "canvas_x0": 0.0, "canvas_y0": 0.0})
    truth = their_keypoints(frame[["trg_x", "trg_y"]].to_numpy(), 840, 840, 840)
    predicted = their_prediction(torch.tensor([8 * 60 + 7, 8 * 60 + 7]), 60, 840, "geoaware")
    assert predicted.tolist() == [[105.0, 119.0]] * 2
    for k, threshold in enumerate((160.0, 840.0)):
        theirs = their_verdicts(truth[k:k + 1], predicted[k:k + 1], np.float64(threshold), [0.1], 840)[0, 0]
        assert theirs and verdicts(frame.iloc[k:k + 1], [0.1], "bbox")[0, 0]
    assert not their_verdicts(truth[1:], predicted[1:], None, [0.1], 840)[0, 0]
    assert verdicts(frame, [0.1], "img")[0].tolist() == [True, False]
    # In image pixels, float64 and strict (a `squash` canvas, no frame) 16 / 160 is not below 0.1; DIFT's <= is.
    assert not verdicts(frame.assign(canvas_scale=np.nan), [0.1], "bbox")[0, 0]
    assert verdicts(frame.assign(protocol="dift"), [0.1], "bbox")[0, 0]


def test_top_left_and_centred_layouts_give_different_verdicts():
    # Canvas 112 (8 x 8 cells of 14 px), a 100 x 70 image: 78 px tall, centred at y0 = 17 (not a whole cell).
    # Every cell is its own best match, so the prediction is the keypoint's cell's centre. The keypoint
    # (6, 0) is at canvas y 0 on the top-left layout (cell row 0: 7 px away) but y 17 centred (row 1: 4 px
    # away); the box of 50 px is 56 canvas px, 0.1 of it 5.6.
    features = np.eye(64, dtype=np.float32).reshape(8, 8, 64)
    rows = {}
    for mode in ("center", "pad"):
        feature_map = _map(100, 70, CANVAS, PATCHES, mode, features)
        predicted, _ = match_geoaware(feature_map, feature_map, np.array([[6, 0]]))
        rows[mode] = pd.DataFrame({"trg_x": [6.0], "trg_y": [0.0], "pred_x": predicted[:, 0], "pred_y": predicted[:, 1],
                                   "threshold": [50.0], "image_size": [100.0], "protocol": "geoaware",
                                   **{k: [v] for k, v in canvas_columns(feature_map, "geoaware").items()}})
    assert rows["center"]["canvas_y0"].item() == 17.0 and rows["pad"]["canvas_y0"].item() == 0.0
    assert verdicts(rows["center"], [0.1])[0, 0] and not verdicts(rows["pad"], [0.1])[0, 0]
    # The centred one is theirs.
    truth = their_keypoints([[6, 0]], 100, 70, CANVAS)
    best = their_best(features, features, their_cells(truth, PATCHES, CANVAS))
    theirs = their_prediction(best, PATCHES, CANVAS, "geoaware")
    assert theirs.tolist() == [[7.0, 21.0]]
    np.testing.assert_allclose(rows["center"][["pred_x", "pred_y"]].to_numpy(), [[7 / 1.12, (21 - 17) / 1.12]], rtol=1e-15)
    assert their_verdicts(truth, theirs, their_threshold([0, 0, 50, 20], 100, 70, CANVAS), [0.1], CANVAS)[0, 0]


def test_sd_dino_predicts_half_a_pixel_before_the_cell_centre():
    features = np.eye(64, dtype=np.float32).reshape(8, 8, 64)
    feature_map = _map(112, 112, CANVAS, PATCHES, "center", features)  # factor 1, no offset
    points = np.stack(np.meshgrid(np.arange(0, 112, 5), np.arange(0, 112, 5)), -1).reshape(-1, 2)
    cells = their_cells(their_keypoints(points, 112, 112, CANVAS), PATCHES, CANVAS)
    for protocol, offset in (("geoaware", 7.0), ("sd-dino", 6.5)):
        predicted, _ = match_geoaware(feature_map, feature_map, points, protocol=protocol)
        theirs = their_prediction(torch.from_numpy(cells.astype(np.int64)), PATCHES, CANVAS, protocol).numpy()
        np.testing.assert_array_equal(predicted, theirs)
        np.testing.assert_array_equal(predicted, (points // 14) * 14 + offset)


def test_analysis_correct_follows_the_protocol_and_the_threshold_family():
    # One keypoint per variant: the float32 tie of the test above under geoaware on its canvas (correct),
    # geoaware without a canvas frame (strict, wrong) and dift (inclusive, correct); by img all three differ too.
    base = {"pair": "p", "category": "c", "keypoint": 0, "src_image": "c/s", "trg_image": "c/t", "trg_x": 105.0,
            "trg_y": 103.0, "pred_x": 105.0, "pred_y": 119.0, "threshold": 160.0, "image_size": 160.0, "layer": "l"}
    frame = pd.DataFrame([{**base, "backbone": "a", "protocol": "geoaware", "canvas_scale": 1.0, "canvas_x0": 0.0, "canvas_y0": 0.0},
                          {**base, "backbone": "b", "protocol": "geoaware", "canvas_scale": np.nan, "canvas_x0": np.nan, "canvas_y0": np.nan},
                          {**base, "backbone": "a", "protocol": "dift", "canvas_scale": np.nan, "canvas_x0": np.nan, "canvas_y0": np.nan}])
    frame["distance"] = np.hypot(frame["pred_x"] - frame["trg_x"], frame["pred_y"] - frame["trg_y"])
    dataset = load_predictions(frame)
    for family in ("bbox", "img"):
        got = correct(dataset, 0.1, family)
        expected = verdicts(frame, [0.1], family)[0].astype(float)
        for row, value in zip(frame.itertuples(), expected):
            assert got.sel(backbone=row.backbone, protocol=row.protocol).item() == value
    assert correct(dataset, 0.1, "bbox").sel(layer="l").values.tolist() == [[1.0, 1.0, 0.0]]  # (a dift, a geo, b geo)


# ---- end to end: a tiny DINOv2 on the demo's images, centred -------------------------------------------

@pytest.fixture(scope="module")
def centre_world(tmp_path_factory, demo_root):
    base = tmp_path_factory.mktemp("centre")
    split = load_split(demo_root, "test")
    pixels = encode(EncoderParams(kind="pixels", canvas=CANVAS, canvas_mode="center"), split.images, demo_root,
                    base / "pixels.zarr")
    model = make_tiny("tiny-dinov2", base / "tiny-dinov2")
    params = BackboneParams(kind="dinov2", model=str(model), latents="pixels", layers=[LAYER], timesteps=[0],
                            ensemble=1, latent="mean", noise=False)
    path = extract(params, "dinov2", pixels, base / "dinov2.zarr")
    return {"split": split, "pixels": pixels, "store": path, "root": demo_root}


def test_centre_store_holds_their_canvas(centre_world):
    split, maps = centre_world["split"], StoreMaps(centre_world["store"])
    canvases = zarr.open_group(centre_world["pixels"], mode="r")["posterior/mean"]
    offsets = set()
    for index, row in enumerate(split.images.itertuples()):
        image = Image.open(Path(centre_world["root"]) / row.path).convert("RGB")
        expected = (their_resize(image, CANVAS).astype(np.float64) / 127.5 - 1).astype(np.float32)
        assert np.array_equal(canvases[index], expected), row.image
        info = maps.images.loc[row.image]
        corner = their_keypoints([[0, 0]], row.width, row.height, CANVAS)[0].tolist()
        assert [info["valid_x0"], info["valid_y0"]] == corner
        offsets.add(max(corner))
    assert {0.0, 14.0, 5.0} <= offsets  # square images, a whole cell, and an offset inside a cell


@pytest.mark.parametrize("protocol", ["geoaware", "sd-dino"])
def test_predictions_and_pck_equal_the_transcription(centre_world, protocol):
    split, maps = centre_world["split"], StoreMaps(centre_world["store"])
    pairs = split.pairs
    predictions = match_store(maps, pairs, protocols=[protocol])
    expected_canvas, expected = [], {family: [] for family in ("bbox", "img")}
    per_image = {family: [] for family in ("bbox", "img")}
    for pair in pairs.itertuples():
        source = their_keypoints(pair.src_kps, pair.src_width, pair.src_height, CANVAS)
        truth = their_keypoints(pair.trg_kps, pair.trg_width, pair.trg_height, CANVAS)
        best = their_best(maps.raw(pair.src_image, LAYER, 0), maps.raw(pair.trg_image, LAYER, 0),
                          their_cells(source, PATCHES, CANVAS))
        predicted = their_prediction(best, PATCHES, CANVAS, protocol)
        expected_canvas.append(predicted.numpy())
        threshold = their_threshold(pair.trg_bndbox, pair.trg_width, pair.trg_height, CANVAS)
        for family, size in (("bbox", threshold), ("img", None)):
            found = their_verdicts(truth, predicted, size, ALPHAS, CANVAS)
            expected[family].append(found)
            per_image[family].append(torch.from_numpy(found).float().mean(dim=-1))
    rows = predictions.set_index("pair").loc[pairs["filename"]].reset_index()  # pair order, keypoints in order
    # Every prediction, on their canvas (float32, exactly) and in image pixels.
    canvas = np.concatenate(expected_canvas)
    scale, offset = rows["canvas_scale"].to_numpy(), rows[["canvas_x0", "canvas_y0"]].to_numpy()
    np.testing.assert_array_equal((rows[["pred_x", "pred_y"]].to_numpy() * scale[:, None] + offset).astype(np.float32), canvas)
    np.testing.assert_allclose(rows[["pred_x", "pred_y"]].to_numpy(), (canvas - offset) / scale[:, None], rtol=0, atol=1e-12)
    assert (rows["canvas_scale"] == CANVAS / np.maximum(rows["trg_image"].map(maps.images["width"]),
                                                        rows["trg_image"].map(maps.images["height"]))).all()
    # Every verdict, and every PCK (per image and per point, pooled over the pairs).
    table = pck_table(predictions, alphas=ALPHAS, thresholds=("bbox", "img"))
    for family in ("bbox", "img"):
        theirs = np.concatenate(expected[family], axis=1)
        np.testing.assert_array_equal(verdicts(rows, ALPHAS, family), theirs)
        image_pck = torch.stack(per_image[family]).mean(dim=0).numpy()
        for k, alpha in enumerate(ALPHAS):
            at = table[(table["threshold_by"] == family) & (table["category"] == "all") & np.isclose(table["alpha"], alpha)]
            assert at[at["kind"] == "per_image"]["pck"].item() == pytest.approx(float(image_pck[k]), abs=1e-6)
            assert at[at["kind"] == "per_point"]["pck"].item() == theirs[k].mean()
    assert 0 < np.concatenate(expected["bbox"], axis=1).mean() < 1  # neither all right nor all wrong


def test_search_indexes_only_the_centred_cells_and_places_them_as_geoaware(centre_world):
    from pipeline.matching.search import CellIndex

    maps = StoreMaps(centre_world["store"])
    index = CellIndex(maps, LAYER, 0, quiet=True)
    covered = 0
    for image, info in maps.images.iterrows():  # cells that overlap [valid_x0, valid_x1) x [valid_y0, valid_y1)
        rows = np.ceil(info["valid_y1"] / 14) - np.floor(info["valid_y0"] / 14)
        covered += rows * (np.ceil(info["valid_x1"] / 14) - np.floor(info["valid_x0"] / 14))
        if info["valid_y0"] == 14.0:  # a whole padding row above: never indexed
            assert not ((index.cells[:, 0] == maps.position[image]) & (index.cells[:, 1] == 0)).any()
    assert index.index.ntotal == covered < len(maps.images) * PATCHES**2
    pair = centre_world["split"].pairs.iloc[3]
    found = index.search(pair["src_image"], tuple(pair["src_kps"][0]), top=3)
    info = maps.images.loc[pair["src_image"]]
    cell = their_cells(their_keypoints([pair["src_kps"][0]], info["width"], info["height"], CANVAS), PATCHES, CANVAS)[0]
    assert (found["row"].iloc[0], found["column"].iloc[0]) == (cell // PATCHES, cell % PATCHES)
    for hit in found.itertuples():
        hit_info = maps.images.loc[hit.image]
        hit_scale = CANVAS / max(hit_info["width"], hit_info["height"])
        assert (hit.x, hit.y) == pytest.approx(((hit.column * 14 + 7 - hit_info["valid_x0"]) / hit_scale,
                                                (hit.row * 14 + 7 - hit_info["valid_y0"]) / hit_scale), rel=1e-12)
