import os
import shutil

import faiss
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cli import cli
from pipeline.matching.maps import StoreMaps
from pipeline.matching import search
from pipeline.matching.search import CellIndex

LAYER = "transformer_blocks.3"


def brute_force(maps: StoreMaps, layer: str, timestep: int, image: str, point) -> list[tuple[float, str, int, int]]:
    """Every cell of every image against the cell under `point`, in float64: (similarity, image, row, column), best first."""
    source = maps.raw(image, layer, timestep).astype(np.float64)
    h, w, _ = source.shape
    info = maps.images.loc[image]
    stride = float(maps.root[layer].attrs["stride"])
    column = int(point[0] * info["valid_x1"] / info["width"] // stride)
    row = int(point[1] * info["valid_y1"] / info["height"] // stride)
    query = source[row, column] / np.linalg.norm(source[row, column])
    found = []
    for other in maps.images.index:
        cells = maps.raw(other, layer, timestep).astype(np.float64)
        similarity = (cells @ query) / np.linalg.norm(cells, axis=-1)
        for (r, c), value in np.ndenumerate(similarity):
            found.append((float(value), other, r, c))
    return sorted(found, key=lambda item: -item[0])


@pytest.fixture
def store_copy(demo_stores, tmp_path, monkeypatch):
    """A copy of the demo's sd3 store, and a user cache of the test's own (indexes are kept there)."""
    monkeypatch.setenv("DIFT_CACHE_DIR", str(tmp_path / "cache"))
    return shutil.copytree(demo_stores["stores"]["tiny-sd3"], tmp_path / "sd3.zarr")


def test_cli_search_finds_the_points_own_cell_first(demo_stores, store_copy):
    pairs = demo_stores["pairs"]
    identity = pairs[pairs["src_image"] == pairs["trg_image"]].iloc[1]
    x, y = identity["src_kps"][4]
    result = CliRunner().invoke(cli, ["search", "--store", str(store_copy), "--layer", LAYER, "--image",
                                      identity["src_image"], "--point", f"{x},{y}", "--top", "5"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines() if line.strip().startswith(("1 ", "2 "))]
    stride = StoreMaps(store_copy).root[LAYER].attrs["stride"]
    image = demo_stores["images"].set_index("image").loc[identity["src_image"]]
    # The demo's canvas is squashed: cell = pixel x canvas / image side, over the stride.
    expected = (int(y * 128 / image["height"] // stride), int(x * 128 / image["width"] // stride))
    rank, key, row, column, *_, similarity = lines[0]
    assert (key, int(row), int(column)) == (identity["src_image"], *expected)
    assert float(similarity) == pytest.approx(1.0, abs=1e-5)
    assert lines[1][1:4] != lines[0][1:4]


def test_exact_index_equals_brute_force(store_copy, demo_stores):
    maps = StoreMaps(store_copy)
    pairs = demo_stores["pairs"]
    pair = pairs[pairs["src_image"] != pairs["trg_image"]].iloc[5]
    point = tuple(pair["src_kps"][1])
    index = CellIndex(maps, LAYER, 261)
    stride = maps.root[LAYER].attrs["stride"]
    assert index.exact and index.index.ntotal == len(maps.images) * (128 // stride) ** 2  # 128-px canvas
    found = index.search(pair["src_image"], point, top=12)
    reference = brute_force(maps, LAYER, 261, pair["src_image"], point)[:12]
    assert list(zip(found["image"], found["row"], found["column"])) == [(i, r, c) for _, i, r, c in reference]
    np.testing.assert_allclose(found["similarity"], [s for s, *_ in reference], atol=1e-5)
    # Each cell's reported centre: (index + 0.5) x stride, mapped from the canvas back to the image.
    for hit in found.itertuples():
        info = maps.images.loc[hit.image]
        assert (hit.x, hit.y) == pytest.approx(((hit.column + 0.5) * stride * info["width"] / 128,
                                                (hit.row + 0.5) * stride * info["height"] / 128))


@pytest.mark.slow
def test_ivfpq_index_reranks_exactly_and_keeps_the_own_cell_first(store_copy, demo_stores, monkeypatch):
    monkeypatch.setattr(search, "FLAT_LIMIT_BYTES", 0)
    maps = StoreMaps(store_copy)
    index = CellIndex(maps, LAYER, 261)
    assert isinstance(index.index, faiss.IndexIVFPQ) and not index.exact
    image = maps.images.index[7]
    point = (40, 30)
    found = index.search(image, point, top=10)
    reference = brute_force(maps, LAYER, 261, image, point)
    exact = {(i, r, c): s for s, i, r, c in reference}
    assert (found.iloc[0]["image"], found.iloc[0]["similarity"]) == (image, pytest.approx(1.0, abs=1e-5))
    # Similarities are exact cosines (re-scored from the store), in order, and most of the true top 10 are found.
    np.testing.assert_allclose(found["similarity"], [exact[k] for k in zip(found["image"], found["row"], found["column"])],
                               atol=1e-5)
    assert (np.diff(found["similarity"]) <= 0).all()
    true_top = {(i, r, c) for _, i, r, c in reference[:10]}
    assert len(true_top & set(zip(found["image"], found["row"], found["column"]))) >= 7


def test_index_is_kept_and_rebuilt_when_the_store_changes(store_copy, capsys, tmp_path):
    first = CellIndex(StoreMaps(store_copy), LAYER, 261)
    maps = StoreMaps(store_copy)
    assert first.path.parent == tmp_path / "cache" / "search" / f"{maps.name}-{maps.fingerprint[:16]}"
    assert not list(store_copy.parent.glob("*.search"))  # nothing beside the store, where DVC looks
    written = first.path.stat().st_mtime_ns
    CellIndex(StoreMaps(store_copy), LAYER, 261)
    assert first.path.stat().st_mtime_ns == written and "rebuilding" not in capsys.readouterr().err
    root = zarr.open_group(store_copy, mode="r+")
    root["images/done"][3] = False  # an image recomputed, or not yet: the index must not list its cells
    CellIndex(StoreMaps(store_copy), LAYER, 261)
    assert "rebuilding the search index" in capsys.readouterr().err
    assert first.path.stat().st_mtime_ns != written
    root.attrs["fingerprint"] = "0" * 16  # the store was rebuilt with other parameters, model or code
    zarr.consolidate_metadata(root.store)
    other = CellIndex(StoreMaps(store_copy), LAYER, 261)
    assert other.path.parent.name == f"{maps.name}-{'0' * 16}" and other.path.exists()


def test_cli_search_bad_input(store_copy):
    runner = CliRunner()
    base = ["search", "--store", str(store_copy), "--layer", LAYER, "--image", "star/demo_00000"]
    result = runner.invoke(cli, base + ["--point", "12"])
    assert result.exit_code == 2 and result.output.strip() == "error: point: expected x,y, got '12'"
    result = runner.invoke(cli, ["search", "--store", str(store_copy), "--layer", "nope", "--image", "star/demo_00000",
                                 "--point", "1,2"])
    assert result.exit_code == 2 and result.output.startswith(f"error: {store_copy}: layer: unknown layer 'nope'")
    for point, why in (("nan,5", "point: (nan, 5) is not inside image 'star/demo_00000'"),
                       ("5,inf", "point: (5, inf) is not inside"), ("-1,5", "point: (-1, 5) is not inside"),
                       ("5,100000", "point: (5, 100000) is not inside")):
        result = runner.invoke(cli, base + ["--point", point])
        assert result.exit_code == 2 and result.output.startswith(f"error: {why}"), result.output
    result = runner.invoke(cli, base + ["--point", "1,2", "--top", "0"])
    assert result.exit_code == 2 and "Invalid value for '--top': 0 is not in the range 1<=x<=10000" in result.output
    result = runner.invoke(cli, base + ["--point", "1,2", "--transform", "layernorm"])
    assert result.exit_code == 2 and result.output.startswith("error: transform: 'layernorm' is not configured for")


def test_the_index_cache_keeps_the_most_recently_used_within_its_bound(store_copy, tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "search"
    first = CellIndex(StoreMaps(store_copy), LAYER, 261)
    size = sum(p.stat().st_size for p in first.path.parent.iterdir())
    # Room for two indexes: a third evicts the least recently used (the first, though built before the second,
    # was used since).
    monkeypatch.setattr(search, "CACHE_LIMIT_BYTES", int(2.5 * size))
    second = CellIndex(StoreMaps(store_copy), "transformer_blocks.1", 261)
    for file in (second.path, second.path.with_suffix(".cells.npy"), second.path.with_suffix(".json")):
        os.utime(file, (1, 1))  # long unused
    CellIndex(StoreMaps(store_copy), LAYER, 261)  # used again: kept
    third = CellIndex(StoreMaps(store_copy), LAYER, 261, "drop:auto")
    assert sorted(p.name for p in folder.rglob("*.faiss")) == sorted([first.path.name, third.path.name])
    assert not second.path.with_suffix(".cells.npy").exists() and not second.path.with_suffix(".json").exists()
