"""Stand-ins for the five hub repositories of the real study (profiles/spair71k.yaml), for a dress rehearsal.

The CI rehearsal runs the real profile end to end with the Hugging Face hub replaced by a local HTTP
stand-in, which serves, for each pinned repository, a folder written by `make_hub_snapshot`: the real
repository's file layout (model_index.json, component folders, sharded weights where the real ones are
sharded, tokenizer files, and the decoys the `model@` stage must not download: root single-file
checkpoints, .bin duplicates, fp16 variants, OpenCLIP files), holding random-weight models of the real
classes. Every config file is the released one (pipeline/models/real_configs/) with only its width
fields narrowed (from pipeline/demo/tiny_models.py's configs): depths, block types, module paths, patch
sizes, latent channels, VAE factors and scaling/shift factors, token lengths, schedulers and the weight
files' precision are the real ones. So the rehearsal proves everything of the real profile except the
learned values and the widths, on the CPU, at the profile's real canvases (what it takes: docs/development.md).

Tokenizers are the project's tiny ones (pipeline/models/tokenizers.py) in the real files' formats; T5's
`spiece.model` is left out (the fast tokenizer reads tokenizer.json; writing a SentencePiece model needs
the sentencepiece package). Decoys are a few bytes of text: anything that downloads and reads one fails.

Usage::

    python -m pipeline.demo.hub_snapshots stabilityai/stable-diffusion-3-medium-diffusers /tmp/hub/sd3 --seed 0
    python -m pipeline.demo.hub_snapshots --all /tmp/hub      # /tmp/hub/<owner>/<name> for each of the five
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, Dinov2Model, T5EncoderModel

from pipeline.demo import tiny_models as tiny
from pipeline.models import hub, realsize
from pipeline.models.hub import DTYPES
from pipeline.models.tokenizers import (TOKENIZER_MAX_LENGTH, make_tiny_clip_tokenizer, make_tiny_t5_tokenizer,
                                        write_clip_vocab)

DECOY = b"decoy: the real repository has this file; the model stage must not download it\n"

# The fields that set a component's width, taken from tiny_models' configs; every other field of a config
# (depth, block types, activations, norms, sizes, factors) stays the released one.
VAE_WIDTHS = ("block_out_channels", "norm_num_groups")  # real (128, 256, 512, 512), 32 groups
# layers_per_block stays the real 2 (tiny_models: 1): the real depth, at the cost of a slower U-Net forward.
UNET_WIDTHS = ("block_out_channels", "attention_head_dim", "norm_num_groups")
CLIP_TEXT_WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "projection_dim")
T5_WIDTHS = ("d_kv", "d_ff", "num_heads")  # d_model is the joint attention width of its denoiser
SD3_WIDTHS = ("num_attention_heads", "attention_head_dim", "caption_projection_dim", "pooled_projection_dim")
FLUX_WIDTHS = ("num_attention_heads", "attention_head_dim", "axes_dims_rope")  # rope axes sum to the head width
VIT_WIDTHS = ("hidden_size", "num_attention_heads", "intermediate_size", "mlp_ratio", "projection_dim")

# T5 is as wide as SD3's joint attention, twice the CLIP-L + CLIP-G concat that is padded to it (real:
# 4096 = 2 x (768 + 1280)).
SD3_JOINT_WIDTH = 2 * (tiny.SD3_TEXT_ENCODER_CONFIG["hidden_size"] + tiny.SD3_TEXT_ENCODER_2_CONFIG["hidden_size"])
# Shards of the real weight files (FLUX.1-dev's transformer: 3; T5-XXL: 2); everything else is one file.
SHARDS = {("flux-dev", "transformer"): 3, ("flux-dev", "text_encoder_2"): 2, ("sd3-medium", "text_encoder_3"): 2}

# The released preprocessor configs (image processors are not used by the stages; they are there as on the hub).
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CLIP_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
                     "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
                     "image_std": CLIP_STD, "resample": 3, "size": 224}
DINOV2_PREPROCESSOR = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                       "do_normalize": True, "do_rescale": True, "do_resize": True,
                       "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
                       "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 0.00392156862745098,
                       "size": {"shortest_edge": 256}}


# ---- files ----------------------------------------------------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _real(folder: str, name: str = "config.json") -> dict:
    """A released config file (pipeline/models/real_configs/<folder>/<name>)."""
    return json.loads((realsize.CONFIGS / folder / name).read_text())


def _narrowed(real: dict, tiny_config: dict, widths: tuple[str, ...], **fields) -> dict:
    """The released config with its width fields from `tiny_config` (and `fields`); keys keep their order,
    new ones come last. Round-tripped through JSON: what is built is what config.json says."""
    return json.loads(json.dumps({**real, **{k: tiny_config[k] for k in widths if k in tiny_config}, **fields}))


def _decoys(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(DECOY)


def _seed(seed: int, component: str) -> int:
    # Each component its own stream, independent of the order they are built in.
    return seed + zlib.crc32(component.encode())


def _save_model(factory: Callable[[], torch.nn.Module], config: dict, folder: Path, seed: int, dtype: torch.dtype,
                shards: int = 1) -> None:
    """Build, cast to the repository's precision and write safetensors in `shards` files (sharded ones with
    their index, named as save_pretrained names them); config.json is `config` as written here (the released
    file with narrowed widths), not the library's re-serialisation of it."""
    # nn.Module.to: diffusers' own `to` warns about casting a model (to keep modules in float32; none here).
    model = torch.nn.Module.to(tiny._build(factory, seed), dtype)
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        size = -(-total // shards)
        while True:  # the smallest shard size that gives the real number of files
            with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=size)
                written = sorted(Path(tmp).glob("*-of-*.safetensors"))
                if len(written) == shards:
                    for path in Path(tmp).iterdir():
                        shutil.move(path, folder / path.name)
                    break
                if len(written) < shards:
                    raise RuntimeError(f"{folder}: cannot shard {total} bytes into {shards} files")
            size = size * 21 // 20 + 1
    _write_json(folder / "config.json", config)


def _diffusers(cls, config: dict, folder: Path, seed: int, dtype: torch.dtype, shards: int = 1) -> None:
    _save_model(lambda: cls.from_config(config), config, folder, seed, dtype, shards)


def _transformers(cls, config: dict, folder: Path, seed: int, dtype: torch.dtype, shards: int = 1) -> None:
    _save_model(lambda: cls(cls.config_class(**config)), config, folder, seed, dtype, shards)


def _clip_tokenizer(folder: Path, pad: str):
    """A CLIP tokenizer folder as the hub's SD repositories have it (vocab.json, merges.txt and the
    transformers 4 tokenizer_config.json / special_tokens_map.json; no tokenizer.json). Returns the
    tokenizer, for its ids."""
    tok = make_tiny_clip_tokenizer(pad_token=pad)
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_vocab(folder)

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    special = {"bos_token": added(tok.bos_token), "eos_token": added(tok.eos_token),
               "pad_token": pad if pad != tok.eos_token else added(pad), "unk_token": added(tok.unk_token)}
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": special["bos_token"], "do_lower_case": True,
        "eos_token": special["eos_token"], "errors": "replace", "model_max_length": TOKENIZER_MAX_LENGTH,
        "pad_token": special["pad_token"], "tokenizer_class": "CLIPTokenizer", "unk_token": special["unk_token"]})
    _write_json(folder / "special_tokens_map.json",
                {k: (v["content"] if isinstance(v, dict) else v) for k, v in special.items()})
    return tok


def _t5_tokenizer(folder: Path):
    """A T5 tokenizer folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json (the hub's also
    has spiece.model)."""
    tok = make_tiny_t5_tokenizer()
    tok.save_pretrained(folder)
    _write_json(folder / "special_tokens_map.json",
                {"eos_token": tok.eos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token})
    return tok


def _clip_text(real: dict, tok, tiny_config: dict) -> dict:
    # Token ids from the tiny tokenizer (vocabulary size, bos / eos / pad), as tiny_models does.
    ids = tiny._clip_config(dict, tok, {})
    return _narrowed(real, tiny_config, CLIP_TEXT_WIDTHS, **ids)


def _t5(real: dict, tok, d_model: int) -> dict:
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "decoder_start_token_id": tok.pad_token_id}
    return _narrowed(real, tiny.FLUX_TEXT_ENCODER_2_CONFIG, T5_WIDTHS, d_model=d_model, **ids)


def _clip_text_encoder(cls, out: Path, folder: str, name: str, pad: str, tiny_config: dict, seed: int,
                       dtype: torch.dtype) -> dict:
    """A pipeline repository's tokenizer<name>/ and text_encoder<name>/: the CLIP tokenizer, and a `cls` text
    encoder of the released config with narrowed widths. Returns that config."""
    tok = _clip_tokenizer(out / f"tokenizer{name}", pad)
    text = _clip_text(_real(folder, f"text_encoder{name}/config.json"), tok, tiny_config)
    _transformers(cls, text, out / f"text_encoder{name}", _seed(seed, f"text_encoder{name}"), dtype)
    return text


def _vae(out: Path, folder: str, tiny_config: dict, seed: int, dtype: torch.dtype) -> None:
    vae = _narrowed(_real(folder, "vae/config.json"), tiny_config, VAE_WIDTHS)
    _diffusers(AutoencoderKL, vae, out / "vae", _seed(seed, "vae"), dtype)


def _index_and_schedulers(folder: str, out: Path) -> None:
    """model_index.json and the scheduler's config: the released files, byte for byte."""
    shutil.copyfile(realsize.CONFIGS / folder / "model_index.json", out / "model_index.json")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(realsize.CONFIGS / folder / "scheduler" / "scheduler_config.json",
                    out / "scheduler" / "scheduler_config.json")


def _readme(out: Path, model: realsize.RealModel) -> None:
    (out / "README.md").write_text(
        f"# Stand-in for {model.hub_id} at {model.revision}\n\n"
        "Written by pipeline/demo/hub_snapshots.py: the repository's file layout and released configs with "
        "narrow widths and seeded random weights, for the CI rehearsal of profiles/spair71k.yaml.\n")


# ---- repositories ---------------------------------------------------------------------------------

def _sd2(out: Path, seed: int, dtype: torch.dtype) -> None:
    folder = "sd2-1"
    _index_and_schedulers(folder, out)
    text = _clip_text_encoder(CLIPTextModel, out, folder, "", tiny.SD2_TOKENIZER_PAD, tiny.SD2_TEXT_ENCODER_CONFIG,
                              seed, dtype)
    unet = _narrowed(_real(folder, "unet/config.json"), tiny.SD2_UNET_CONFIG, UNET_WIDTHS,
                     cross_attention_dim=text["hidden_size"])
    _diffusers(UNet2DConditionModel, unet, out / "unet", _seed(seed, "unet"), dtype)
    _vae(out, folder, tiny.SD2_VAE_CONFIG, seed, dtype)
    _write_json(out / "feature_extractor" / "preprocessor_config.json", CLIP_PREPROCESSOR)
    _decoys(out, ["v2-1_768-ema-pruned.safetensors", "v2-1_768-ema-pruned.ckpt", "v2-1_768-nonema-pruned.safetensors",
                  "v2-1_768-nonema-pruned.ckpt", "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
                  "text_encoder/pytorch_model.fp16.bin"]
            + [f"{c}/diffusion_pytorch_model.{w}" for c in ("unet", "vae")
               for w in ("fp16.safetensors", "bin", "fp16.bin")])


def _sd3(out: Path, seed: int, dtype: torch.dtype) -> None:
    folder = "sd3-medium"
    _index_and_schedulers(folder, out)
    for name, pad, tiny_config in (("", tiny.SD3_TOKENIZER_PAD, tiny.SD3_TEXT_ENCODER_CONFIG),
                                   ("_2", tiny.SD3_TOKENIZER_2_PAD, tiny.SD3_TEXT_ENCODER_2_CONFIG)):
        _clip_text_encoder(CLIPTextModelWithProjection, out, folder, name, pad, tiny_config, seed, dtype)
    t5 = _t5(_real(folder, "text_encoder_3/config.json"), _t5_tokenizer(out / "tokenizer_3"), SD3_JOINT_WIDTH)
    _transformers(T5EncoderModel, t5, out / "text_encoder_3", _seed(seed, "text_encoder_3"), dtype,
                  SHARDS[folder, "text_encoder_3"])
    transformer = _narrowed(_real(folder, "transformer/config.json"), tiny.SD3_TRANSFORMER_CONFIG, SD3_WIDTHS,
                            joint_attention_dim=SD3_JOINT_WIDTH)
    _diffusers(SD3Transformer2DModel, transformer, out / "transformer", _seed(seed, "transformer"), dtype)
    _vae(out, folder, tiny.SD3_VAE_CONFIG, seed, dtype)
    _decoys(out, ["sd3_medium.safetensors"])


def _flux(out: Path, seed: int, dtype: torch.dtype) -> None:
    folder = "flux-dev"
    _index_and_schedulers(folder, out)
    text = _clip_text_encoder(CLIPTextModel, out, folder, "", tiny.FLUX_TOKENIZER_PAD, tiny.FLUX_TEXT_ENCODER_CONFIG,
                              seed, dtype)
    t5 = _t5(_real(folder, "text_encoder_2/config.json"), _t5_tokenizer(out / "tokenizer_2"),
             tiny.FLUX_TEXT_ENCODER_2_CONFIG["d_model"])
    _transformers(T5EncoderModel, t5, out / "text_encoder_2", _seed(seed, "text_encoder_2"), dtype,
                  SHARDS[folder, "text_encoder_2"])
    transformer = _narrowed(_real(folder, "transformer/config.json"), tiny.FLUX_TRANSFORMER_CONFIG, FLUX_WIDTHS,
                            joint_attention_dim=t5["d_model"], pooled_projection_dim=text["hidden_size"])
    _diffusers(FluxTransformer2DModel, transformer, out / "transformer", _seed(seed, "transformer"), dtype,
               SHARDS[folder, "transformer"])
    _vae(out, folder, tiny.FLUX_VAE_CONFIG, seed, dtype)
    _decoys(out, ["flux1-dev.safetensors", "ae.safetensors"])


def _dinov2(out: Path, seed: int, dtype: torch.dtype) -> None:
    config = _narrowed(_real("dinov2-base"), tiny.TINY_DINOV2_CONFIG, VIT_WIDTHS)
    _transformers(Dinov2Model, config, out, _seed(seed, "dinov2"), dtype)
    _write_json(out / "preprocessor_config.json", DINOV2_PREPROCESSOR)
    _decoys(out, ["pytorch_model.bin"])


def _clip(out: Path, seed: int, dtype: torch.dtype) -> None:
    """The full CLIPModel (text and vision towers), as laion's repository holds it; the vit backbone loads
    its CLIPVisionModel from it."""
    real = _real("clip-vit-h-14")
    tok = make_tiny_clip_tokenizer(pad_token=tiny.SD2_TOKENIZER_PAD)  # OpenCLIP's tokenizer pads with "!"
    text = _clip_text(real["text_config"], tok, {**tiny.SD2_TEXT_ENCODER_CONFIG,  # the same OpenCLIP-H text tower
                                                 "projection_dim": tiny.TINY_CLIP_VISION_CONFIG["projection_dim"]})
    vision = _narrowed(real["vision_config"], tiny.TINY_CLIP_VISION_CONFIG, VIT_WIDTHS)
    config = _narrowed(real, {}, (), projection_dim=vision["projection_dim"], text_config=text, vision_config=vision)
    _transformers(CLIPModel, config, out, _seed(seed, "clip"), dtype)
    tok.save_pretrained(out)  # tokenizer.json
    _clip_tokenizer(out, tiny.SD2_TOKENIZER_PAD)  # vocab.json, merges.txt and the transformers 4 configs
    _write_json(out / "preprocessor_config.json", CLIP_PREPROCESSOR)
    _write_json(out / "open_clip_config.json", {
        "model_cfg": {"embed_dim": config["projection_dim"],
                      "vision_cfg": {"image_size": vision["image_size"], "layers": vision["num_hidden_layers"],
                                     "width": vision["hidden_size"], "patch_size": vision["patch_size"],
                                     "head_width": vision["hidden_size"] // vision["num_attention_heads"]},
                      "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                                   "width": text["hidden_size"], "heads": text["num_attention_heads"],
                                   "layers": text["num_hidden_layers"]}},
        "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}})
    _decoys(out, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"])


BUILDERS = {"sd2-1": _sd2, "sd3-medium": _sd3, "flux-dev": _flux, "dinov2-base": _dinov2, "clip-vit-h-14": _clip}


def make_hub_snapshot(hub_id: str, out: str | Path, seed: int = 0) -> Path:
    """Write the stand-in for the hub repository `hub_id` (one of pipeline.models.realsize.REAL_MODELS) into
    `out`: its file layout, its released configs with narrow widths, seeded random weights in the
    repository's precision. The same seed gives the same bytes."""
    if hub_id not in realsize.REAL_MODELS:
        raise ValueError(f"no stand-in for {hub_id!r}; expected one of {sorted(realsize.REAL_MODELS)}")
    model = realsize.REAL_MODELS[hub_id]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    BUILDERS[model.folder](out, seed, DTYPES[model.weights_dtype])
    _readme(out, model)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write stand-ins of the real study's hub repositories.")
    parser.add_argument("hub_id", nargs="?", help=f"one of {sorted(realsize.REAL_MODELS)}")
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--all", type=Path, metavar="ROOT", help="every repository, into ROOT/<owner>/<name>")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hub.quiet()
    if (args.all is None) == (args.out is None):
        parser.error("give a hub id and a folder, or --all ROOT")
    targets = {h: args.all / h for h in sorted(realsize.REAL_MODELS)} if args.all else {args.hub_id: args.out}
    for hub_id, out in targets.items():
        print(make_hub_snapshot(hub_id, out, seed=args.seed))


if __name__ == "__main__":
    main()
