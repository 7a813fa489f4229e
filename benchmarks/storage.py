"""What each `storage` choice costs and keeps, on existing float16 stores.

For each store and each choice (pipeline/cache/codecs.py), the store's `features` arrays are re-encoded
chunk by chunk (exactly what extraction with that choice writes: it encodes the same float16 values), then
both are matched on the split's pairs with `dift` under every transform configured for the backbone.
Printed per store and choice: bytes per image on disk (features arrays) and their ratio to float16, the
encoding time per image against the extraction's own seconds per image (the store records them), and over
every (layer, timestep, transform) variant the lowest fraction of predictions identical to float16 and the
largest change of PCK@0.1 (bbox, points). A reference row, `bfloat16-rounding`, gives the same figures for
the float16 features rounded to bfloat16: how far predictions move with no encoding at all, only the
precision the real profile computes FLUX in.

    python benchmarks/storage.py --store store/sd3.zarr [--store ...] [--pairs data/prepared/pairs.parquet]
        [--storage pca:256 --storage pca:64 ...] [--json benchmarks/results/storage.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache import codecs  # noqa: E402
from pipeline.cache.store import FeatureStore  # noqa: E402
from pipeline.workflows.fidelity import agreement, bfloat16_rounding  # noqa: E402
from pipeline.matching.maps import StoreMaps  # noqa: E402
from pipeline.config import PARAMS_FILE, load_params, parse_storage  # noqa: E402
from pipeline.matching.match import match_store  # noqa: E402

CHOICES = ("float16-shuffle", "pca:256", "pca:128", "pca:64")
# Not a storage choice: the scale of "identical predictions". Rounding the float16 features to bfloat16
# moves predictions as much as the model's own compute precision would, with no encoding at all.
BFLOAT16_ROUNDING = "bfloat16-rounding"


def features_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "/features/" in f.as_posix())


def reencode(source: Path, out: Path, storage: str) -> tuple[float, float]:
    """A copy of `source` whose features arrays are kept as `storage` (or, for BFLOAT16_ROUNDING, float16
    arrays of bfloat16-rounded values): seconds spent encoding and bytes of the features, per image. `pca:K`
    is cross-fitted (see `cross_fitted`)."""
    shutil.copytree(source, out)
    copy = FeatureStore.for_writing(out)
    root = copy.root
    seconds, pca_bytes = 0.0, 0
    rounding = storage == BFLOAT16_ROUNDING
    for layer in copy.layers():
        old = root[layer]["features"]
        if not rounding and parse_storage(storage)[0] == "pca":
            spent, size = cross_fitted(old, storage)
            seconds, pca_bytes = seconds + spent, pca_bytes + size
            continue
        values = bfloat16_rounding(old[:]) if rounding else old[:]
        dims, chunks, fill = old.metadata.dimension_names, old.chunks, old.metadata.fill_value
        del root[layer]["features"]
        new = root[layer].create_array("features", shape=values.shape, dtype=values.dtype, chunks=chunks,
                                       dimension_names=dims, fill_value=fill,
                                       **codecs.codecs("float16" if rounding else storage))
        start = time.perf_counter()
        new[:] = values
        seconds += time.perf_counter() - start
    root.attrs["storage"] = "float16" if rounding else storage
    zarr.consolidate_metadata(root.store)
    images = root["image"].shape[0]
    return seconds / images, (pca_bytes or features_bytes(out)) / images


def cross_fitted(features: zarr.Array, storage: str) -> tuple[float, int]:
    """`pca:K` without a single image encoded on axes it helped fit: the images are split in two seeded halves,
    each encoded (as extraction's codec does, then zstd) on the axes fitted on the other half. The decoded
    values replace `features` in place (float16, for matching). Seconds spent encoding, and bytes: the
    compressed chunks and both halves' axes (float16)."""
    from numcodecs import Zstd

    values = features[:]
    halves = np.array_split(np.random.default_rng(0).permutation(len(values)), 2)
    components = parse_storage(storage)[1]
    bases = []
    for half in halves:
        moments = codecs.LayerMoments()
        for image in half:
            for chunk in values[image]:
                moments.add(chunk)
        bases.append(moments.fit(components))
    decoded, seconds, size = np.empty_like(values), 0.0, sum(basis.axes.nbytes for basis in bases)
    for basis, half in zip(bases[::-1], halves):
        for image in half:
            for t, chunk in enumerate(values[image]):
                start = time.perf_counter()
                data = Zstd(level=3).encode(codecs.pca_encode(chunk, basis))
                seconds += time.perf_counter() - start
                size += len(data)
                decoded[image, t] = codecs.pca_decode(Zstd().decode(data), chunk.shape, basis)
    features[:] = decoded
    return seconds, size


def compare(reference: pd.DataFrame, other: pd.DataFrame) -> tuple[float, float]:
    """Over every variant: the lowest fraction of identical predictions and the largest PCK@0.1 change (points)."""
    found = agreement(other, reference)
    return float(found["identical"].min()), float(found["pck_change"].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="append", required=True, type=Path)
    parser.add_argument("--pairs", type=Path, default=None, help="default data.pairs of --params")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--storage", action="append", default=None,
                        help=f"default: {', '.join(CHOICES)}, and {BFLOAT16_ROUNDING} (a reference, not a choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    params = load_params(args.params)
    pairs = pd.read_parquet(args.pairs or params.data.pairs)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for path in args.store:
            maps = StoreMaps(path)
            specs = params.match.transforms_for(maps.name)
            extraction = statistics.median(maps.images["seconds"].dropna()) if maps.images["seconds"].notna().any() else np.nan
            reference = match_store(path, pairs, transform_specs=specs, statistics="none")
            base = features_bytes(Path(path)) / len(maps.images)
            rows.append({"store": maps.name, "storage": "float16", "bytes_per_image": base, "ratio": 1.0,
                         "encode_s_per_image": np.nan, "extract_s_per_image": extraction, "identical_min": 1.0,
                         "pck_change_max": 0.0})
            for storage in args.storage or (*CHOICES, BFLOAT16_ROUNDING):
                out = Path(folder) / f"{maps.name}-{storage.replace(':', '-')}.zarr"
                encode, size = reencode(Path(path), out, storage)
                identical, change = compare(reference, match_store(out, pairs, transform_specs=specs, statistics="none"))
                rows.append({"store": maps.name, "storage": storage, "bytes_per_image": size, "ratio": size / base,
                             "encode_s_per_image": encode, "extract_s_per_image": extraction,
                             "identical_min": identical, "pck_change_max": change})
                print(rows[-1], flush=True)
                shutil.rmtree(out)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
