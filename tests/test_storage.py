import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import zarr

from pipeline.cache import codecs
from pipeline.matching.maps import StoreMaps
from pipeline.errors import PipelineError

LAYERS = ["transformer_blocks.1", "transformer_blocks.3"]


def chunk(rng, cells=(12, 10), channels=96, rank=6) -> np.ndarray:
    """Low-rank cells plus noise, with two outsized channels of opposite signs, float16, (1, 1, h, w, C)."""
    n = cells[0] * cells[1]
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, channels)) + 0.01 * rng.standard_normal((n, channels))
    x[:, 7] = 200 + 5 * rng.standard_normal(n)
    x[:, 61] = -120 + 3 * rng.standard_normal(n)
    return x.astype(np.float16).reshape(1, 1, *cells, channels)


def written(values: np.ndarray, storage: str, basis=None) -> tuple[np.ndarray, int]:
    """(values read back, bytes of the chunk before compression) through a one-chunk Zarr array."""
    memory = zarr.storage.MemoryStore()
    settings = codecs.codecs(storage, basis)
    settings.pop("compressors")  # measure the serializer's bytes
    array = zarr.create_array(memory, shape=values.shape, dtype="float16", chunks=values.shape, fill_value=np.nan,
                              compressors=None, **settings)
    array[:] = values
    size = sum(len(v) for k, v in memory._store_dict.items() if not k.endswith("zarr.json"))
    return array[:], size


def test_lossless_choices_round_trip():
    values = chunk(np.random.default_rng(0))
    for storage in ("float16", "float16-shuffle"):
        assert np.array_equal(written(values, storage)[0], values)


def test_the_codecs_casts_are_numpys_bit_for_bit():
    """float16 <-> float32 through torch (codecs.cast): every finite float16, and float32 values across
    float16's range (subnormals, ties, overflow to inf) round exactly as numpy's astype."""
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)]
    assert np.array_equal(codecs.cast(halves, np.float32).view(np.uint32), halves.astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(0)
    singles = (rng.standard_normal(200_000) * np.exp(rng.uniform(-20, 12, 200_000))).astype(np.float32)
    ties = halves.astype(np.float32)[:-1] + np.diff(halves.astype(np.float32)) / 2  # halfway: to even
    singles = np.concatenate([singles, ties, np.float32([65519.99, 65520.0, 7e4, -7e4, 2**-25, 2**-26])])
    with np.errstate(over="ignore"):
        assert np.array_equal(codecs.cast(singles, np.float16).view(np.uint16), singles.astype(np.float16).view(np.uint16))
    assert codecs.cast(halves.reshape(-1, 2)[:, 0], np.float32).dtype == np.float32  # strided input


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in /proc")
def test_a_cast_in_zarrs_worker_threads_starts_no_threads_of_its_own():
    """Zarr codes chunks in worker threads. A cast over many of torch's grains runs on the calling thread
    (codecs.cast), where torch's own parallel cast starts an OpenMP team in each such thread, whose spinning
    threads take the cores the rest of the extraction needs."""
    import threading

    import torch

    values = np.random.default_rng(0).standard_normal(10 * codecs.TORCH_GRAIN + 7).astype(np.float16)
    started = {}

    def count_threads_started(name, cast):
        cast(values[:8])  # torch's per-thread setup
        before = len(list(Path("/proc/self/task").iterdir()))
        cast(values)
        started[name] = len(list(Path("/proc/self/task").iterdir())) - before

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as in extraction on 2 CPUs (other test modules set 1)
    try:
        for name, cast in [("codecs", lambda v: codecs.cast(v, np.float32)), ("torch", lambda v: torch.from_numpy(v).float())]:
            worker = threading.Thread(target=count_threads_started, args=(name, cast))
            worker.start()
            worker.join()
    finally:
        torch.set_num_threads(threads)
    if not started["torch"]:
        pytest.skip("torch's parallel cast starts no thread on this build: nothing to tell apart")
    assert started["codecs"] == 0


def test_chunks_are_coded_on_one_blas_thread_until_the_last_one_ends():
    """OneBlasThread: numpy's BLAS runs one thread while any chunk codes, and gets its threads back only
    when the last concurrent coder ends (threadpoolctl's limits are per process)."""
    from threadpoolctl import ThreadpoolController, threadpool_limits

    def threads():
        return {lib["filepath"]: lib["num_threads"] for lib in ThreadpoolController().info() if lib["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):
        before = threads()
        assert before and set(before.values()) == {2}
        first = codecs.OneBlasThread()
        first.__enter__()
        first.__enter__()  # a second chunk, coded at the same time
        assert set(threads().values()) == {1}
        first.__exit__(None, None, None)
        assert set(threads().values()) == {1}  # the other chunk is still coding
        first.__exit__(None, None, None)
        assert threads() == before


def images_of_one_subspace(rng, images=5, cells=(12, 10), channels=96, rank=6, noise=0.01) -> list[np.ndarray]:
    """Chunks (1, 1, h, w, C) float16 of several images whose cells share one rank-`rank` subspace (plus
    `noise` off it, relative), with two outsized channels of opposite signs."""
    mixing = rng.standard_normal((rank, channels))
    chunks = []
    for _ in range(images):
        x = rng.standard_normal((cells[0] * cells[1], rank)) @ mixing
        x += noise * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(channels) * rng.standard_normal(x.shape)
        x[:, 7] = 200 + 5 * rng.standard_normal(len(x))
        x[:, 61] = -120 + 3 * rng.standard_normal(len(x))
        chunks.append(x.astype(np.float16).reshape(1, 1, *cells, channels))
    return chunks


def fitted(chunks, components: int) -> codecs.Basis:
    moments = codecs.LayerMoments()
    for values in chunks:
        moments.add(values[0, 0])
    return moments.fit(components)


def test_pca_axes_are_the_leading_subspace_of_the_sample():
    chunks = images_of_one_subspace(np.random.default_rng(1), rank=6)
    basis = fitted(chunks[:4], 6)
    assert basis.exact == (7, 61) and basis.axes.dtype == np.float16 and basis.axes.shape == (6, 94)
    # Independently: numpy's SVD of the sample's cells, each centred over its other channels (uncentred PCA).
    cells = np.concatenate([c.reshape(-1, 96) for c in chunks[:4]]).astype(np.float64)
    others = np.delete(cells, [7, 61], axis=1)
    expected = np.linalg.svd(others - others.mean(axis=1, keepdims=True), full_matrices=False)[2][:6]
    cosines = np.linalg.svd(expected @ np.linalg.qr(basis.axes.astype(np.float64).T)[0], compute_uv=False)
    assert cosines.min() > 0.9999  # the same subspace (principal angles ~ 0)
    # The same sample gives the same axes, bit for bit.
    assert np.array_equal(fitted(chunks[:4], 6).axes, basis.axes)


def test_pca_decodes_the_projection_on_the_layers_axes_with_exact_channels_and_statistics():
    chunks = images_of_one_subspace(np.random.default_rng(2), rank=6, noise=0.01)
    basis = fitted(chunks[:4], 6)
    values = chunks[4]  # an image the fit never saw
    decoded, size = written(values, "pca:6", basis)
    x, y = values.astype(np.float64).reshape(-1, 96), decoded.astype(np.float64).reshape(-1, 96)
    assert np.array_equal(y[:, [7, 61]], x[:, [7, 61]])
    np.testing.assert_allclose(y.mean(axis=1), x.mean(axis=1), atol=2e-2)  # float16 rounding of values ~200
    np.testing.assert_allclose(y.std(axis=1), x.std(axis=1), rtol=2e-3)
    # What is lost is what lies off the axes: each cell's (mean-centred) residual, computed independently by
    # least squares on the stored float16 axes; int16 coefficients add next to nothing to it.
    others = np.delete(x, [7, 61], axis=1)
    centred = others - others.mean(axis=1, keepdims=True)
    axes = basis.axes.astype(np.float64)
    residual = centred - np.linalg.lstsq(axes.T, centred.T, rcond=None)[0].T @ axes
    error = np.delete(y - x, [7, 61], axis=1)
    ratio = np.linalg.norm(error) / np.linalg.norm(residual)
    assert 0.98 < ratio < 1.05, ratio
    assert size == codecs.layer_pca_bytes(120, 6, 2) == 4 * 6 + 2 * 120 * 6 + 2 * 120 * 2 + 8 * 120
    assert size <= codecs.chunk_bytes("pca:6", values.shape)  # what `plan` counts is an upper bound


def test_pca_cosines_across_images_err_to_second_order():
    """Two images encoded on the same axes: their cells' cosines err by about the product of the two cells'
    residuals, not by the residual itself (which is what an encoding with its own axes per image, or
    coefficients rounded to a coarse grid, would give)."""
    chunks = images_of_one_subspace(np.random.default_rng(3), rank=6, noise=0.03)
    basis = fitted(chunks[:3], 6)
    cells = [np.delete(c.reshape(-1, 96).astype(np.float64), [7, 61], axis=1) for c in chunks[3:]]
    decoded = [np.delete(written(c, "pca:6", basis)[0].reshape(-1, 96).astype(np.float64), [7, 61], axis=1) for c in chunks[3:]]

    def cosines(a, b):
        a, b = (v - v.mean(axis=1, keepdims=True) for v in (a, b))  # as after layernorm
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T

    error = np.abs(cosines(*decoded) - cosines(*cells))
    relative = [np.linalg.norm(d - c, axis=1) / np.linalg.norm(c - c.mean(axis=1, keepdims=True), axis=1)
                for c, d in zip(cells, decoded)]
    assert 0.02 < np.median(relative[0]) < 0.05  # residuals of ~3%
    bound = 2 * np.outer(relative[0], relative[1]) + 2e-3 * 2**-10 * 100  # + float16 rounding of the values
    assert (error <= bound).all(), float((error / bound).max())
    assert error.max() < 0.1 * np.median(relative[0])  # far below first order


def test_pca_configuration_round_trips_and_chunks_encode_the_same_bytes_alone_or_beside_others():
    from concurrent.futures import ThreadPoolExecutor

    chunks = images_of_one_subspace(np.random.default_rng(4), images=6, cells=(16, 16), channels=128, rank=40)
    basis = fitted(chunks, 24)
    codec = codecs.LayerPCA(basis)
    again = codecs.LayerPCA.from_dict(json.loads(json.dumps(codec.to_dict())))
    assert again == codec and again.basis.exact == basis.exact and np.array_equal(again.basis.axes, basis.axes)
    alone = [codecs.pca_encode(values, basis) for values in chunks]
    with ThreadPoolExecutor(max_workers=6) as pool:  # extraction writes an image's chunks at once
        for _ in range(3):
            assert list(pool.map(lambda values: codecs.pca_encode(values, basis), chunks)) == alone


@pytest.fixture(scope="module")
def compact_stores(demo_stores, tmp_path_factory):
    from pipeline.cache.extract import extract
    from pipeline.config import BackboneParams

    base = tmp_path_factory.mktemp("compact")
    out = {"float16": demo_stores["stores"]["tiny-sd3"]}  # the same parameters, kept as float16
    for storage in ("pca:16",):
        params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3", layers=LAYERS,
                                timesteps=[261], ensemble=1, storage=storage, fit_images=8)
        out[storage] = extract(params, "tiny-sd3", demo_stores["latents"]["tiny-sd3"], base / f"{storage}.zarr")
    return out


@pytest.mark.slow
def test_a_pca_store_fits_its_axes_on_its_sample_and_is_the_same_store_again(compact_stores, demo_stores, tmp_path):
    from pipeline.cache.extract import extract, fit_sample
    from pipeline.config import BackboneParams

    root = zarr.open_group(compact_stores["pca:16"], mode="r")
    keys = list(root["image"][:])
    assert root.attrs["fit_images"] == [keys[i] for i in fit_sample(len(keys), 8, 0)] and len(set(root.attrs["fit_images"])) == 8
    # The axes are those of the sample's float16 features: the float16 store's rows of those images.
    reference = zarr.open_group(compact_stores["float16"], mode="r")
    rows = [list(reference["image"][:]).index(image) for image in root.attrs["fit_images"]]
    for layer in LAYERS:
        moments = codecs.LayerMoments()
        for row in rows:
            moments.add(reference[layer]["features"][row, 0])
        codec = root[layer]["features"].metadata.codecs[0]
        assert isinstance(codec, codecs.LayerPCA) and np.array_equal(codec.basis.axes, moments.fit(16).axes)
    # Same parameters and seed: the same store, bit for bit (axes, chunks).
    params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3", layers=LAYERS,
                            timesteps=[261], ensemble=1, storage="pca:16", fit_images=8)
    again = extract(params, "tiny-sd3", demo_stores["latents"]["tiny-sd3"], tmp_path / "again.zarr")
    for layer in LAYERS:
        first, second = (Path(path) / layer / "features" for path in (compact_stores["pca:16"], again))
        assert json.loads((first / "zarr.json").read_text()) == json.loads((second / "zarr.json").read_text())
        chunks = sorted(p.relative_to(first) for p in (first / "c").rglob("*") if p.is_file())
        assert len(chunks) == len(keys)
        assert all((first / chunk).read_bytes() == (second / chunk).read_bytes() for chunk in chunks)


def test_the_fidelity_sample_leaves_out_the_images_that_fitted_the_axes():
    import pandas as pd

    from pipeline.workflows.fidelity import sample_pairs

    pairs = pd.DataFrame({"src_image": [f"a/{i}" for i in range(10)], "trg_image": [f"b/{i}" for i in range(10)]})
    fit = ["a/0", "b/3", "b/4"]
    chosen, sample = sample_pairs(pairs, 8, avoid=fit)
    assert len(chosen) == 8 and not set(chosen) & set(fit) and len(sample) == 4
    assert sample_pairs(pairs.iloc[[0, 3]], 8, avoid=fit)[0] == ["a/0", "a/3", "b/0", "b/3"]  # nothing else left


def test_a_compact_store_reads_as_the_same_store(compact_stores, demo_stores):
    reference = StoreMaps(compact_stores["float16"])
    # The default keeps the fingerprint stores had before the knob existed: storage is not a determinant.
    assert "storage" not in reference.root.attrs["determinants"]
    maps = StoreMaps(compact_stores["pca:16"])
    assert maps.root.attrs["determinants"]["storage"] == "pca:16" and maps.fingerprint != reference.fingerprint
    for image in maps.images.index[:5]:
        x, y = reference.raw(image, LAYERS[0], 261), maps.raw(image, LAYERS[0], 261)
        # 16 of the tiny model's 32 channels: lossy, but each cell's mean and std are kept
        assert np.allclose(y.mean(-1), x.mean(-1), atol=2e-3) and np.allclose(y.std(-1), x.std(-1), rtol=2e-3)
    # xarray, in a process whose code never imports this package: Zarr finds the codecs by their entry points.
    script = (
        "import json, sys, xarray as xr\n"
        "tree = xr.open_datatree(sys.argv[1], engine='zarr')\n"
        f"f = tree['{LAYERS[0]}'].ds['features']\n"
        "print(json.dumps({'dims': list(f.dims), 'values': f.isel(image=2, timestep=0).values.astype(float).ravel()[:50].tolist()}))\n"
    )
    for storage in ("pca:16",):
        found = json.loads(subprocess.run([sys.executable, "-c", script, str(compact_stores[storage])], check=True,
                                          capture_output=True, text=True).stdout)
        maps = StoreMaps(compact_stores[storage])
        assert found["dims"] == ["image", "timestep", "y", "x", "channel"]
        assert np.array_equal(np.float32(found["values"]), maps.raw(maps.images.index[2], LAYERS[0], 261).ravel()[:50])


@pytest.mark.slow
def test_matching_reads_compact_stores_as_their_decoded_values(compact_stores, demo_stores, tmp_path):
    """match on a pca store gives exactly what it gives on a float16 store holding the decoded values."""
    import shutil

    from pipeline.matching.match import match_store

    decoded = shutil.copytree(compact_stores["float16"], tmp_path / "decoded.zarr")
    group, compact = zarr.open_group(decoded, mode="r+", use_consolidated=False), zarr.open_group(compact_stores["pca:16"], mode="r")
    assert list(group["image"][:]) == list(compact["image"][:])
    for layer in LAYERS:
        values = compact[layer]["features"][:]
        assert not np.array_equal(values, group[layer]["features"][:])  # lossy: the comparison can fail
        group[layer]["features"][:] = values
    specs, columns = ["raw", "drop:auto+adaln"], ["pair", "keypoint", "layer", "transform", "pred_x", "pred_y"]
    ours = match_store(compact_stores["pca:16"], demo_stores["pairs"], transform_specs=specs, statistics="none")
    theirs = match_store(decoded, demo_stores["pairs"], transform_specs=specs, statistics="none")
    assert len(ours) and ours[columns].equals(theirs[columns])


def test_bad_storage_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    """params.yaml's schema refuses an unknown storage when the file is read (extract() takes parameters
    already validated): one line naming the file, the key, what is expected and what was given, and
    `extract` writes nothing."""
    import yaml
    from click.testing import CliRunner

    from cli import cli
    from conftest import REPO
    from pipeline.config import load_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in params["backbones"].values():  # models/ of a fresh clone: the ViT patch from the default
        name["model"] = name["model"].replace("models/", "absent/")
    params["backbones"]["sd3"]["storage"] = "int4"
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    line = "params.yaml: backbones.sd3.storage: expected float16, float16-shuffle or pca:<K>, got 'int4'"
    with pytest.raises(PipelineError) as error:
        load_params()
    assert str(error.value) == line
    result = CliRunner().invoke(cli, ["extract", "--backbone", "sd3", "--store", str(tmp_path / "sd3.zarr")])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: {line}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_a_lossy_store_measures_its_fidelity_and_verify_holds_it_to_params(compact_stores, demo_stores, tmp_path):
    import shutil

    from click.testing import CliRunner

    from cli import cli
    from pipeline.workflows import fidelity
    from pipeline.cache.verify import fidelity_problems
    from pipeline.config import BackboneParams
    from pipeline.evaluation import metrics
    from pipeline.matching.match import match_store

    path = shutil.copytree(compact_stores["pca:16"], tmp_path / "pca.zarr")
    params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3", layers=LAYERS,
                            timesteps=[261], ensemble=1, storage="pca:16", fit_images=8)
    pairs = demo_stores["pairs"]
    specs = ["raw", "drop:auto+adaln"]
    chosen, sample = fidelity.sample_pairs(pairs, 10)
    measured = fidelity.measure(params, "tiny-sd3", demo_stores["latents"]["tiny-sd3"], path, sample, chosen, specs)
    assert not Path(f"{path}.fidelity-reference").exists()
    assert len(chosen) <= 10 and len(sample) and set(sample["src_image"]) | set(sample["trg_image"]) <= set(chosen)
    # Independently: the float16 store of the same parameters (all images) matched on the same pairs.
    ours = match_store(path, sample, transform_specs=specs, statistics="none")
    theirs = match_store(compact_stores["float16"], sample, transform_specs=specs, statistics="none")
    for layer in LAYERS:
        mine, other = ours[ours["layer"] == layer], theirs[theirs["layer"] == layer]
        same = (mine[["pred_x", "pred_y"]].to_numpy() == other[["pred_x", "pred_y"]].to_numpy()).all(1).mean()
        assert measured[layer]["identical"] == pytest.approx(same)
        pck = [metrics.pck_table(t, alphas=(0.1,)).query("category == 'all' and kind == 'per_image'")
               .set_index("transform")["pck"] for t in (mine, other)]
        assert measured[layer]["pck_change"] == pytest.approx(100 * (pck[0] - pck[1]).abs().max())
    # The scale: the float16 store rounded to bfloat16 (round to nearest even on float32's top 16 bits).
    rounded = shutil.copytree(compact_stores["float16"], tmp_path / "rounded.zarr")
    group = zarr.open_group(rounded, mode="r+", use_consolidated=False)
    for layer in LAYERS:
        bits = group[layer]["features"][:].astype(np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        group[layer]["features"][:] = bits.view(np.float32).astype(np.float16)
    floor = match_store(rounded, sample, transform_specs=specs, statistics="none")
    for layer in LAYERS:
        mine, other = floor[floor["layer"] == layer], theirs[theirs["layer"] == layer]
        same = (mine[["pred_x", "pred_y"]].to_numpy() == other[["pred_x", "pred_y"]].to_numpy()).all(1).mean()
        assert measured[layer]["bfloat16_identical"] == pytest.approx(same)
    assert any(measured[layer]["bfloat16_identical"] < 1 for layer in LAYERS)  # the rounding moved something
    root = zarr.open_group(path, mode="r")
    assert root.attrs["fidelity"]["layers"] == measured and root.attrs["fidelity"]["storage"] == "pca:16"
    runner = CliRunner()
    info = runner.invoke(cli, ["info", "--store", str(path)])
    assert f"{LAYERS[0]}: {measured[LAYERS[0]]['identical']:.1%} identical predictions" in info.output
    strict = tmp_path / "strict.yaml"
    strict.write_text("fidelity: {min_identical: 1.0, max_pck_change: 0.0}\n")
    result = runner.invoke(cli, ["verify", "--store", str(path), "--params", str(strict)])
    below = [layer for layer, f in measured.items() if f["identical"] < 1.0]
    assert result.exit_code == (1 if below else 0)
    for layer in below:
        found = measured[layer]
        assert (f"(store): fidelity: {layer}: {found['identical']:.1%} of predictions identical to float16 < 100% "
                f"(bfloat16 rounding: {found['bfloat16_identical']:.1%}, {found['bfloat16_pck_change']:.2f} points)"
                in result.output)
    lenient = tmp_path / "lenient.yaml"
    worst = min(f["identical"] for f in measured.values()), max(f["pck_change"] for f in measured.values())
    lenient.write_text(f"fidelity: {{min_identical: {worst[0]!r}, max_pck_change: {worst[1]!r}}}\n")  # the store's own worst
    assert runner.invoke(cli, ["verify", "--store", str(path), "--params", str(lenient)]).exit_code == 0
    # A lossy store that never measured itself is a problem, not a pass.
    unmeasured = zarr.open_group(compact_stores["pca:16"], mode="r").attrs.asdict()
    assert fidelity_problems(unmeasured, 0.5, 50) == [("fidelity", "pca:16 store without fidelity figures "
                                                                   "(extraction did not finish measuring)")]


def test_a_lossy_stores_fingerprint_holds_its_codecs_code():
    from pipeline.cache.extract import _determinants
    from pipeline.cache.provenance import module_classes
    from pipeline.config import BackboneParams

    latents = {"fingerprint": "f"}
    params = BackboneParams(kind="sd3", model="", latents="l", layers=LAYERS)
    # Every codec class's methods: Zarr calls them through its registry, not the extraction's code.
    methods = {f"pipeline.cache.codecs.{cls.__name__}.{name}" for cls in module_classes(codecs)
               for name, member in vars(cls).items()  # written in codecs.py (not a dataclass's generated ones)
               if getattr(getattr(member, "__code__", None), "co_filename", None) == codecs.__file__}
    assert "pipeline.cache.codecs.LayerMoments.fit" in methods
    assert not methods <= set(_determinants(params, latents)["code"])  # float16: the pca fit does not run
    for storage in ("pca:64", "float16-shuffle"):
        found = _determinants(BackboneParams(kind="sd3", model="", latents="l", layers=LAYERS, storage=storage), latents)
        assert methods <= set(found["code"]) and found["storage"] == storage


def test_bfloat16_rounding_keeps_eight_significant_bits_within_float16s_range():
    from pipeline.workflows.fidelity import bfloat16_rounding

    x = np.array([1 + 2**-8, 1 + 2**-7, 1 + 3 * 2**-8, 300.5, 65504, -65504, 2**-20], np.float16)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1); 1 + 3 x 2^-8 ties to 1 + 2^-6; 300.5 -> 300;
    # 65504 would round up to 65536 (inf as float16): kept at float16's largest.
    expected = np.array([1, 1 + 2**-7, 1 + 2**-6, 300, 65504, -65504, 2**-20], np.float16)
    assert np.array_equal(bfloat16_rounding(x), expected)


@pytest.mark.slow
def test_a_lossy_store_below_the_fidelity_bar_stops_before_its_other_images(demo_stores, tmp_path):
    import os

    from pipeline.cache.store import FeatureStore
    from pipeline.workflows import fidelity
    from pipeline.cache.extract import fit_sample
    from pipeline.config import BackboneParams, DataParams, FidelityParams, Params

    (tmp_path / "latents").mkdir()
    os.symlink(demo_stores["latents"]["tiny-sd3"], tmp_path / "latents" / "tiny-sd3.zarr")
    demo_stores["pairs"].to_parquet(tmp_path / "pairs.parquet")
    backbone = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3", layers=LAYERS,
                              timesteps=[261], ensemble=1, storage="pca:4", fit_images=6)
    params = Params(data=DataParams(pairs=str(tmp_path / "pairs.parquet")), backbones={"sd3": backbone},
                    store=str(tmp_path), fidelity=FidelityParams(images=6))
    out = tmp_path / "sd3.zarr"
    with pytest.raises(PipelineError) as error:
        fidelity.extract_measured(params, "sd3", out)  # 4 of 32 channels: far below 98%
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{out}: fidelity: transformer_blocks.1: ")
    assert "of predictions identical to float16 < 98%" in message and "before the other 24" in message
    root = zarr.open_group(out, mode="r", use_consolidated=False)
    keys = list(root["image"][:])
    fitted = [keys[i] for i in fit_sample(len(keys), 6, 0)]
    done = [key for key, finished in zip(keys, FeatureStore.as_written(out).done_mask()) if finished]
    figures = root.attrs["fidelity"]
    # Only the sample is extracted, none of it among the images that fitted the axes, and it was measured.
    assert len(done) == figures["images"] == 6 and not set(done) & set(fitted) and figures["images_in_fit"] == 0
    assert root.attrs["fit_images"] == fitted
    # Relaxed thresholds: the same store resumes with the figures it has, and finishes.
    relaxed = Params(data=params.data, backbones=params.backbones, store=str(tmp_path),
                     fidelity=FidelityParams(images=6, min_identical=0.0, max_pck_change=100.0))
    assert fidelity.extract_measured(relaxed, "sd3", out) == figures["layers"]
    root = zarr.open_group(out, mode="r")
    assert FeatureStore.open(out).done_mask().all() and root.attrs["fidelity"] == figures and root.attrs["fit_images"] == fitted
    # Another sample (fidelity.images) is measured again: figures are never those of other pairs.
    smaller = Params(data=params.data, backbones=params.backbones, store=str(tmp_path),
                     fidelity=FidelityParams(images=4, min_identical=0.0, max_pck_change=100.0))
    fidelity.extract_measured(smaller, "sd3", out)
    again = zarr.open_group(out, mode="r", use_consolidated=False).attrs["fidelity"]
    assert again["images"] == len(again["sample"]) == 4 and again["sample"] != figures["sample"]
