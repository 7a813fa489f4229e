"""models/<name>: a pipeline folder, either built here (a tiny random model, or a real architecture with
random weights) or a snapshot of a hub repository at a pinned revision, holding only what is used.

What is used is derived from params.yaml: the VAE of every encoder that names the folder, and each
backbone's components (sd2: tokenizer, text encoder, U-Net, scheduler; sd3: CLIP-L, CLIP-G, T5 with
`t5: true`, transformer; flux: CLIP-L, T5, transformer; dinov2/clip: the one model). Of each component
only the configs, tokenizer files and the default-precision safetensors are fetched: no single-file
checkpoints (.ckpt, root .safetensors), no .bin duplicates, no fp16 variants, no other components.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import hub, realsize
from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.tiny_models import TINY_BUILDERS, make_tiny

BACKBONE_COMPONENTS = {
    "sd2": ["text_encoder", "tokenizer", "unet", "scheduler"],
    "sd3": ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer"],
    "flux": ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer"],
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*-of-*.safetensors",
                "model.safetensors", "model-*-of-*.safetensors")


def components(params: Params, name: str) -> list[str]:
    """The components of models/<name> that the stages load; [] for a single (transformers) model."""
    folder = f"models/{name}"
    used = {"vae" for encoder in params.encoders.values() if encoder.kind == "vae" and encoder.model == folder}
    for backbone in params.backbones.values():
        if backbone.model != folder:
            continue
        used |= set(BACKBONE_COMPONENTS.get(backbone.kind, []))
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
    """The folder already holds every needed component (its config, and weights where it has any)."""
    def has(folder: Path, weighted: bool) -> bool:
        configs = any((folder / c).exists() for c in ("config.json", "scheduler_config.json", "tokenizer_config.json"))
        return configs and (not weighted or any(next(folder.glob(w), None) for w in WEIGHT_FILES))

    if not needed:
        return has(out, True)
    return (out / "model_index.json").exists() and all(
        has(out / c, not c.startswith(("tokenizer", "scheduler"))) for c in needed)


def materialise(source: str, out: str | Path, seed: int = 0, revision: str | None = None,
                needed: list[str] | None = None) -> Path:
    """Write the pipeline folder `out` from `source`: a tiny model name, `realsize:<name>`, or a hub id
    (only the `needed` components; nothing is fetched when the folder already holds them)."""
    out = Path(out)
    hub.quiet()
    if source in TINY_BUILDERS:
        return make_tiny(source, out, seed)
    if source.startswith(realsize.REALSIZE):
        return realsize.make_realsize(source[len(realsize.REALSIZE):], out, seed)
    if source in realsize.MOVED:
        raise PipelineError(source, None, f"removed from the Hugging Face hub; its files are mirrored at "
                                          f"{realsize.MOVED[source]!r}: use that `source:`")
    needed = needed or []
    if is_complete(out, needed):
        return out
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    patterns = hub_patterns(needed)
    try:  # a Hugging Face cache (HF_HOME) that already holds this revision: no network
        cached = Path(snapshot_download(source, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        cached = None
    if cached is not None and is_complete(cached, needed):
        _link_tree(cached, out)
        return out
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
    return out


def _link_tree(cached: Path, out: Path) -> None:
    """The cache's snapshot into `out`: hard links to its blobs where the filesystem allows, else copies."""
    import os
    import shutil

    for path in cached.rglob("*"):
        if path.is_dir():
            continue
        target = out / path.relative_to(cached)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path.resolve(), target)
        except OSError:
            shutil.copyfile(path.resolve(), target)
