"""DAVIS-2017 from the cache, end to end on the demo (pipeline/workflows/davis.py): a features store whose
features say which surface each cell shows and where on it (the demo's exact motions, carried back to frame 0)
gives back the true masks through DIFT's propagation, a spatially shuffled one does not; the stores are built
on DIFT's rectangular canvas, checked against the dataset's settings, and scored into metrics/."""

import io
import json
import zipfile
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from pipeline.cache.encode import canvas_shape
from pipeline.cache.store import FeatureStore
from pipeline.config import DatasetBackbone, DatasetsParams, DavisParams, Params
from pipeline.data import davis
from pipeline.demo.davis import DavisDemoSpec, generate, motions
from pipeline.errors import PipelineError
from pipeline.evaluation.video_segmentation import write_metrics
from pipeline.workflows.davis import propagate_store

SPEC = DavisDemoSpec(seed=0, sequences=3, frames=8)
STRIDE = 2  # canvas px per cell of the hand-made stores: fine enough that a coarse grid does not cap J&F
CANVAS = 128  # the short side: 240 x 128 frames -> a 224 x 128 canvas


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("davis") / "davis-demo", SPEC)
    params = Params(datasets=DatasetsParams(davis=DavisParams(root=str(root), canvas=CANVAS, device="auto", backbones={
        "surface": DatasetBackbone(model="none")})))
    return root, params


def embed(points: np.ndarray, scale: float) -> np.ndarray:
    """Unit-norm Fourier features of positions (as tests/test_hpatches.py's): cosine is highest where they coincide."""
    freqs = 2 * np.pi / (scale * np.array([2.0, 1.0, 0.5, 0.25, 0.125]))
    angles = points[..., :, None] * freqs
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).reshape(*points.shape[:-1], -1) / np.sqrt(10)  # 20 channels


def surface_store(root, path, shuffle: bool = False) -> str:
    """A features store of the demo on a 224 x 128 canvas at STRIDE px per cell: each cell's features are the
    surface it shows (background or object n, from the frame's true labels) and its frame-0 position on that
    surface (the object's known motion undone); `shuffle`: every frame's cells permuted at random (seeded)."""
    images = davis.images_table(root)
    width, height = int(images["width"].iloc[0]), int(images["height"].iloc[0])
    canvas_w, canvas_h = canvas_shape(width, height, CANVAS, "short-side")
    grid_h, grid_w = canvas_h // STRIDE, canvas_w // STRIDE
    table = images.assign(valid_x0=0.0, valid_y0=0.0, valid_x1=float(canvas_w), valid_y1=float(canvas_h))
    attrs = {"kind": "features", "name": "surface", "dataset": {"name": "davis"},
             "preprocessing": {"canvas": CANVAS, "canvas_size": [canvas_w, canvas_h]}, "determinants": {"shuffle": shuffle}}
    store = FeatureStore.create(path, attrs, table[["image", "category", "width", "height", "valid_x0", "valid_y0",
                                                    "valid_x1", "valid_y1"]], [0])
    moves = motions(SPEC)
    rng = np.random.default_rng(0)
    # Each cell's centre in original pixels (the canvas squeezes 240 px into 224).
    xs = (np.arange(grid_w) + 0.5) * STRIDE * width / canvas_w
    ys = (np.arange(grid_h) + 0.5) * STRIDE * height / canvas_h
    centres = np.stack(np.meshgrid(xs, ys), axis=-1)  # (grid_h, grid_w, 2) as (x, y)
    channels = 20 + 4  # 2 coordinates x 5 frequencies x (cos, sin), then 4 surfaces
    for index, row in images.iterrows():
        sequence, frame = row["image"].split("/")
        k = int(row["frame"])
        labels = davis.read_labels(davis.annotation_path(root, row["image"]))
        shown = labels[np.clip(centres[..., 1].astype(int), 0, height - 1), np.clip(centres[..., 0].astype(int), 0, width - 1)]
        positions = centres.copy()
        for move in moves[sequence]:
            on = shown == move.object_id
            back = np.linalg.inv(move.transforms[k])
            points = np.concatenate([centres[on], np.ones((on.sum(), 1))], axis=1) @ back.T
            positions[on] = points[:, :2] / points[:, 2:]
        features = np.concatenate([embed(positions, float(width)), 2 * np.eye(4)[shown]], axis=-1)
        if shuffle:
            features = features.reshape(-1, channels)[rng.permutation(grid_h * grid_w)].reshape(grid_h, grid_w, channels)
        node = store.ensure_layer("surface", {"features": (("timestep", "y", "x", "channel"), (1, grid_h, grid_w, channels))},
                                  {"y": (np.arange(grid_h) + 0.5) * STRIDE, "x": (np.arange(grid_w) + 0.5) * STRIDE,
                                   "channel": np.arange(channels)}, {"stride": float(STRIDE)}, dtype="float32")
        node["features"][index] = features[None].astype(np.float32)
        store.mark_done(index, 0.0, 0)
    return path


def test_surface_features_give_back_the_true_masks_and_shuffled_ones_do_not(demo, tmp_path):
    root, params = demo
    exact = propagate_store(params, "surface", tmp_path / "masks", surface_store(root, tmp_path / "exact.zarr"))
    assert len(exact) == 6 and exact.groupby("sequence").size().to_dict() == {"demo0-duo": 2, "demo1-solo": 1,
                                                                               "demo2-trio": 3}
    assert (exact["frames"] == SPEC.frames - 2).all()
    overall = (exact["J_mean"].mean() + exact["F_mean"].mean()) / 2
    assert overall > 0.95, exact[["sequence", "object", "J_mean", "F_mean"]]
    # The masks are DAVIS's indexed PNGs at the original size, frame 0 the given annotation.
    folder = tmp_path / "masks" / "surface" / "t0" / "raw" / "demo2-trio"
    written = sorted(p.name for p in folder.iterdir())
    assert written == [f"{k:05d}.png" for k in range(SPEC.frames)]
    first = davis.read_labels(folder / "00000.png")
    assert np.array_equal(first, davis.read_labels(davis.annotation_path(root, "demo2-trio/00000")))
    assert davis.read_labels(folder / "00005.png").shape == (128, 240)

    shuffled = propagate_store(params, "surface", tmp_path / "shuffled-masks",
                               surface_store(root, tmp_path / "shuffled.zarr", shuffle=True))
    assert (shuffled["J_mean"].mean() + shuffled["F_mean"].mean()) / 2 < 0.5, shuffled[["J_mean", "F_mean"]]


def test_metrics_name_the_protocol_and_pick_each_backbones_best_variant(demo, tmp_path):
    """Also: a video `context_caps` names runs with fewer context frames (DIFT's `shooting`), and says so."""
    root, params = demo
    capped = replace(params, datasets=DatasetsParams(davis=replace(params.datasets.davis, context_caps={"demo1-solo": 2})))
    frame = propagate_store(capped, "surface", tmp_path / "masks", surface_store(root, tmp_path / "exact.zarr"))
    assert frame.groupby("sequence")["context_used"].unique().map(list).to_dict() == {
        "demo0-duo": [28], "demo1-solo": [2], "demo2-trio": [28]}
    assert (frame["context"] == 28).all()
    worse = frame.assign(layer="worse", J_mean=frame["J_mean"] / 2)
    (tmp_path / "p").mkdir()
    pd.concat([frame, worse]).to_parquet(tmp_path / "p" / "surface.parquet")
    text = write_metrics([tmp_path / "p" / "surface.parquet"], tmp_path / "metrics")
    best = json.loads((tmp_path / "metrics" / "jf.json").read_text())
    assert "first frame + last 28, demo1-solo: last 2, exp(cos / 0.2), 15-cell window, top 15" in best["protocol"]
    assert best["surface"]["layer"] == "surface" and best["surface"]["objects"] == 6 and best["surface"]["sequences"] == 3
    expected = (frame["J_mean"].mean() + frame["F_mean"].mean()) / 2
    assert best["surface"]["J&F"] == pytest.approx(expected, abs=1e-4)
    table = pd.read_csv(tmp_path / "metrics" / "jf.csv")
    assert set(table["layer"]) == {"surface", "worse"} and len(table) == 2
    videos = pd.read_csv(tmp_path / "metrics" / "videos.csv")
    assert sorted(videos["sequence"]) == ["demo0-duo", "demo1-solo", "demo2-trio"]
    assert "surface (surface, t=0, raw): J&F" in text
    mixed = frame.assign(temperature=0.1)
    pd.concat([frame, mixed]).to_parquet(tmp_path / "p" / "surface.parquet")
    with pytest.raises(PipelineError, match="mix 2 propagation settings"):
        write_metrics([tmp_path / "p" / "surface.parquet"], tmp_path / "metrics")


def test_davis_stores_use_difts_rectangular_canvas_and_the_datasets_changes(demo, tiny_models, tmp_path):
    """extract_store: frames on a short-side canvas (240 x 128 -> 224 x 128), the backbone as
    datasets.davis.backbones changes it; a reader compares the store with that, and propagation settings
    leave the store current."""
    from pipeline.cache.current import staleness
    from pipeline.config import BackboneParams, EncoderParams
    from pipeline.workflows.davis import extract_store

    root, _ = demo
    model = tiny_models["tiny-sd2"]
    params = Params(
        store=str(tmp_path / "store"), check_disk=False,
        encoders={"tiny-sd2": EncoderParams(model=model, canvas=256)},
        backbones={"sd2": BackboneParams(kind="sd2", model=model, latents="tiny-sd2", layers=["up_blocks.1"],
                                         timesteps=[261], ensemble=1, prompt="a photo of a {category}")},
        datasets=DatasetsParams(davis=DavisParams(root=str(root), canvas=CANVAS, backbones={
            "sd2": DatasetBackbone(model=model, layers=["up_blocks.1", "up_blocks.2"], timesteps=[51])})))
    path = extract_store(params, "sd2")
    store = FeatureStore.open(path)
    assert store.attrs["preprocessing"]["canvas_size"] == [224, 128] and store.attrs["dataset"]["name"] == "davis"
    assert store.timesteps() == [51] and store.attrs["prompt"] == "" and len(store.keys()) == 24
    # (image, timestep, y, x, channel): 128 x 224 px at 8 and 16 px per cell, rows first.
    assert store["up_blocks.2/features"].shape[2:4] == (16, 28)
    assert store["up_blocks.1/features"].shape[2:4] == (8, 14)
    for layer, stride in (("up_blocks.2", 8), ("up_blocks.1", 16)):  # canvas px a cell, both axes
        assert store[layer].attrs["stride"] == stride
        assert list(store[f"{layer}/x"][:3]) == [stride / 2, 1.5 * stride, 2.5 * stride]
        assert store[f"{layer}/y"][-1] == 128 - stride / 2 and store[f"{layer}/x"][-1] == 224 - stride / 2
    latents = FeatureStore.open(tmp_path / "store" / "davis" / "latents" / "tiny-sd2.zarr")
    assert latents.attrs["canvas_mode"] == "short-side" and latents["posterior/mean"].shape[1:3] == (16, 28)
    assert staleness(path, params) is None
    settings = replace(params, datasets=DatasetsParams(davis=replace(params.datasets.davis, temperature=0.1, topk=5)))
    assert staleness(path, settings) is None
    other = replace(params, datasets=DatasetsParams(davis=replace(params.datasets.davis, backbones={
        "sd2": DatasetBackbone(model=model, layers=["up_blocks.1", "up_blocks.2"], timesteps=[101])})))
    assert "timesteps: [51] -> [101]" in staleness(path, other)


def test_a_store_holds_one_canvas_shape(tmp_path):
    """A portrait frame among landscape ones would need another grid: refused before anything is encoded,
    in one line naming the frame and both canvases (W x H)."""
    from pipeline.cache.encode import store_canvas

    assert canvas_shape(854, 480, 480, "short-side") == (832, 480)
    assert canvas_shape(480, 854, 480, "short-side") == (480, 832)
    assert canvas_shape(500, 333, 480, "short-side") == (704, 480)  # 480 * 500 / 333 = 720.7 -> 704
    assert canvas_shape(500, 333, 256, "squash") == (256, 256)
    table = pd.DataFrame({"image": ["a/00000", "b/00000"], "width": [854, 480], "height": [480, 854]})
    with pytest.raises(PipelineError) as refused:
        store_canvas(table, 480, "short-side", tmp_path / "x.zarr")
    message = str(refused.value)
    assert "\n" not in message and "b/00000, 480 x 854 (W x H), would have a 480 x 832 (W x H) canvas" in message
    assert "a/00000 a 832 x 480 (W x H) one" in message
    assert store_canvas(table.iloc[:1], 480, "short-side", tmp_path / "x.zarr") == (832, 480)


def test_the_real_sd2_unet_at_difts_davis_canvas_gives_difts_grids():
    """SD2.1's real U-Net (built from its config on the meta device) on an 832 x 480 canvas: 480 px is no
    multiple of 64, so the U-Net meets odd grids (60 -> 30 -> 15 -> 8 cells) and resizes them on the way up;
    up_blocks.2 is DIFT's 1/8 map (60 x 104, 640 channels), up_blocks.1 its 1/16 (30 x 52). A square SPair
    canvas of 480 px is still refused for SD2 (every grid halves evenly there)."""
    import torch

    from pipeline.config import BackboneParams
    from pipeline.models.backbones.registry import make_backbone
    from pipeline.models.realsize import ConfigParts, configs_for

    configs = configs_for("realsize:sd2-1")
    params = BackboneParams(kind="sd2", model="realsize:sd2-1", latents="x", layers=["up_blocks.1", "up_blocks.2"],
                            timesteps=[51], ensemble=1, prompt="")
    attrs = {"scaling_factor": 0.18215, "canvas": 480, "canvas_mode": "short-side", "canvas_size": [832, 480],
             "encoder": "vae", "model": "realsize:sd2-1"}
    backbone = make_backbone(params, attrs, ConfigParts(configs), ["x"])
    outputs = {}
    hooks = [backbone.unet.get_submodule(layer).register_forward_hook(
        lambda module, args, out, layer=layer: outputs.__setitem__(layer, tuple(out.shape))) for layer in params.layers]
    with torch.no_grad():
        backbone.unet(torch.zeros(1, 4, 60, 104, device="meta", dtype=backbone.dtype),
                      torch.tensor([51], device="meta"),
                      encoder_hidden_states=torch.zeros(1, 77, 1024, device="meta", dtype=backbone.dtype))
    for hook in hooks:
        hook.remove()
    assert outputs == {"up_blocks.1": (1, 1280, 30, 52), "up_blocks.2": (1, 640, 60, 104)}
    with pytest.raises(PipelineError, match="multiple of 64 px"):
        make_backbone(params, {**attrs, "canvas_mode": "squash"}, ConfigParts(configs), ["x"])


def test_a_davis_zip_is_fetched_and_read_and_an_unsafe_one_refused(tmp_path):
    """`download davis` unpacks DAVIS's zip (pipeline/data/download.py) to the folder the reader reads; a
    member that would land outside it is refused in one line."""
    import hashlib
    import threading
    from http.server import ThreadingHTTPServer

    from pipeline.data.download import DATASETS, download
    from test_download import Handler, Serving

    made = generate(tmp_path / "made" / "DAVIS", DavisDemoSpec(seed=3, sequences=2, frames=3))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(made.rglob("*")):
            bundle.write(path, (DATASETS["davis"].folder / path.relative_to(made)).as_posix())
    unsafe = io.BytesIO()  # a symbolic link to outside: zipfile would write it as a file holding the target
    with zipfile.ZipFile(unsafe, "w") as bundle:
        link = zipfile.ZipInfo("DAVIS/JPEGImages")
        link.external_attr = (0o120777 << 16)  # S_IFLNK
        bundle.writestr(link, "/etc")

    def fetch(body: bytes, dest):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.serving = Serving(body=body)
        threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
        try:
            url = f"http://127.0.0.1:{httpd.server_address[1]}/{DATASETS['davis'].archive}"
            return download("davis", dest, url=url, sha256=hashlib.sha256(body).hexdigest())
        finally:
            httpd.shutdown()
            httpd.server_close()

    folder = fetch(buffer.getvalue(), tmp_path / "data")
    assert folder == tmp_path / "data" / "DAVIS"
    assert davis.images_table(folder).equals(davis.images_table(made))
    with pytest.raises(PipelineError) as refused:
        fetch(unsafe.getvalue(), tmp_path / "other")
    assert "DAVIS/JPEGImages: unsafe member: a link" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "other" / "DAVIS").exists()
