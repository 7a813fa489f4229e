"""Loading models by hub id or local folder, with a one-line error when that is impossible."""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub.utils.logging
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import GatedRepoError

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
    """Our progress bars report progress; the libraries' loading bars, advice and retry warnings are noise
    here (a failure is reported once, in one line)."""
    import diffusers.utils.logging  # seconds to import, and matching imports this module (resolve_device)
    import transformers.utils.logging  # likewise

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()


def from_pretrained(cls, model: str, subfolder: str | None = None, revision: str | None = None, **kwargs):
    """`cls.from_pretrained(model)` for a hub id or a local folder; failures become one line."""
    quiet()
    if subfolder:
        kwargs["subfolder"] = subfolder
    if not Path(model).exists():
        kwargs |= {"revision": revision} if revision else {}
        kwargs |= {"local_files_only": True} if offline() else {}
    try:
        return cls.from_pretrained(model, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub, file and config errors all mean "cannot load this"
        raise _load_error(exc, model, f"{cls.__name__}" + (f" ({subfolder})" if subfolder else "")) from None


def load_config(model: str, filename: str, subfolder: str | None = None, revision: str | None = None) -> dict:
    """A JSON config file of a hub repository or local folder (`model_index.json`, `unet/config.json`)."""
    path = Path(model) / (subfolder or "") / filename
    try:
        if not Path(model).exists():
            path = hf_hub_download(model, filename, subfolder=subfolder, revision=revision, local_files_only=offline())
        return json.loads(Path(path).read_text())
    except Exception as exc:  # noqa: BLE001
        raise _load_error(exc, model, (f"{subfolder}/" if subfolder else "") + filename) from None


def offline() -> bool:
    """HF_HUB_OFFLINE as it is now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _load_error(exc: Exception, model: str, what: str) -> PipelineError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if Path(model).exists():
        return PipelineError(model, None, f"cannot load {what} from this folder ({reason})")
    if is_gated(exc):
        return gated_error(model)
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return PipelineError(
        model, None,
        f"cannot load {what}: not a local folder and not in the Hugging Face cache (HF_HOME={cache}); "
        f"download it where there is network (`hf download {model}`) and set HF_HOME, "
        f"or set `model:` in params.yaml to a local pipeline folder",
    )


def is_gated(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, GatedRepoError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def gated_error(repo: str) -> PipelineError:
    return PipelineError(repo, None, f"gated repository: accept its licence at https://huggingface.co/{repo} "
                                     "with your account, then provide a token (`export HF_TOKEN=hf_...` or "
                                     "`hf auth login`)")
