"""Where a backbone's components come from: `Parts` loads them one at a time from a hub id or pipeline
folder, on the device, in the dtype and offload the params ask for."""

from __future__ import annotations

import gc
import importlib

import torch

from pipeline.errors import PipelineError
from pipeline.models import hub
from pipeline.models.kinds import OFFLOAD


class Parts:
    """Where a backbone's components come from: `from_pretrained` of a hub id or pipeline folder, one
    component at a time (`unet`, `text_encoder_2`...), each only when asked for. Its class is the one
    the folder's `model_index.json` names, so a component is loaded exactly as its pipeline would."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 revision: str | None = None):
        if offload not in OFFLOAD:
            raise PipelineError("params.yaml", "offload", f"expected one of {list(OFFLOAD)}, got {offload!r}")
        self.model, self.device, self.dtype, self.offload, self.revision = model, device, dtype, offload, revision
        self._index: dict | None = None

    def index(self) -> dict:
        """The pipeline's model_index.json: component name -> [library, class]."""
        if self._index is None:
            self._index = hub.load_config(self.model, "model_index.json", revision=self.revision)
        return self._index

    def component_class(self, name: str):
        entry = self.index().get(name)
        if not isinstance(entry, list) or entry[0] is None:
            raise PipelineError(self.model, name, "the pipeline has no such component (model_index.json)")
        return getattr(importlib.import_module(entry[0]), entry[1])

    def component(self, name: str):
        """A text-side component (tokenizer, text encoder, scheduler) on the device."""
        return self.load(self.component_class(name), name)

    def load(self, cls, subfolder: str | None = None, denoiser: bool = False):
        kwargs = {} if is_config_only(cls) else {"dtype": self.dtype}
        loaded = hub.from_pretrained(cls, self.model, subfolder=subfolder, revision=self.revision, **kwargs)
        if not isinstance(loaded, torch.nn.Module):
            return loaded
        loaded.eval().requires_grad_(False)
        if denoiser and self.offload == "blocks":
            # No CUDA streams: their prefetching is switched on by the end of a whole forward pass,
            # and capture stops the pass after the deepest layer.
            loaded.enable_group_offload(onload_device=self.device, offload_device=torch.device("cpu"),
                                        offload_type="block_level", num_blocks_per_group=1)
            return loaded
        try:
            return loaded.to(self.device)
        except torch.OutOfMemoryError:
            raise PipelineError(self.model, subfolder, f"does not fit on {self.device}; set `offload: blocks` "
                                "for this backbone (see `python cli.py plan`)") from None

    def config(self, subfolder: str | None = None) -> dict:
        return hub.load_config(self.model, "config.json", subfolder=subfolder, revision=self.revision)

    def release(self) -> None:
        """Give the memory of components dropped since back to the device."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def is_config_only(cls) -> bool:
    """Tokenizers and schedulers take no dtype."""
    return not issubclass(cls, torch.nn.Module)
