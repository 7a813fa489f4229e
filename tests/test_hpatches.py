"""HPatches from the cache, end to end on the demo (pipeline/workflows/hpatches.py): a features store whose
features are exact functions of image-1 position gives the true homography for every pair, a shuffled one
does not, and DIFT's own evaluation (transcribed in tests/test_homography.py) fed this pipeline's
descriptors gives this pipeline's accuracies."""

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cache.store import FeatureStore
from pipeline.config import DatasetBackbone, DatasetsParams, HPatchesParams, Params
from pipeline.data import hpatches
from pipeline.demo.hpatches import HPatchesDemoSpec, generate
from pipeline.evaluation.homography import accuracy
from pipeline.workflows.hpatches import match_store
from test_homography import dift_eval, dift_sample

CANVAS, GRID = 256, 32  # a map of 32 x 32 cells over the squashed canvas (stride 8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("hpatches") / "hpatches-demo", HPatchesDemoSpec(seed=1, sequences=4))
    params = Params(datasets=DatasetsParams(hpatches=HPatchesParams(
        root=str(root), keypoints="files", keypoint_files=str(root.parent / "superpoint-1k"), canvas=CANVAS,
        backbones={"position": DatasetBackbone(model="none")})))
    return root, params


def cell_positions(width: int, height: int) -> np.ndarray:
    """(GRID, GRID, 2): the original-pixel (x, y) each cell stands for under DIFT's sampling, whose
    normalisation (x - c) / c with c = (W - 1) / 2 and align_corners=False puts cell j at x = (2j + 1) c / GRID."""
    j = np.arange(GRID)
    xs, ys = (2 * j + 1) * (width - 1) / 2 / GRID, (2 * j + 1) * (height - 1) / 2 / GRID
    return np.stack(np.meshgrid(xs, ys), axis=-1)


def embed(points: np.ndarray, scale: float) -> np.ndarray:
    """Unit-norm Fourier features of positions: cosine similarity is highest where the positions coincide
    (the longest wavelength is longer than the image, the shortest resolves a few pixels)."""
    freqs = 2 * np.pi / (scale * np.array([2.0, 1.0, 0.5, 0.25, 0.125]))
    angles = points[..., :, None] * freqs  # (..., 2, F)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).reshape(*points.shape[:-1], -1) / np.sqrt(len(freqs) * 2)


def position_store(root, path, shuffle: bool = False, noise: float = 0.0) -> str:
    """A features store of the demo whose features at each cell embed the image-1 position it shows (mapped
    back through H_1_k); `shuffle`: each target's map reversed along x; `noise`: Gaussian, seeded."""
    images = hpatches.images_table(root)
    table = images.assign(valid_x0=0.0, valid_y0=0.0, valid_x1=float(CANVAS), valid_y1=float(CANVAS))
    attrs = {"kind": "features", "name": "position", "dataset": {"name": "hpatches"}, "preprocessing": {"canvas": CANVAS},
             "determinants": {"shuffle": shuffle}}
    store = FeatureStore.create(path, attrs, table[["image", "category", "width", "height", "valid_x0", "valid_y0",
                                                    "valid_x1", "valid_y1"]], [0])
    truths = {(p.sequence, p.target): p.homography for p in hpatches.pairs(root)}
    rng = np.random.default_rng(0)
    scale = float(images["width"].max())
    for index, row in images.iterrows():
        sequence, k = row["image"].split("/")
        cells = cell_positions(int(row["width"]), int(row["height"]))
        if k != "1":
            inverse = np.linalg.inv(truths[(sequence, int(k))])
            mapped = np.concatenate([cells, np.ones((*cells.shape[:2], 1))], axis=-1) @ inverse.T
            cells = mapped[..., :2] / mapped[..., 2:]
        features = embed(cells, scale) + noise * rng.standard_normal((GRID, GRID, 20))
        if shuffle and k != "1":
            features = features[:, ::-1]
        node = store.ensure_layer("position", {"features": (("timestep", "y", "x", "channel"), (1, GRID, GRID, 20))},
                                  {"y": (np.arange(GRID) + 0.5) * CANVAS / GRID, "x": (np.arange(GRID) + 0.5) * CANVAS / GRID,
                                   "channel": np.arange(20)}, {"stride": CANVAS / GRID}, dtype="float32")
        node["features"][index] = features[None].astype(np.float32)
        store.mark_done(index, 0.0, 0)
    return path


def test_features_of_position_give_every_true_homography_and_shuffled_ones_do_not(demo, tmp_path):
    root, params = demo
    exact = match_store(params, "position", position_store(root, tmp_path / "exact.zarr"))
    assert len(exact) == 20 and set(exact["kind"]) == {"i", "v"}  # 4 sequences x 5 pairs
    assert (exact["corner_error"] < 1.0).all(), exact[["sequence", "target", "matches", "corner_error"]]
    table = accuracy(exact, ["backbone"])
    assert (table["accuracy"] == 100.0).all()

    shuffled = match_store(params, "position", position_store(root, tmp_path / "shuffled.zarr", shuffle=True))
    overall = accuracy(shuffled, ["backbone"]).set_index(["subset", "threshold"])["accuracy"]
    assert overall[("all", 5)] <= 20.0, shuffled[["sequence", "target", "matches", "corner_error"]]


def test_difts_evaluation_fed_our_descriptors_gives_our_accuracies(demo, tmp_path):
    root, params = demo
    path = position_store(root, tmp_path / "noisy.zarr", noise=0.25)  # noise: some pairs fail, not all
    ours = match_store(params, "position", path)
    table = accuracy(ours, ["backbone"]).set_index(["subset", "threshold"])["accuracy"]
    assert all(0 < table[("all", t)] < 100 for t in (1, 3, 5)), ours["corner_error"].tolist()

    # DIFT's eval_hpatches.py sampling (transcribed) on the stored maps, then its eval_homography.py.
    store = FeatureStore.open(path)
    images = store.images().set_index("image")
    folder = root.parent / "superpoint-1k"

    def described(key):
        width, height = int(images.at[key, "width"]), int(images.at[key, "height"])
        points = hpatches.read_keypoints(hpatches.keypoint_file(folder, key), width, height)
        ft = torch.from_numpy(store["position/features"][int(np.flatnonzero(images.index == key)[0]), 0]).permute(2, 0, 1)[None]
        return points, dift_sample(ft.float(), points, width, height)

    sequences = []
    for sequence in hpatches.sequences(root):
        points, descriptors = described(f"{sequence}/1")
        others = [(*described(f"{sequence}/{k}"), hpatches.read_homography(root / sequence / f"H_1_{k}")) for k in range(2, 7)]
        sequences.append((sequence, points, descriptors, int(images.at[f"{sequence}/1", "height"]),
                          int(images.at[f"{sequence}/1", "width"]), others))
    overall, i_acc, v_acc, dists = dift_eval(sequences, "cosine", "lmeds")
    np.testing.assert_allclose(ours["corner_error"].to_numpy(), dists, rtol=1e-6)
    for subset, theirs in (("all", overall), ("i", i_acc), ("v", v_acc)):
        np.testing.assert_allclose([table[(subset, t)] for t in (1, 3, 5)], theirs)


def test_a_store_of_another_dataset_is_refused(demo_stores, demo):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="not a store of HPatches images"):
        match_store(demo[1], "position", demo_stores["stores"]["vae-sd3"])


def test_hpatches_stores_are_built_with_the_datasets_changes_and_checked_against_them(demo, tiny_models, tmp_path):
    """extract_store: the backbone as datasets.hpatches.backbones changes it (timesteps, prompt), on the dataset's
    canvas; a reader compares the store with that, not with the backbone's SPair settings."""
    from dataclasses import replace

    from pipeline.cache.current import staleness
    from pipeline.config import BackboneParams, EncoderParams
    from pipeline.workflows.hpatches import extract_store

    root, _ = demo
    model = tiny_models["tiny-sd3"]
    params = Params(
        store=str(tmp_path / "store"), check_disk=False,
        encoders={"tiny-sd3": EncoderParams(model=model, canvas=128)},
        backbones={"sd3": BackboneParams(kind="sd3", model=model, latents="tiny-sd3", layers=["transformer_blocks.1"],
                                         timesteps=[261], ensemble=1, prompt="a photo of a {category}")},
        datasets=DatasetsParams(hpatches=HPatchesParams(root=str(root), canvas=64, backbones={
            "sd3": DatasetBackbone(model=model, timesteps=[0])})))
    path = extract_store(params, "sd3")
    store = FeatureStore.open(path)
    assert store.timesteps() == [0] and store.attrs["prompt"] == "" and store.attrs["preprocessing"]["canvas"] == 64
    assert store.attrs["dataset"]["name"] == "hpatches" and len(store.keys()) == 24
    assert store["transformer_blocks.1/features"].shape[2:4] == (4, 4)  # 64 px canvas / 16 px tokens
    assert staleness(path, params) is None
    # The SPair settings the dataset overrides do not make it stale; the dataset's own do.
    spair_prompt = replace(params, backbones={"sd3": replace(params.backbones["sd3"], prompt="another {category}")})
    assert staleness(path, spair_prompt) is None
    other = replace(params, datasets=DatasetsParams(hpatches=replace(params.datasets.hpatches, backbones={
        "sd3": DatasetBackbone(model=model, timesteps=[101])})))
    assert "timesteps: [0] -> [101]" in staleness(path, other)


def test_download_fetches_the_release_the_reader_reads(tmp_path):
    """`download hpatches` (pipeline/data/download.py, as for SPair): fetched from a local server, checked
    against its sha256, unpacked to the folder the reader reads."""
    import hashlib
    import io
    import tarfile
    import threading
    from http.server import ThreadingHTTPServer

    from pipeline.data.download import DATASETS, download
    from test_download import Handler, Serving

    root = generate(tmp_path / "made" / "hpatches-sequences-release", HPatchesDemoSpec(seed=2, sequences=2, keypoints=None))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root, arcname=DATASETS["hpatches"].folder)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.serving = Serving(body=buffer.getvalue())
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{DATASETS['hpatches'].archive}"
        folder = download("hpatches", tmp_path / "data", url=url, sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert folder == tmp_path / "data" / "hpatches-sequences-release"
    assert hpatches.images_table(folder).equals(hpatches.images_table(root))
    assert [p.sequence for p in hpatches.pairs(folder)] == [p.sequence for p in hpatches.pairs(root)]


def test_a_study_of_one_kind_of_sequence_and_a_root_without_any(demo, tmp_path):
    """`exclude` leaves only illumination sequences: the viewpoint columns are there, empty, and nothing fails;
    a root that holds no sequence is one line, before any model loads."""
    from dataclasses import replace

    from pipeline.errors import PipelineError
    from pipeline.evaluation.homography import best_variants, wide, write_metrics

    root, params = demo
    only_i = replace(params, datasets=DatasetsParams(hpatches=replace(
        params.datasets.hpatches, exclude=[s for s in hpatches.sequences(root) if s.startswith("v_")])))
    frame = match_store(only_i, "position", position_store(root, tmp_path / "exact.zarr"))
    assert set(frame["kind"]) == {"i"} and len(frame) == 10
    (tmp_path / "p").mkdir()
    frame.to_parquet(tmp_path / "p" / "position.parquet")
    summary = write_metrics([tmp_path / "p" / "position.parquet"], tmp_path / "metrics")
    assert "all <= 1 px 100.0" in summary
    table = pd.read_csv(tmp_path / "metrics" / "accuracy.csv")
    assert wide(table)["v <= 3 px"].isna().all() and (wide(table)["i <= 1 px"] == 100.0).all()
    assert best_variants(table)["position"]["accuracy"]["v <= 5 px"] is None
    with pytest.raises(PipelineError) as failed:
        hpatches.sequences(tmp_path / "metrics")
    assert "\n" not in str(failed.value) and "no HPatches sequences here" in str(failed.value)
    with pytest.raises(PipelineError, match="all left out by exclude"):
        hpatches.sequences(root, exclude=hpatches.sequences(root))
