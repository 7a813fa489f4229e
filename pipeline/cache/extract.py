"""Latents store -> features store, one backbone run: the loop over images (resumable, sharded on dask
workers, skipping bad images under `on_error: skip`) around pipeline/cache/features.py, which computes
each image's arrays; for `pca:K`, first the fit of each layer's axes on `fit_images` images. A lossy
store's fidelity sample goes first (`first`; pipeline/workflows/fidelity.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from pipeline import cluster
from pipeline.cache import codecs, sizes, store
from pipeline.cache.encode import peak_memory
from pipeline.cache.features import image_maps
from pipeline.cache.provenance import code_closure, library_versions, model_identity, module_classes
from pipeline.cache.store import FeatureStore
from pipeline.config import BackboneParams, parse_storage
from pipeline.errors import PipelineError, report_skipped
from pipeline.models import hub
from pipeline.models.backbones.parts import Parts
from pipeline.models.backbones.registry import backbone_class, check_canvas, check_latents, make_backbone


_backbones: dict[str, object] = {}


def _backbone(params: BackboneParams, latents_attrs: dict, categories: list[str]):
    """The loaded backbone, once per process: a dask worker keeps its model between shards."""
    # How a store keeps features does not change the model: a lossy store and its float16 reference share it.
    model = {k: v for k, v in asdict(params).items() if k not in ("storage", "fit_images")}
    key = json.dumps([model, model_identity(params.model), latents_attrs["fingerprint"]], sort_keys=True)
    if key not in _backbones:
        _backbones.clear()  # one model per process at a time
        device = hub.resolve_device(cluster.worker_device(params.device))
        parts = Parts(params.model, device, hub.resolve_dtype(params.dtype, device), params.offload)
        backbone = make_backbone(params, latents_attrs, parts, categories)
        backbone.check_layers(params.layers)
        _backbones[key] = backbone
    return _backbones[key]


def _backbone_loads(params: BackboneParams, latents_attrs: dict, categories: list[str]) -> bool:
    _backbone(params, latents_attrs, categories)
    return True


def extract(params: BackboneParams, name: str, latents_path: str | Path, out: str | Path,
            replace: str = "never", client=None, on_error: str = "fail", check_disk: bool = True,
            only: list[str] | None = None, first: list[str] | None = None) -> Path:
    """Fill the features store `out`; resumes where an interrupted run stopped.

    With a dask `client` (pipeline.cluster.connect), images are sharded across its workers, each
    writing its own images' chunks of the same store. `on_error: skip` records a failing image's
    reason in the store and goes on; `fail` stops at the first. Before any work, the images still to do
    must fit on the store's disk (`check_disk`; see pipeline/cache/sizes.py). `only`: these images of the
    latents store, not all (pipeline/workflows/fidelity.py's float16 reference). `first`: extract only these of
    the store's images in this call, leaving the others to the next (pipeline/workflows/fidelity.py's sample).
    """
    latents = FeatureStore.open_latents(latents_path)
    latents_attrs = latents.attrs
    images = latents.images()
    categories = sorted(images["category"].unique())
    if only is not None:
        images = images[images["image"].isin(only)].reset_index(drop=True)
    determinants = _determinants(params, latents_attrs) | ({"only": sorted(only)} if only is not None else {})
    if check_disk:
        sizes.check_store_fits(out, params, latents_attrs, FeatureStore.pending_count(out, determinants, len(images)))
    if client is None:
        _backbone(params, latents_attrs, categories)  # refuse unknown layers before touching the store
    else:
        client.submit(_backbone_loads, params, latents_attrs, categories, pure=False).result()

    attrs = {
        "kind": "features", "name": name, "backbone": params.kind, "model": params.model,
        "preprocessing": {"canvas": latents_attrs["canvas"], "canvas_mode": latents_attrs["canvas_mode"],
                          **({"canvas_size": latents_attrs["canvas_size"]} if "canvas_size" in latents_attrs else {}),
                          "latents_store": str(latents_path)},
        "prompt": params.prompt, "ensemble": params.ensemble, "seed": params.seed, "latent": params.latent,
        "noise": params.noise, "dtype": params.dtype, "device": params.device, "dataset": latents_attrs["dataset"],
        "layers": params.layers, "timesteps": params.timesteps, "storage": params.storage, "determinants": determinants,
        "versions": library_versions(),
    }
    with store.writer_lock(out), store.writing(out):
        features = FeatureStore.create(out, attrs, images[["image", *store.IMAGE_COLUMNS]], params.timesteps, replace)
        features.redo()
        if parse_storage(params.storage)[0] == "pca" and not all(layer in features.root for layer in params.layers):
            fit = (params, str(latents_path), str(out), fit_sample(len(images), params.fit_images, params.seed))
            _fit_axes(*fit) if client is None else client.submit(_fit_axes, *fit, pure=False).result()
        pending = [int(i) for i in np.flatnonzero(~features.done_mask())]
        if first is not None:
            keys, wanted = features.keys(), set(first)
            pending = [i for i in pending if keys[i] in wanted]
        job = (params, str(latents_path), str(out), on_error)
        skipped = []
        with tqdm(total=len(images), initial=len(images) - len(pending), unit="img", desc=f"extract {name}") as bar:
            if client is None:
                skipped = _extract_images(*job, pending, progress=bar.update)
            else:
                skipped = _extract_distributed(client, job, features, pending, bar)
        features.finish()
    report_skipped(out, skipped)
    return Path(out)


def feature_code(params: BackboneParams) -> dict[str, str]:
    """{qualified name: digest} of the code that computes a store's values (pipeline/cache/provenance.py,
    `code_closure`): what the extraction workers reach (`_extract_images`; `_fit_axes` for `pca:K`), the
    backbone's class and its bases (chosen by `kind` at run time: `backbone_class`, a registry, counts by
    its own source, not by every class it could return; so do the checks of what a kind declares, which
    shape no value) and, for a storage other than float16, the codec module's classes (Zarr calls them
    through its registry)."""
    roots = [_extract_images, *([_fit_axes] if parse_storage(params.storage)[0] == "pca" else []),
             backbone_class(params.kind)]
    if params.storage != "float16":
        roots += module_classes(codecs)
    return code_closure(roots, opaque=[backbone_class, check_latents, check_canvas])


def _determinants(params: BackboneParams, latents_attrs: dict) -> dict:
    """Everything that decides a features store's contents (not where it ran): parameters, the model's
    identity, the latents store, the store layout, the code and the libraries' versions
    (pipeline/cache/provenance.py)."""
    determinants = {**asdict(params), "model_identity": model_identity(params.model),
                    "latents": latents_attrs["fingerprint"], "schema_version": store.SCHEMA_VERSION,
                    "code": feature_code(params), "versions": library_versions()}
    for where_it_runs in ("device", "offload"):
        determinants.pop(where_it_runs)
    if params.storage == "float16":
        determinants.pop("storage")  # the default: stores extracted before the knob existed keep their fingerprint
    if parse_storage(params.storage)[0] != "pca":
        determinants.pop("fit_images")
    return determinants


def expected_fingerprint(params: BackboneParams, latents_path: str | Path) -> str:
    """The fingerprint a store extracted with `params` from `latents_path` would have."""
    return store.fingerprint(_determinants(params, FeatureStore.open_latents(latents_path).attrs))


def _extract_distributed(client, job, features: FeatureStore, pending: list[int], bar) -> list[tuple[str, str]]:
    from distributed import as_completed  # distributed: seconds to import, and only a dask client needs it

    skipped = []
    # The first finished image lays out every layer's arrays; then workers only write chunks.
    while pending and not all(layer in features.root for layer in job[0].layers):
        skipped += client.submit(_extract_images, *job, pending[:1], pure=False).result()
        pending = pending[1:]
        bar.update()
    futures = {client.submit(_extract_images, *job, shard, pure=False): len(shard)
               for shard in cluster.shards(pending, cluster.workers_of(client), per_worker=8)}
    try:
        for future in as_completed(futures):
            skipped += future.result()
            bar.update(futures[future])
    except BaseException:
        client.cancel(list(futures))
        raise
    return skipped


class _Images:
    """A worker's view of one extraction: the backbone, the latents and the open store `out`, and each of
    the store's images' arrays (pipeline/cache/features.py) by its row in the store."""

    def __init__(self, params: BackboneParams, latents_path: str, out: str):
        self.params, self.latents_path, self.out = params, latents_path, out
        latents = FeatureStore.open(latents_path)
        self.latents_attrs = latents.attrs
        self.images = latents.images()
        self.backbone = _backbone(params, self.latents_attrs, sorted(self.images["category"].unique()))
        self.store = FeatureStore.for_writing(out)
        self.mean, self.std = latents.root["posterior/mean"], latents.root["posterior/std"]
        # The store may hold some of the latents store's images (`only`): its rows are found by image key.
        in_latents = {image: i for i, image in enumerate(self.images["image"])}
        self.sources = [in_latents[key] for key in self.store.keys()]
        self.arrays: list[tuple[str, zarr.Array, str]] | None = None

    def key(self, index: int) -> str:
        return self.images["image"].iloc[self.sources[index]]

    def maps(self, index: int) -> dict:
        source = self.sources[index]
        image, category = self.images["image"].iloc[source], self.images["category"].iloc[source]
        if not self.images["done"].iloc[source]:
            raise PipelineError(self.latents_path, image, f"not encoded ({self.images['error'].iloc[source] or 'pending'})")
        mean = torch.from_numpy(self.mean[source]).permute(2, 0, 1)
        std = torch.from_numpy(self.std[source]).permute(2, 0, 1)
        return image_maps(self.params, self.backbone, image, category, mean, std, self.out)

    def lay_out(self, maps: dict, bases: dict | None = None) -> list[tuple[str, zarr.Array, str]]:
        """(layer, array, its name) of every per-image array, the layers created on first use (`pca:K` with
        their fitted axes); opened once, so that a codec's setup is not redone for every image."""
        if self.arrays is not None:
            return self.arrays
        # canvas rows a cell: a rectangular canvas (DAVIS's) records its (W, H); a square one is canvas x canvas
        canvas = (self.latents_attrs.get("canvas_size") or [self.latents_attrs["canvas"]] * 2)[1]
        opened = []
        for layer in self.params.layers:
            features = maps[(layer, "features")]  # (timestep, y, x, channel)
            _, h, w, c = features.shape
            stride = canvas / h
            timesteps = len(self.params.timesteps)
            arrays = {"features": (("timestep", "y", "x", "channel"), features.shape),
                      "overflow": (("timestep",), (timesteps,), "int64")}
            if (layer, "shift") in maps:
                arrays |= {"shift": (("timestep", "channel"), (timesteps, c)), "scale": (("timestep", "channel"), (timesteps, c))}
            node = self.store.ensure_layer(
                layer, arrays,
                {"y": (np.arange(h) + 0.5) * stride, "x": (np.arange(w) + 0.5) * stride, "channel": np.arange(c)},
                {**self.backbone.layer_attrs(layer), "stride": stride}, storage={"features": self.params.storage},
                basis=(bases or {}).get(layer),
            )
            opened += [(layer, node[array], array) for array in arrays]
        self.arrays = opened
        return opened


def fit_sample(images: int, count: int, seed: int) -> list[int]:
    """`pca:K`: the store rows whose features fit the layers' axes: `count` of them, seeded, sorted."""
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(images)[:count])


def _fit_axes(params: BackboneParams, latents_path: str, out: str, indices: list[int]) -> None:
    """`pca:K`: fit each layer's axes on the features of images `indices` (computed, not stored), and lay
    out the store's layers with them. Images that fail are left out of the fit (extraction reports them)."""
    worker = _Images(params, latents_path, out)
    moments = {layer: codecs.LayerMoments() for layer in params.layers}
    fitted, maps = [], None
    for index in tqdm(indices, unit="img", desc=f"fit {params.storage} axes"):
        try:
            maps = worker.maps(index)
        except PipelineError:
            continue
        for layer, layer_moments in moments.items():
            for values in maps[(layer, "features")]:  # per timestep: one basis serves them all
                layer_moments.add(values)
        fitted.append(worker.key(index))
    if maps is None or not fitted:
        raise PipelineError(out, "fit_images", f"none of the {len(indices)} images sampled to fit {params.storage} could be extracted")
    _, components = parse_storage(params.storage)
    worker.store.set_attrs(fit_images=fitted)  # before the layers: a run killed in between fits again
    worker.lay_out(maps, {layer: layer_moments.fit(components) for layer, layer_moments in moments.items()})


def _extract_images(params: BackboneParams, latents_path: str, out: str, on_error: str, indices: list[int],
                    progress=None) -> list[tuple[str, str]]:
    """Extract images `indices` into the open store `out`; the (image, reason) pairs skipped."""
    worker = _Images(params, latents_path, out)
    skipped = []
    # Held for the whole loop, not toggled per image: OpenBLAS's threads, woken by a restored limit, spin
    # on the cores the next forward pass needs.
    with codecs.one_blas_thread:
        for index in indices:
            start = time.perf_counter()
            if worker.backbone.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(worker.backbone.device)
            try:
                maps = worker.maps(index)
                worker.store.write_image(index, [(array, maps[(layer, name)]) for layer, array, name in worker.lay_out(maps)])
                worker.store.mark_done(index, time.perf_counter() - start, peak_memory(worker.backbone.device))
            except PipelineError as exc:
                if on_error != "skip":
                    raise
                worker.store.mark_skipped(index, str(exc))
                skipped.append((worker.key(index), str(exc)))
            if progress:
                progress()
    return skipped
