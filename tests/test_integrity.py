"""A store cannot serve a damaged chunk: random bit flips in random chunks of every storage choice are caught by
`verify` and by matching (an error naming the chunk, never a changed prediction), and `extract` then computes
exactly the damaged images again, back to the clean run's files."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import store_files
from pipeline.cache import store
from pipeline.cache.store import FeatureStore
from pipeline.cache.extract import extract
from pipeline.cache.verify import verify
from pipeline.config import BackboneParams
from pipeline.errors import PipelineError
from pipeline.matching.match import match_store

LAYERS = ["transformer_blocks.1", "transformer_blocks.3"]
STORAGE = ["float16", "float16-shuffle", "pca:16"]
FLIPS = 5  # per storage choice, each in its own chunk


def params(demo_stores, storage: str) -> BackboneParams:
    return BackboneParams(kind="sd3", model=demo_stores["models"]["tiny-sd3"], latents="tiny-sd3", layers=LAYERS,
                          timesteps=[261], ensemble=1, storage=storage, fit_images=8)


@pytest.fixture(scope="module")
def clean(demo_stores, tmp_path_factory):
    """A clean store of each storage choice, and its predictions under a transform that reads every array
    matching reads (features, and AdaLN's shift and scale)."""
    base = tmp_path_factory.mktemp("integrity")
    out = {}
    for storage in STORAGE:
        path = extract(params(demo_stores, storage), "tiny-sd3", demo_stores["latents"]["tiny-sd3"],
                       base / f"{storage}.zarr")
        out[storage] = (path, match_store(path, demo_stores["pairs"], transform_specs=["raw", "adaln"], statistics="none"))
    return out


def data_chunks(path: Path) -> list[Path]:
    """Every chunk file holding an image's values (not the store's tables nor the coordinates)."""
    return sorted(chunk for array in FeatureStore.open(path).per_image_arrays()
                  for chunk in (Path(path) / array.path / "c").rglob("*") if chunk.is_file())


def flip_bit(chunk: Path, rng) -> bytes:
    data = chunk.read_bytes()
    damaged = bytearray(data)
    offset = int(rng.integers(len(data)))
    damaged[offset] ^= 1 << int(rng.integers(8))
    chunk.write_bytes(bytes(damaged))
    return data


def image_of(path: Path, chunk: Path) -> tuple[str, str]:
    """(image key, `<layer>/<array>`) of a chunk file: its first index is the image's row."""
    parts = chunk.relative_to(path).parts
    keys = zarr.open_group(path, mode="r")["image"][:]
    return str(keys[int(parts[3])]), f"{parts[0]}/{parts[1]}"


def chunk_problems(path: Path) -> list:
    """verify's problems, but for a lossy store's fidelity figures (extract alone does not measure them)."""
    return [p for p in verify(path)[0] if not p.where.startswith("fidelity")]


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.slow
def test_every_bit_flip_is_caught_and_extract_repairs_exactly_the_damaged_images(clean, demo_stores, storage, tmp_path):
    path, predictions = clean[storage]
    copy = Path(shutil.copytree(path, tmp_path / "copy.zarr"))
    rng = np.random.default_rng(STORAGE.index(storage))
    chunks = data_chunks(copy)
    chosen = [chunks[i] for i in rng.choice(len(chunks), FLIPS, replace=False)]
    pairs = demo_stores["pairs"]

    for chunk in chosen:  # one flip at a time: each is caught on its own
        original = flip_bit(chunk, rng)
        image, where = image_of(copy, chunk)
        problems = chunk_problems(copy)
        assert [(p.image, p.where) for p in problems] == [(image, where)]
        assert "damaged" in problems[0].reason and chunk.relative_to(copy).as_posix() in problems[0].reason
        using = pairs[(pairs["src_image"] == image) | (pairs["trg_image"] == image)]
        if where.endswith("/overflow"):  # not read by matching: predictions stay what they were
            again = match_store(copy, using, transform_specs=["raw", "adaln"], statistics="none")
            assert len(again) and again.equals(match_store(path, using, transform_specs=["raw", "adaln"], statistics="none"))
        else:
            with pytest.raises(PipelineError) as refused:
                match_store(copy, using, transform_specs=["raw", "adaln"], statistics="none")
            assert refused.value.field == chunk.relative_to(copy).as_posix()
            assert "damaged chunk" in str(refused.value) and "\n" not in str(refused.value)
        chunk.write_bytes(original)

    before = {p.relative_to(copy).as_posix(): p.read_bytes() for p in (copy / "images" / "seconds").rglob("*")
              if p.is_file()}
    damaged = {image_of(copy, chunk)[0] for chunk in chosen}
    for chunk in chosen:
        flip_bit(chunk, rng)
    extract(params(demo_stores, storage), "tiny-sd3", demo_stores["latents"]["tiny-sd3"], copy)
    assert store_files(copy) == store_files(path)  # the clean run's store, file for file
    after = {p.relative_to(copy).as_posix(): p.read_bytes() for p in (copy / "images" / "seconds").rglob("*")
             if p.is_file()}
    keys = list(zarr.open_group(copy, mode="r")["image"][:])
    redone = {keys[int(name.split("/")[-1])] for name in after if before.get(name) != after[name]}
    assert redone == damaged
    assert chunk_problems(copy) == []
    assert match_store(copy, pairs, transform_specs=["raw", "adaln"], statistics="none").equals(predictions)


def test_a_deleted_chunk_is_extracted_again_and_said(clean, demo_stores, tmp_path, capsys):
    path, _ = clean["float16"]
    copy = Path(shutil.copytree(path, tmp_path / "copy.zarr"))
    chunk = copy / "transformer_blocks.3" / "features" / "c" / "11" / "0" / "0" / "0" / "0"
    chunk.unlink()
    image = str(zarr.open_group(copy, mode="r")["image"][11])
    extract(params(demo_stores, "float16"), "tiny-sd3", demo_stores["latents"]["tiny-sd3"], copy)
    err = capsys.readouterr().err
    assert "1 done image(s) have a damaged or missing chunk; computing them again" in err
    assert f"  {image}: transformer_blocks.3/features/c/11/0/0/0/0: missing" in err
    assert store_files(copy) == store_files(path)


def test_stores_of_schema_2_without_checksums_stay_readable_and_verify_says_so(clean, demo_stores, tmp_path):
    """Migration: a store written before checksums reads as before; verify names what it cannot check."""
    path, predictions = clean["float16"]
    old = tmp_path / "old.zarr"
    source = zarr.open_group(path, mode="r")
    copy = zarr.open_group(old, mode="w", zarr_format=3)
    copy.attrs.update(dict(source.attrs) | {"schema_version": 2})
    for name, array in source.arrays():
        copy.create_array(name, data=array[:], chunks=array.chunks, dimension_names=array.metadata.dimension_names,
                          fill_value=array.metadata.fill_value)
    for group_name, group in source.groups():
        target = copy.create_group(group_name)
        target.attrs.update(dict(group.attrs))
        for name, array in group.arrays():
            target.create_array(name, data=array[:], chunks=array.chunks, dimension_names=array.metadata.dimension_names,
                                fill_value=array.metadata.fill_value, compressors=None)
    assert not any(store.has_checksums(a) for a in FeatureStore.open(old).per_image_arrays())
    problems, summary = verify(old)
    assert problems == [] and "8 array(s) without checksums (schema 2" in summary
    again = match_store(old, demo_stores["pairs"], transform_specs=["raw", "adaln"], statistics="none")
    assert again.equals(predictions)


@pytest.mark.slow
def test_a_store_whose_fingerprint_was_edited_is_refused_not_rebuilt(clean, demo_stores, tmp_path):
    """Its parameters match, its fingerprint does not match them: damaged or edited, and days of work; the DVC
    stage (replace="outdated") refuses in one line and touches nothing; --overwrite (replace="any") rebuilds."""
    path, _ = clean["float16"]
    copy = Path(shutil.copytree(path, tmp_path / "copy.zarr"))
    root = zarr.open_group(copy, mode="r+", use_consolidated=False)
    root.attrs["fingerprint"] = "0123456789abcdef"
    zarr.consolidate_metadata(root.store)
    before = store_files(copy)
    for replace in ("never", "outdated"):
        with pytest.raises(PipelineError) as refused:
            extract(params(demo_stores, "float16"), "tiny-sd3", demo_stores["latents"]["tiny-sd3"], copy, replace=replace)
        assert str(refused.value) == (
            f"{copy}: fingerprint: 0123456789abcdef does not match the parameters recorded in the store (its attributes "
            "were edited or damaged); it was left as it is: `cli.py verify` checks it, --overwrite rebuilds it")
        assert store_files(copy) == before
    extract(params(demo_stores, "float16"), "tiny-sd3", demo_stores["latents"]["tiny-sd3"], copy, replace="any")
    assert store_files(copy) == store_files(path)


def test_a_damaged_per_image_table_or_a_missing_modulation_chunk_is_one_line_never_a_value(clean, demo_stores, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    path, _ = clean["float16"]
    copy = Path(shutil.copytree(path, tmp_path / "copy.zarr"))
    # A missing shift chunk (its fill value, NaN, is never a value): matching under adaln refuses it.
    image = str(zarr.open_group(copy, mode="r")["image"][4])
    (copy / "transformer_blocks.1" / "shift" / "c" / "4" / "0" / "0").unlink()
    pairs = demo_stores["pairs"]
    using = pairs[(pairs["src_image"] == image) | (pairs["trg_image"] == image)]
    with pytest.raises(PipelineError, match=r"transformer_blocks.1/shift/c/4/0/0: missing chunk of image"):
        match_store(copy, using, transform_specs=["adaln"], statistics="none")
    # A damaged chunk of the per-image table: verify names it, extract and info refuse in one line.
    done = copy / "images" / "done" / "c" / "7"
    flip_bit(done, np.random.default_rng(0))
    problems, summary = verify(copy)
    assert [p.where for p in problems] == ["images/done/c/7: checksum mismatch"] and "per-image table damaged" in summary
    before = store_files(copy)
    with pytest.raises(PipelineError, match=r"images/done/c/7: damaged chunk of the store's per-image table"):
        extract(params(demo_stores, "float16"), "tiny-sd3", demo_stores["latents"]["tiny-sd3"], copy)
    assert store_files(copy) == before
    result = CliRunner().invoke(cli, ["info", "--store", str(copy)])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: checksum: a chunk read here is damaged (its crc32c does not match); `cli.py verify --store <store>` names it"]
