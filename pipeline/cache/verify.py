"""`cli.py verify`: is a store complete and sound? Checks what a killed run, a full disk or a bad
model could leave behind, and names the image for each problem.

- the fingerprint matches the parameters recorded in the store (and, given them, today's params);
- every array has the shape and dimension names of the store contract;
- every image is done, and every done image has all its chunks, each matching its checksum (a damaged
  chunk is named, with its image and layer), all finite;
- no temporary chunk file of an interrupted writer is left over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.cache import store
from pipeline.cache.describe import bfloat16_scale
from pipeline.cache.store import FeatureStore
from pipeline.config import is_lossy
from pipeline.errors import CHECKSUM_MISMATCH


@dataclass(frozen=True)
class Problem:
    image: str | None  # None: the store as a whole
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.image or '(store)'}: {self.where}: {self.reason}"


def verify(path: str | Path, expected_fingerprint: str | None = None,
           fidelity_limits: tuple[float, float] = (0.98, 0.5)) -> tuple[list[Problem], str]:
    """The problems found, and a one-line summary of what was checked. `fidelity_limits`: the least
    fraction of identical predictions and the largest PCK change (points) a lossy store may show."""
    found = FeatureStore.open(path)
    path, root, attrs = found.path, found.root, found.attrs
    problems = []
    recorded = store.fingerprint(attrs.get("determinants", {}))
    if recorded != attrs["fingerprint"]:
        problems.append(Problem(None, "fingerprint", f"{attrs['fingerprint']} does not match the recorded "
                                                     f"parameters ({recorded}); the attributes were edited"))
    if expected_fingerprint is not None and expected_fingerprint != attrs["fingerprint"]:
        problems.append(Problem(None, "fingerprint", f"built with other parameters than params.yaml gives "
                                                     f"({attrs['fingerprint']} vs {expected_fingerprint})"))
    if not store.is_url(path):
        problems += [Problem(None, leftover.relative_to(path).as_posix(), "temporary file of an interrupted writer "
                             "(removed when the store is next written)") for leftover in sorted(path.rglob("*.partial"))]

    problems += [Problem(None, f"fidelity: {layer}", reason) for layer, reason in fidelity_problems(attrs, *fidelity_limits)]
    try:
        images = found.images()
    except ValueError as exc:  # a damaged chunk of the per-image table: nothing per image can be said
        if not str(exc).startswith(CHECKSUM_MISMATCH):
            raise
        damaged = [chunk for array in root["images"].array_values() for chunk in found.damaged_chunks_of(array)]
        return problems + [Problem(None, chunk, "damaged (checksum mismatch): the store's per-image table cannot be read; "
                                                "`extract --overwrite` rebuilds the store") for chunk in damaged], \
            f"{path}: {attrs.get('kind')} store, per-image table damaged, fingerprint {attrs['fingerprint']}"
    count = len(images)
    nodes = {name: root[name] for name in found.data_nodes()}
    timesteps = root["timestep"].shape[0] if "timestep" in root else None
    arrays = []
    for name, node in nodes.items():
        for key in sorted(node.array_keys()):
            array = node[key]
            dims = tuple(array.metadata.dimension_names or ())
            if not dims or dims[0] != "image":
                continue  # a coordinate
            problem = _shape_problem(array, dims, count, timesteps, node)
            if problem:
                problems.append(Problem(None, f"{name}/{key}", problem))
            else:
                arrays.append((f"{name}/{key}", array))

    damaged = found.damaged_chunks(np.flatnonzero(images["done"].to_numpy()))
    for index, row in tqdm(list(images.iterrows()), unit="img", desc=f"verify {Path(str(path)).name}"):
        if not row["done"]:
            reason = f"skipped: {row['error']}" if row["error"] else "not done (resume the stage that writes it)"
            problems.append(Problem(row["image"], "images/done", reason))
            continue
        bad: dict[str, list[str]] = {}
        for chunk in damaged.get(index, []):
            bad.setdefault(chunk.split("/c/")[0], []).append(chunk)
        problems += [Problem(row["image"], where, ("missing: flagged done but never written, or deleted" if all(
            c.endswith("missing") for c in chunks) else "damaged") + f" (chunk {'; '.join(chunks)}); `cli.py extract` "
                             "(or `encode`) computes the image again") for where, chunks in bad.items()]
        for where, array in arrays:
            if where in bad:
                continue
            try:
                values = array[index]
            except ValueError as exc:  # a URL store's damaged chunk: zarr's crc32c codec refuses it
                problems.append(Problem(row["image"], where, f"damaged chunk ({exc})"))
                continue
            if np.isnan(values).all():
                problems.append(Problem(row["image"], where, "missing: flagged done but never written"))
            elif not np.isfinite(values).all():
                problems.append(Problem(row["image"], where, f"{int((~np.isfinite(values)).sum())} non-finite values"))
    unchecked = sum(not store.has_checksums(array) for _, array in arrays)
    summary = (f"{path}: {attrs.get('kind')} store, {int(images['done'].sum())}/{count} images done, "
               f"{len(nodes)} layer(s), {len(arrays)} arrays checked, fingerprint {attrs['fingerprint']}")
    if unchecked:
        summary += (f"; {unchecked} array(s) without checksums (schema {attrs.get('schema_version', 1)}: a bit flip there "
                    "reads as a value; extract with --overwrite to rebuild with them)")
    clipped = found.overflow() if not any(where.endswith("/overflow") for p in problems for where in [p.where]) else {}
    if clipped:
        summary += "; values clipped to float16's range: " + ", ".join(f"{k} {v}" for k, v in clipped.items())
    return problems, summary


def _shape_problem(array, dims: tuple, count: int, timesteps: int | None, node) -> str | None:
    if array.shape[0] != count:
        return f"{array.shape[0]} images, the store has {count}"
    if "timestep" in dims and array.shape[dims.index("timestep")] != timesteps:
        return f"{array.shape[dims.index('timestep')]} timesteps, the store has {timesteps}"
    for dim in ("y", "x", "channel"):
        if dim in dims and dim in node and node[dim].shape[0] != array.shape[dims.index(dim)]:
            return f"{dim} has {array.shape[dims.index(dim)]} entries but coordinate {dim} has {node[dim].shape[0]}"
    expected = {"features": ("image", "timestep", "y", "x", "channel"), "shift": ("image", "timestep", "channel"),
                "scale": ("image", "timestep", "channel"), "overflow": ("image", "timestep"), "mean": ("image", "y", "x", "channel"),
                "std": ("image", "y", "x", "channel")}.get(array.basename)
    if expected and dims != expected:
        return f"dimensions {dims}, expected {expected}"
    return None


def fidelity_problems(attrs: dict, min_identical: float, max_pck_change: float) -> list[tuple[str, str]]:
    """(layer, reason) for each layer below the thresholds; a lossy store without figures is one problem."""
    if not is_lossy(attrs.get("storage", "float16")):
        return []
    found = attrs.get("fidelity")
    if not found:
        return [("fidelity", f"{attrs['storage']} store without fidelity figures (extraction did not finish measuring)")]
    bad = []
    for layer, figures in found["layers"].items():
        # For scale: what rounding the same float16 features to bfloat16 kept (stores measured since it exists).
        scale = f" ({bfloat16_scale(figures)})" if "bfloat16_identical" in figures else ""
        if figures["identical"] < min_identical:
            bad.append((layer, f"{figures['identical']:.1%} of predictions identical to float16 < {min_identical:.0%}"
                               + scale))
        if figures["pck_change"] > max_pck_change:
            bad.append((layer, f"PCK@0.1 changes by {figures['pck_change']:.2f} points > {max_pck_change}" + scale))
    return bad
