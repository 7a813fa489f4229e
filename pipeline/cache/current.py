"""Is a features store what the current parameters and code would build? Every reader asks before it serves
one (cli.py match, search, explore, show, inspect, propagate; the `match@<backbone>`, `hpatches-match@<backbone>`
and `davis-propagate@<backbone>` stages; the explorer). A store of another dataset's images (HPatches, DAVIS) is
compared with what that dataset's extract stage would build.

`extract` refuses to resume a store built with other parameters, model or code, and DVC rebuilds it; a
reader compares the same fingerprint: the store's recorded `fingerprint` against the one `extract` would
compute now (`pipeline.cache.extract._determinants`: params.yaml's backbone of the store's `name`, the
model's files, the latents store's fingerprint, the store layout, the code, the libraries' versions). A
stale store is refused in one line naming what differs (`check_current`); a reader that allows it
(`--allow-stale`) reads it and says so with its results.

What cannot be checked here is taken as the store recorded it: the latents store's fingerprint when that
store is absent or not a latents store (features copied without their latents), a local model's identity
when its folder is absent (the same `model` path, not on this machine). A store params.yaml has no backbone
for (its `name` is not one of `backbones`, or it records no `determinants`: a store from elsewhere) is read
as it is.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import store
from pipeline.cache.extract import _determinants
from pipeline.cache.provenance import differences
from pipeline.cache.store import FeatureStore
from pipeline.config import TASK_DATASETS
from pipeline.errors import PipelineError


def _latents_attrs(path: Path, recorded: dict) -> dict:
    """The latents store's attributes (its fingerprint whether or not every image is encoded yet); the
    store's own record of it when there is no latents store at `path`."""
    try:
        attrs = FeatureStore.open(path).attrs
    except PipelineError:  # absent or unreadable: cannot be checked here
        attrs = {}
    if attrs.get("kind") == "latents" and "fingerprint" in attrs:
        return attrs
    return {"fingerprint": recorded.get("latents")}


def dataset_of(attrs: dict) -> str | None:
    """"hpatches" or "davis" for a store of that dataset's images (pipeline/workflows/<dataset>.py), built with
    datasets.<dataset>'s changes; None for SPair's."""
    name = (attrs.get("dataset") or {}).get("name")
    return name if name in TASK_DATASETS else None


def expected_determinants(recorded: dict, name: str, params, dataset: str | None = None) -> dict:
    """The determinants `extract` would record now for params.yaml's backbone `name` (`recorded`: the
    store's, for what cannot be checked here); `dataset`: for its store of that dataset's images."""
    if dataset:
        spec = params.dataset_backbone(dataset, name)
        latents = params.dataset_latents(dataset, params.backbone(name).latents)
    else:
        spec = params.backbone(name)
        latents = params.latents_path(spec.latents)
    expected = _determinants(spec, _latents_attrs(latents, recorded))
    if not Path(spec.model).is_dir() and recorded.get("model") == spec.model and "model_identity" in recorded:
        expected["model_identity"] = recorded["model_identity"]  # a local model not on this machine
    if "only" in recorded:  # a fidelity reference: some of the latents store's images (pipeline/workflows/fidelity.py)
        expected["only"] = recorded["only"]
    return expected


def _same_place(a, b) -> bool:
    if store.is_url(a) or store.is_url(b):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


def _what_differs(old: dict, new: dict) -> list[str]:
    return differences(old, new, limit=4)


def _stale(path, params, source: str) -> tuple[str, str] | None:
    """(the store's name, why it is stale), or None for a current or a foreign store."""
    attrs = FeatureStore.open(path).attrs
    recorded, name = attrs.get("determinants"), attrs.get("name")
    dataset = dataset_of(attrs)
    if attrs.get("kind") != "features" or not isinstance(recorded, dict) or name not in params.backbones \
            or (dataset and name not in params.dataset(dataset).backbones):
        return None
    if store.fingerprint(recorded) != attrs.get("fingerprint"):
        return name, (f"its fingerprint {attrs.get('fingerprint')} does not match the parameters recorded in it "
                      "(its attributes were edited or damaged)")
    expected = expected_determinants(recorded, name, params, dataset)
    if store.fingerprint(expected) == attrs["fingerprint"]:
        return None
    changes = ", ".join(_what_differs(recorded, expected)) or "determinants differ"
    return name, f"built with other parameters, model or code than {source} and the code give now ({changes})"


def staleness(path: str | Path, params, source: str | Path = "params.yaml") -> str | None:
    """None when the store at `path` is what `params` (read from `source`) and the code would build now, or
    when params.yaml has no backbone for it; else why not, naming at most four differing determinants,
    nested keys descended into: "built with other parameters, model or code than params.yaml and the code
    give now (ensemble: 1 -> 2, code pipeline.models.backbones.sd2.SD2.run changed)"."""
    found = _stale(path, params, str(source))
    return None if found is None else found[1]


def check_current(path: str | Path, params, allow_stale: bool, source: str | Path = "params.yaml",
                  anyway: str | None = "--allow-stale") -> str | None:
    """Refuse a stale store (`staleness`) in one line, a PipelineError `<path>: fingerprint: stale: <why>;
    rebuild it (...)`, or, with `allow_stale`, return the warning its reader prints with its results,
    `warning: <path>: stale: <why>; read anyway (--allow-stale)`. None for a current or foreign store.
    `anyway`: how this reader reads a stale store anyway, named in the refusal (None: it cannot)."""
    found = _stale(path, params, str(source))
    if found is None:
        return None
    name, why = found
    if allow_stale:
        return f"warning: {path}: stale: {why}; read anyway ({anyway or 'allow_stale'})"
    if dataset := dataset_of(FeatureStore.open(path).attrs):
        rebuild = f"`dvc repro --force --single-item {dataset}-extract@{name}`"
    elif _same_place(path, params.store_path(name)):
        rebuild = f"`dvc repro --force --single-item extract@{name}`, or `cli.py extract --backbone {name} --overwrite`"
    else:
        rebuild = f"`cli.py extract --backbone {name} --store {path} --overwrite`"
    raise PipelineError(path, "fingerprint", f"stale: {why}; rebuild it ({rebuild})"
                                             + (f" or read it anyway with {anyway}" if anyway else ""))
