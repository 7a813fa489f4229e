"""Loading models by hub id or local folder, with a one-line error when that is impossible."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from pipeline.errors import PipelineError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("params.yaml", "device", f"{device!r} asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise PipelineError("params.yaml", "dtype", f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise PipelineError("params.yaml", "dtype", "float16 needs a GPU; use float32 (or bfloat16) on CPU")
    return DTYPES[dtype]


def quiet() -> None:
    """Our progress bars report progress; the libraries' loading bars and advice are noise here."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def from_pretrained(cls, model: str, **kwargs):
    """`cls.from_pretrained(model)` for a hub id or a local folder; failures become one line."""
    quiet()
    try:
        return cls.from_pretrained(model, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub, file and config errors all mean "cannot load this"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if Path(model).exists():
            raise PipelineError(model, None, f"cannot load {cls.__name__} from this folder ({reason})") from None
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise PipelineError(
            model, None,
            f"cannot load {cls.__name__}: not a local folder and not in the Hugging Face cache (HF_HOME={cache}); "
            f"download it where there is network (`hf download {model}`) and set HF_HOME, "
            f"or set `model:` in params.yaml to a local pipeline folder",
        ) from None


def model_identity(model: str) -> str:
    """What a store's fingerprint records of its model: for a local folder, a digest of its configs and
    of every weight file's size, head and tail (cheap on multi-GB checkpoints, yet different for any
    retrained or re-initialised weights); for a hub id, the id itself."""
    folder = Path(model)
    if not folder.is_dir():
        return model
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 1 << 20:
                handle.seek(max(size - (1 << 20), 1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()[:16]
