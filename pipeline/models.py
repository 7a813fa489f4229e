"""models/<name>: a pipeline folder, either a tiny random one or a snapshot of a hub repository."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hub import quiet
from pipeline.tiny_models import TINY_BUILDERS, make_tiny


def materialise(source: str, out: str | Path, seed: int = 0) -> Path:
    """Write the pipeline folder `out` from `source` (a tiny model name, or a hub repository id)."""
    out = Path(out)
    quiet()
    if source in TINY_BUILDERS:
        return make_tiny(source, out, seed)
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source, local_dir=out)
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-repo errors are all "cannot fetch"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(source, None, f"cannot download the model ({reason}); on an offline machine copy a "
                            f"pipeline folder to {out} instead") from None
    return out
