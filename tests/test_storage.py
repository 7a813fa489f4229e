import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import zarr

from pipeline.cache import codecs
from pipeline.cache.maps import StoreMaps
from pipeline.errors import PipelineError

LAYERS = ["transformer_blocks.1", "transformer_blocks.3"]


def chunk(rng, cells=(12, 10), channels=96, rank=6) -> np.ndarray:
    """Low-rank cells plus noise, with two outsized channels of opposite signs, float16, (1, 1, h, w, C)."""
    n = cells[0] * cells[1]
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, channels)) + 0.01 * rng.standard_normal((n, channels))
    x[:, 7] = 200 + 5 * rng.standard_normal(n)
    x[:, 61] = -120 + 3 * rng.standard_normal(n)
    return x.astype(np.float16).reshape(1, 1, *cells, channels)


def written(values: np.ndarray, storage: str) -> tuple[np.ndarray, int]:
    """(values read back, bytes of the chunk before compression) through a one-chunk Zarr array."""
    kind, _ = codecs.parse_storage(storage)
    memory = zarr.storage.MemoryStore()
    settings = codecs.codecs(storage)
    settings.pop("compressors")  # measure the serializer's bytes
    array = zarr.create_array(memory, shape=values.shape, dtype="float16", chunks=values.shape, fill_value=np.nan,
                              compressors=None, **settings)
    array[:] = values
    size = sum(len(v) for k, v in memory._store_dict.items() if not k.endswith("zarr.json"))
    return array[:], size


def test_lossless_and_int8_round_trips():
    values = chunk(np.random.default_rng(0))
    for storage in ("float16", "float16-shuffle"):
        assert np.array_equal(written(values, storage)[0], values)
    values[0, 0, 3] *= 0.01  # a row of cells of small norm
    decoded, size = written(values, "int8")
    assert size == codecs.chunk_bytes("int8", values.shape) == values.size + 4 * values.shape[-1] + 4 * 120
    x, y = values.astype(np.float32).reshape(-1, 96), decoded.astype(np.float32).reshape(-1, 96)
    channel = np.abs(x).max(axis=0)
    step = (np.abs(x / channel).max(axis=1) / 127)[:, None] * channel
    # Half a step (the cell's range in the channel's units), plus float16's rounding of the decoded value.
    assert (np.abs(y - x) <= step / 2 + np.abs(x) * 2**-10 + 1e-6).all()
    assert np.abs(y - x)[:, 3].max() < 0.1 * np.abs(y - x)[:, 7].max()  # small channels are not flattened
    small = slice(30, 40)  # the small cells keep their relative precision
    assert np.abs(y - x)[small].max() < 0.05 * np.abs(y - x)[40:].max()


def test_pca_keeps_outsized_channels_and_cell_statistics_exact():
    values = chunk(np.random.default_rng(1))
    decoded, size = written(values, "pca:8")
    x, y = values.astype(np.float32).reshape(-1, 96), decoded.astype(np.float32).reshape(-1, 96)
    assert np.array_equal(y[:, [7, 61]], x[:, [7, 61]])
    assert np.allclose(y.mean(axis=1), x.mean(axis=1), atol=2e-2) and np.allclose(y.std(axis=1), x.std(axis=1), rtol=2e-3)
    others = np.setdiff1d(np.arange(96), [7, 61])
    cosine = (x[:, others] * y[:, others]).sum(1) / np.linalg.norm(x[:, others], axis=1) / np.linalg.norm(y[:, others], axis=1)
    assert cosine.min() > 0.99  # rank 6 + noise, 8 components
    m, k, n, c = 2, 8, 120, 96
    assert size == 8 + 4 * m + 4 * (c - m) + 2 * k * (c - m) + 4 * k + n * k + 2 * n * m + 8 * n
    assert size <= codecs.chunk_bytes("pca:8", values.shape)  # planned with EXACT_CHANNELS exact channels
    assert codecs.pca_encode(values[0, 0], 8) == codecs.pca_encode(values[0, 0], 8)  # deterministic


@pytest.fixture(scope="module")
def compact_stores(demo_stores, tmp_path_factory):
    from pipeline.cache.extract import extract
    from pipeline.config import BackboneParams

    base = tmp_path_factory.mktemp("compact")
    out = {"float16": demo_stores["stores"]["tiny-sd3"]}  # the same parameters, kept as float16
    for storage in ("int8", "pca:16"):
        params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3", layers=LAYERS,
                                timesteps=[261], ensemble=1, storage=storage)
        out[storage] = extract(params, "tiny-sd3", demo_stores["latents"]["tiny-sd3"], base / f"{storage}.zarr")
    return out


def test_a_compact_store_reads_as_the_same_store(compact_stores, demo_stores):
    reference = StoreMaps(compact_stores["float16"])
    # The default keeps the fingerprint stores had before the knob existed: storage is not a determinant.
    assert "storage" not in reference.root.attrs["determinants"]
    for storage in ("int8", "pca:16"):
        maps = StoreMaps(compact_stores[storage])
        assert maps.root.attrs["determinants"]["storage"] == storage and maps.fingerprint != reference.fingerprint
        for image in maps.images.index[:5]:
            x, y = reference.raw(image, LAYERS[0], 261), maps.raw(image, LAYERS[0], 261)
            if storage == "int8":
                cosine = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
                assert cosine.min() > 0.999, image
            else:  # 16 of the tiny model's 32 channels: lossy, but each cell's mean and std are kept
                assert np.allclose(y.mean(-1), x.mean(-1), atol=2e-3) and np.allclose(y.std(-1), x.std(-1), rtol=2e-3)
    # xarray, in a process whose code never imports this package: Zarr finds the codecs by their entry points.
    script = (
        "import json, sys, xarray as xr\n"
        "tree = xr.open_datatree(sys.argv[1], engine='zarr')\n"
        f"f = tree['{LAYERS[0]}'].ds['features']\n"
        "print(json.dumps({'dims': list(f.dims), 'values': f.isel(image=2, timestep=0).values.astype(float).ravel()[:50].tolist()}))\n"
    )
    for storage in ("int8", "pca:16"):
        found = json.loads(subprocess.run([sys.executable, "-c", script, str(compact_stores[storage])], check=True,
                                          capture_output=True, text=True).stdout)
        maps = StoreMaps(compact_stores[storage])
        assert found["dims"] == ["image", "timestep", "y", "x", "channel"]
        assert np.array_equal(np.float32(found["values"]), maps.raw(maps.images.index[2], LAYERS[0], 261).ravel()[:50])


def test_matching_reads_compact_stores(compact_stores, demo_stores):
    from pipeline.matching.match import match_store

    pairs = demo_stores["pairs"]
    tables = {storage: match_store(path, pairs, transform_specs=["raw", "drop:auto+adaln"], statistics="none")
              for storage, path in compact_stores.items()}
    reference = tables["float16"]
    identical = {}
    for storage in ("int8", "pca:16"):
        table = tables[storage]
        assert table[["pair", "keypoint", "layer", "transform"]].equals(reference[["pair", "keypoint", "layer", "transform"]])
        identical[storage] = (table[["pred_x", "pred_y"]].to_numpy() == reference[["pred_x", "pred_y"]].to_numpy()).all(1).mean()
    print(identical)
    assert identical["int8"] > 0.95


def test_bad_storage_is_a_one_line_error_before_any_work(tmp_path):
    from pipeline.cache.extract import extract
    from pipeline.config import BackboneParams

    params = BackboneParams(kind="sd3", model="m", latents="l", layers=LAYERS, storage="int4")
    with pytest.raises(PipelineError) as error:
        extract(params, "sd3", tmp_path / "no-latents.zarr", tmp_path / "sd3.zarr")
    assert str(error.value) == ("params.yaml: backbones.sd3.storage: unknown storage 'int4'; expected one of float16, "
                                "float16-shuffle, int8, pca:K (K a positive integer)")
    assert not (tmp_path / "sd3.zarr").exists()


def test_a_lossy_store_measures_its_fidelity_and_verify_holds_it_to_params(compact_stores, demo_stores, tmp_path):
    import shutil

    from click.testing import CliRunner

    from cli import cli
    from pipeline.cache import fidelity
    from pipeline.cache.verify import fidelity_problems
    from pipeline.config import BackboneParams
    from pipeline.evaluation import metrics
    from pipeline.matching.match import match_store

    path = shutil.copytree(compact_stores["int8"], tmp_path / "int8.zarr")
    params = BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3", layers=LAYERS,
                            timesteps=[261], ensemble=1, storage="int8")
    pairs = demo_stores["pairs"]
    specs = ["raw", "drop:auto+adaln"]
    measured = fidelity.measure(params, "tiny-sd3", demo_stores["latents"]["tiny-sd3"], path, pairs, specs, images=10)
    assert not Path(f"{path}.fidelity-reference").exists()
    chosen, sample = fidelity.sample_pairs(pairs, 10)
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
    assert root.attrs["fidelity"]["layers"] == measured and root.attrs["fidelity"]["storage"] == "int8"
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
    lenient.write_text("fidelity: {min_identical: 0.5, max_pck_change: 50}\n")
    assert runner.invoke(cli, ["verify", "--store", str(path), "--params", str(lenient)]).exit_code == 0
    # A lossy store that never measured itself is a problem, not a pass.
    unmeasured = zarr.open_group(compact_stores["pca:16"], mode="r").attrs.asdict()
    assert fidelity_problems(unmeasured, 0.5, 50) == [("fidelity", "pca:16 store without fidelity figures "
                                                                   "(extraction did not finish measuring)")]


def test_a_lossy_stores_fingerprint_holds_its_codecs_code():
    from pipeline.cache.extract import _determinants
    from pipeline.cache.provenance import code_identity
    from pipeline.config import BackboneParams

    latents = {"fingerprint": "f"}
    params = BackboneParams(kind="sd3", model="", latents="l", layers=LAYERS)
    assert "code:pipeline.cache.codecs" not in _determinants(params, latents)  # float16: nothing decoded
    for storage in ("int8", "pca:64", "float16-shuffle"):
        found = _determinants(BackboneParams(kind="sd3", model="", latents="l", layers=LAYERS, storage=storage), latents)
        assert found["code:pipeline.cache.codecs"] == code_identity(codecs) and found["storage"] == storage


def test_pca_chunks_encode_the_same_bytes_alone_or_beside_others():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    chunks = [chunk(rng, cells=(16, 16), channels=128, rank=40) for _ in range(6)]
    alone = [codecs.pca_encode(values, 24) for values in chunks]
    with ThreadPoolExecutor(max_workers=6) as pool:  # extraction writes an image's chunks at once
        for _ in range(3):
            assert list(pool.map(lambda values: codecs.pca_encode(values, 24), chunks)) == alone
    # The randomised axes keep (almost) the energy of the exact leading ones: numpy's full SVD of the cells.
    cells = chunks[0].reshape(-1, 128).astype(np.float64)
    rest = np.setdiff1d(np.arange(128), codecs.outsized_channels(cells.astype(np.float32)))
    centred = cells[:, rest] - cells[:, rest].mean(axis=0)
    import torch

    found = codecs.principal_axes(torch.from_numpy(centred), 24).numpy()
    exact = np.linalg.svd(centred, full_matrices=False)[2][:24]
    np.testing.assert_allclose(found @ found.T, np.eye(24), atol=1e-9)
    kept, best = (np.linalg.norm(centred @ axes.T) ** 2 for axes in (found, exact))
    assert 0.999 * best < kept <= best * (1 + 1e-9)


def test_bfloat16_rounding_keeps_eight_significant_bits_within_float16s_range():
    from pipeline.cache.fidelity import bfloat16_rounding

    x = np.array([1 + 2**-8, 1 + 2**-7, 1 + 3 * 2**-8, 300.5, 65504, -65504, 2**-20], np.float16)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1); 1 + 3 x 2^-8 ties to 1 + 2^-6; 300.5 -> 300;
    # 65504 would round up to 65536 (inf as float16): kept at float16's largest.
    expected = np.array([1, 1 + 2**-7, 1 + 2**-6, 300, 65504, -65504, 2**-20], np.float16)
    assert np.array_equal(bfloat16_rounding(x), expected)
