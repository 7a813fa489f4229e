"""models/<name>: a pipeline folder, either built here (a real architecture with random weights, or one of
the demo's tiny random models) or a snapshot of a hub repository at a pinned revision, holding only what is
used.

What is used is derived from params.yaml: the VAE of every encoder that names the folder, and each
backbone's components (sd2: tokenizer, text encoder, U-Net, scheduler; sd3: CLIP-L, CLIP-G, T5 with
`t5: true`, transformer; flux: CLIP-L, T5, transformer; dinov2/clip: the one model). Of each component
only the configs, tokenizer files and the default-precision safetensors are fetched: no single-file
checkpoints (.ckpt, root .safetensors), no .bin duplicates, no fp16 variants, no other components.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects

from pipeline.config import Params
from pipeline.demo import tiny_models
from pipeline.errors import PipelineError
from pipeline.models import hub, realsize
from pipeline.models.kinds import KINDS

TINY = "tiny:"  # the demo's tiny random models (pipeline/demo/tiny_models.py)
MARKER = ".dift-cache-source.json"  # what made the folder: source, revision, seed
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*-of-*.safetensors",
                "model.safetensors", "model-*-of-*.safetensors")


def components(params: Params, name: str) -> list[str]:
    """The components of models/<name> that the stages load; [] for a single (transformers) model."""
    folder = f"models/{name}"
    used = {"vae" for encoder in params.encoders.values() if encoder.kind == "vae" and encoder.model == folder}
    for backbone in params.backbones.values():
        if backbone.model != folder:
            continue
        used |= set(KINDS[backbone.kind].components)
        if backbone.kind == "sd3" and backbone.t5:
            used |= {"text_encoder_3", "tokenizer_3"}
        if backbone.kind == "vae-sd2" and backbone.noise:
            used.add("scheduler")
    return sorted(used)


def hub_patterns(needed: list[str]) -> list[str]:
    """`allow_patterns` for snapshot_download: those components' configs, tokenizer files and weights."""
    if not needed:  # a single model at the repository's root
        return ["*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors"]
    patterns = ["model_index.json"]
    for component in needed:
        patterns += [f"{component}/*.json", f"{component}/*.txt", f"{component}/*.model"]
        patterns += [f"{component}/{weights}" for weights in WEIGHT_FILES]
    return patterns


def is_complete(out: Path, needed: list[str]) -> bool:
    """The folder already holds every needed component: its config and, where it has weights, all of
    them (every shard its index lists)."""
    def has(folder: Path, weighted: bool) -> bool:
        configs = any((folder / c).exists() for c in ("config.json", "scheduler_config.json", "tokenizer_config.json"))
        if not configs or not weighted:
            return configs
        for index in folder.glob("*.safetensors.index.json"):
            if index.name.count(".") == 3:  # the default precision's index, not a variant's
                shards = set(json.loads(index.read_text())["weight_map"].values())
                return all((folder / shard).exists() for shard in shards)
        return any(next(folder.glob(w), None) for w in WEIGHT_FILES)

    if not needed:
        return has(out, True)
    return (out / "model_index.json").exists() and all(
        has(out / c, not c.startswith(("tokenizer", "scheduler"))) for c in needed)


def materialise(source: str, out: str | Path, seed: int = 0, revision: str | None = None,
                needed: list[str] | None = None) -> Path:
    """Write the pipeline folder `out` from `source`: `realsize:<name>` or `tiny:<name>` (rebuilt each time:
    deterministic), or a hub id (only the `needed` components).

    `out` records what made it (MARKER). A hub folder from the same source and revision that holds every
    needed component is kept; any other folder this stage made is replaced (removed first: it may hold
    links into the Hugging Face cache). For a hub source, a folder without a record, one the user put
    there (e.g. copied on an offline machine), is used as it is if complete, and never removed."""
    out = Path(out)
    hub.quiet()
    needed = needed or []
    origin = {"source": source, "revision": revision, "seed": seed}
    built_here = source.startswith((realsize.REALSIZE, TINY))
    if (out / MARKER).exists():
        found = json.loads((out / MARKER).read_text())
        if built_here or {k: found.get(k) for k in origin} != origin:
            shutil.rmtree(out)
    elif built_here and out.exists():
        shutil.rmtree(out)  # as DVC itself removed stage outputs before this stage kept them (persist)
    elif out.exists() and any(out.iterdir()) and not (out / ".cache" / "huggingface").exists():
        if not is_complete(out, needed):  # not ours, and not a download of ours that was interrupted
            raise PipelineError(out, None, "holds an incomplete model this stage did not make (it needs "
                                           f"{needed or 'the model'}); complete or remove it")
        return out
    if out.exists() and is_complete(out, needed) and not built_here:
        return out
    if source in realsize.MOVED:
        raise PipelineError(source, None, f"removed from the Hugging Face hub; its files are mirrored at "
                                          f"{realsize.MOVED[source]!r}: use that `source:`")
    if source.startswith(TINY):
        _make_tiny(source[len(TINY):], out, seed)
    elif built_here:
        realsize.make_realsize(source[len(realsize.REALSIZE):], out, seed)
    else:
        _fetch(source, out, revision, needed)
    (out / MARKER).write_text(json.dumps(origin) + "\n")
    return out


def _make_tiny(name: str, out: Path, seed: int) -> None:
    if name not in tiny_models.TINY_BUILDERS:
        raise PipelineError("params.yaml", "models", f"unknown tiny model {TINY + name!r}; expected one of "
                                                     f"{[TINY + known for known in sorted(tiny_models.TINY_BUILDERS)]}")
    tiny_models.make_tiny(name, out, seed)


def _fetch(source: str, out: Path, revision: str | None, needed: list[str]) -> None:
    patterns = hub_patterns(needed)
    try:  # a Hugging Face cache (HF_HOME) that already holds this revision: no network
        cached = Path(snapshot_download(source, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        cached = None
    if cached is not None and is_complete(cached, needed):
        _link_tree(cached, out, patterns)
        return
    try:
        snapshot_download(source, revision=revision, local_dir=out, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - each cause gets its own one-line remedy
        if hub.is_gated(exc):
            raise hub.gated_error(source) from None
        if isinstance(exc, RevisionNotFoundError):
            raise PipelineError(source, "revision", f"no revision {revision!r} in this repository") from None
        if isinstance(exc, RepositoryNotFoundError):
            raise PipelineError(source, None, "no such repository on the Hugging Face hub (or a private one: "
                                              "provide a token with HF_TOKEN or `hf auth login`)") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(source, None, f"cannot download the model ({reason}); this stage needs network once. "
                            f"Offline: set HF_HOME to a Hugging Face cache that holds revision {revision}, or copy "
                            f"the pipeline folder (`hf download {source} --revision {revision}` elsewhere) to "
                            f"{out}") from None
    if not is_complete(out, needed):  # huggingface_hub may return what is there without saying why
        raise PipelineError(source, None, f"the download into {out} is incomplete (no network, or no access?); "
                                          "run the stage again where the hub is reachable")


def _link_tree(cached: Path, out: Path, patterns: list[str]) -> None:
    """The needed files of the cache's snapshot into `out`: hard links to its blobs where the filesystem
    allows, else copies."""
    files = [path.relative_to(cached).as_posix() for path in cached.rglob("*") if not path.is_dir()]
    for name in filter_repo_objects(files, allow_patterns=patterns):
        path = cached / name
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path.resolve(), target)
        except OSError:
            shutil.copyfile(path.resolve(), target)
