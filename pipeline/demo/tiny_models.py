"""Random-initialised, tiny stand-ins for Stable Diffusion 2.1, Stable Diffusion 3 and FLUX.1.

Real weights cannot be downloaded in CI or on air-gapped machines, yet the feature-extraction
code must be exercised end to end (``from_pretrained``, VAE encode, noising, hooks on the
denoiser). These builders write complete diffusers pipeline folders whose *structure* mirrors
the real models (block layout, latent channels, VAE spatial factor, token grid, scheduler
config) while every width is shrunk so that a folder is a few MB and builds in seconds.

Outputs are meaningless; only shapes, module paths and dtypes are faithful.

Usage::

    python -m pipeline.demo.tiny_models tiny-sd2 /tmp/tiny-sd2 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel,
                          Dinov2Config, Dinov2Model, T5Config, T5EncoderModel)

from pipeline.models.tokenizers import (TOKENIZER_MAX_LENGTH, make_tiny_clip_tokenizer,
                                        make_tiny_t5_tokenizer, write_clip_vocab)

# --------------------------------------------------------------------------------------------
# Tiny configs. Comments give the real model's value where the tiny one differs.
# --------------------------------------------------------------------------------------------


# ---- Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1) -------------------------------

SD2_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    # 4 blocks -> 3 downsamples -> spatial factor 8, as in the real VAE (128, 256, 512, 512).
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,  # real: 2
    "norm_num_groups": 4,  # real: 32; must divide the smallest width
    "act_fn": "silu",
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

SD2_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    # Real: OpenCLIP ViT-H text tower, hidden 1024, 23 layers used, gelu activation.
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": TOKENIZER_MAX_LENGTH,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    # vocab_size / bos / eos / pad ids are filled in from the generated tokenizer.
}

SD2_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 96,  # latent side for the native 768-px resolution
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    # Real: (320, 640, 1280, 1280); same 1:2:4:4 ratio, 1/40 of the width. up_blocks[1] emits
    # reversed(widths)[1] channels (1280 real, 32 here) at 1/16 of the image resolution.
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,  # real: 2
    # diffusers' historic misnomer: for SD2 this is the number of heads per block. Real:
    # (5, 10, 20, 20), i.e. 64-dim heads everywhere; here 8-dim heads everywhere.
    "attention_head_dim": (1, 2, 4, 4),
    "cross_attention_dim": SD2_TEXT_ENCODER_CONFIG["hidden_size"],
    "use_linear_projection": True,  # SD2 uses Linear (not 1x1 conv) proj_in/proj_out
    "upcast_attention": True,  # as in the 2.1 release (fp16 overflow guard)
    "norm_num_groups": 4,  # real: 32; must divide the smallest width
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD2_SCHEDULER_CONFIG: dict[str, Any] = {
    # Verbatim from the 2.1 release: v-prediction, "leading"-style offset of 1.
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# OpenCLIP-based tokenizers pad with "!" (id 0), unlike OpenAI CLIP's "<|endoftext|>".
SD2_TOKENIZER_PAD = "!"

# ---- Stable Diffusion 3 (stabilityai/stable-diffusion-3-medium-diffusers) ------------------

SD3_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (8, 16, 32, 32),  # real: (128, 256, 512, 512) -> factor 8 as well
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,  # real: 2
    "norm_num_groups": 4,  # real: 32
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    # The SD3 VAE has no 1x1 quant convs around the latent.
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# Real: CLIP-L (hidden 768, proj 768) and OpenCLIP bigG (hidden 1280, proj 1280).
SD3_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": TOKENIZER_MAX_LENGTH,
    "hidden_act": "quick_gelu",  # OpenAI CLIP-L
    "layer_norm_eps": 1e-5,
}
SD3_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **SD3_TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",  # OpenCLIP bigG
}
SD3_TOKENIZER_PAD = "<|endoftext|>"
SD3_TOKENIZER_2_PAD = "!"

_SD3_CLIP_CONCAT_DIM = SD3_TEXT_ENCODER_CONFIG["hidden_size"] + SD3_TEXT_ENCODER_2_CONFIG["hidden_size"]
_SD3_POOLED_DIM = SD3_TEXT_ENCODER_CONFIG["projection_dim"] + SD3_TEXT_ENCODER_2_CONFIG["projection_dim"]

SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 64,  # latent side of the default canvas: 64 * 8 = 512 px (real: 128 -> 1024 px)
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,  # real: 24; the last block is context_pre_only, as in the real model
    "num_attention_heads": 2,  # real: 24
    "attention_head_dim": 16,  # real: 64; inner width = 2 * 16 = 32
    # Width of prompt_embeds: the pipeline right-pads the concatenated CLIP hidden states to
    # this (the T5 width, 4096, in the real model). Must be >= the CLIP concat or the pad crops.
    "joint_attention_dim": _SD3_CLIP_CONCAT_DIM,
    # Context tokens are projected to the block width, so this must equal heads * head_dim.
    "caption_projection_dim": 2 * 16,
    "pooled_projection_dim": _SD3_POOLED_DIM,  # concat of both CLIP text_embeds (real 768+1280)
    # Token-grid side of the fixed sincos table that is centre-cropped per input:
    # 64 tokens -> 128 latents -> 1024 px (real: 192). 512 px needs only 32.
    "pos_embed_max_size": 64,
}

SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


# ---- FLUX.1 (black-forest-labs/FLUX.1-dev) --------------------------------------------------

FLUX_VAE_CONFIG: dict[str, Any] = {
    **SD3_VAE_CONFIG,  # same 16-channel, factor-8 layout without quant convs
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}

# Real: CLIP-L (CLIPTextModel, hidden 768); FLUX uses only its pooled output (pooler_output,
# hidden width), so pooled_projection_dim == hidden_size.
FLUX_TEXT_ENCODER_CONFIG: dict[str, Any] = SD3_TEXT_ENCODER_CONFIG  # the same tiny CLIP-L
FLUX_TOKENIZER_PAD = "<|endoftext|>"

# Real: T5 v1.1 XXL encoder (d_model 4096, d_ff 10240, 64 heads of 64, 24 layers, gated-gelu).
FLUX_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.1,  # as released; inert in eval mode
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "is_encoder_decoder": False,
    "use_cache": False,
    # vocab_size / pad / eos / decoder_start ids are filled in from the generated tokenizer.
}
# FLUX.1-dev runs T5 at 512 tokens (schnell: 256); the tokenizer's model_max_length is 512.

FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,  # 2x2 patching happens in the pipeline (_pack_latents): 16 * 4 = 64 features
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 2,  # real: 19 double-stream blocks
    "num_single_layers": 4,  # real: 38 single-stream blocks
    "attention_head_dim": 16,  # real: 128
    "num_attention_heads": 2,  # real: 24; inner width 2 * 16 = 32 (real 3072)
    "joint_attention_dim": FLUX_TEXT_ENCODER_2_CONFIG["d_model"],  # T5 width (real 4096)
    "pooled_projection_dim": FLUX_TEXT_ENCODER_CONFIG["hidden_size"],  # CLIP-L pooler width (real 768)
    "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled (schnell: False)
    "axes_dims_rope": (4, 6, 6),  # real (16, 56, 56); must sum to attention_head_dim
}

# Verbatim from FLUX.1-dev's scheduler_config.json.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _clip_config(cls_config, tok, overrides: dict[str, Any]):
    # eos_token_id must be the real id: CLIP pools the hidden state at the first eos position
    # (the legacy eos_token_id == 2 path uses argmax(input_ids), which only works for real CLIP).
    return cls_config(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **overrides,
    )


def _save_tokenizer_vocab_too(pipeline_dir: Path, subfolders: tuple[str, ...]) -> None:
    # transformers 5 saves only tokenizer.json; real SD folders also carry vocab.json/merges.txt,
    # which keeps the folder loadable by slow/legacy tokenizers.
    for sub in subfolders:
        write_clip_vocab(pipeline_dir / sub)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Fork the CPU RNG so building a tiny model does not perturb the caller's random stream. One thread: a
    # multi-threaded sin/cos split the SD3 position table differently between runs, moving a value by one ulp,
    # so that a rebuilt model@ folder (same seed) changed its hash and re-ran every stage below it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _build(factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    # Reseeding per model makes each one independent of construction order.
    with _seeded(seed):
        return factory().eval()


def _save_pipeline(pipeline_class, out_dir: str | Path, components: dict, clip_tokenizers: tuple[str, ...]) -> Path:
    out_dir = Path(out_dir)
    pipeline_class(**components).save_pretrained(out_dir, safe_serialization=True)
    _save_tokenizer_vocab_too(out_dir, clip_tokenizers)
    return out_dir


def make_tiny_sd2(out_dir: str | Path, seed: int = 0, unet_overrides: dict | None = None) -> Path:
    """Write a random-initialised, SD2.1-shaped ``StableDiffusionPipeline`` to ``out_dir``.

    ``unet_overrides`` widens or deepens the U-Net (benchmarks use a mid-size one)."""
    from diffusers import StableDiffusionPipeline  # a pipeline: importing one warns (transformers, no torchvision)

    tok = make_tiny_clip_tokenizer(pad_token=SD2_TOKENIZER_PAD)
    return _save_pipeline(StableDiffusionPipeline, out_dir, {
        "vae": _build(lambda: AutoencoderKL(**SD2_VAE_CONFIG), seed),
        "text_encoder": _build(lambda: CLIPTextModel(_clip_config(CLIPTextConfig, tok, SD2_TEXT_ENCODER_CONFIG)), seed),
        "tokenizer": tok,
        "unet": _build(lambda: UNet2DConditionModel(**{**SD2_UNET_CONFIG, **(unet_overrides or {})}), seed),
        "scheduler": DDIMScheduler(**SD2_SCHEDULER_CONFIG),
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
    }, ("tokenizer",))


def make_tiny_sd3(out_dir: str | Path, seed: int = 0, transformer_overrides: dict | None = None) -> Path:
    """Write a random-initialised, SD3-shaped ``StableDiffusion3Pipeline`` (no T5) to ``out_dir``.

    ``transformer_overrides`` widens or deepens the transformer (benchmarks use a mid-size one).

    Load it with ``StableDiffusion3Pipeline.from_pretrained(out_dir, **SD3_NO_T5_LOAD_KWARGS)``.
    """
    from diffusers import StableDiffusion3Pipeline  # a pipeline: importing one warns (transformers, no torchvision)

    tok = make_tiny_clip_tokenizer(pad_token=SD3_TOKENIZER_PAD)
    tok_2 = make_tiny_clip_tokenizer(pad_token=SD3_TOKENIZER_2_PAD)
    clip = lambda tokenizer, config: CLIPTextModelWithProjection(_clip_config(CLIPTextConfig, tokenizer, config))  # noqa: E731
    return _save_pipeline(StableDiffusion3Pipeline, out_dir, {
        "transformer": _build(lambda: SD3Transformer2DModel(**{**SD3_TRANSFORMER_CONFIG, **(transformer_overrides or {})}), seed),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        "vae": _build(lambda: AutoencoderKL(**SD3_VAE_CONFIG), seed),
        "text_encoder": _build(lambda: clip(tok, SD3_TEXT_ENCODER_CONFIG), seed),
        "tokenizer": tok,
        # Offset seed: the two encoders have identical shapes and would otherwise be identical.
        "text_encoder_2": _build(lambda: clip(tok_2, SD3_TEXT_ENCODER_2_CONFIG), seed + 1),
        "tokenizer_2": tok_2,
        # T5-XXL dropped: encode_prompt then substitutes zeros of width joint_attention_dim.
        "text_encoder_3": None, "tokenizer_3": None,
    }, ("tokenizer", "tokenizer_2"))


def make_tiny_flux(out_dir: str | Path, seed: int = 0, transformer_overrides: dict | None = None) -> Path:
    """Write a random-initialised, FLUX.1-dev-shaped ``FluxPipeline`` to ``out_dir``.

    CLIP-L (pooled output only) and a T5 encoder (sequence embeddings), a 16-channel VAE without
    quant convs, a guidance-distilled transformer of double- then single-stream blocks, and the
    dynamic-shift flow-matching scheduler. ``transformer_overrides`` widens or deepens the
    transformer (e.g. ``num_single_layers=10`` to have DiTF's ``single_transformer_blocks.9``).
    Load it with ``FluxPipeline.from_pretrained(out_dir)``.
    """
    from diffusers import FluxPipeline  # a pipeline: importing one warns (transformers, no torchvision)

    tok = make_tiny_clip_tokenizer(pad_token=FLUX_TOKENIZER_PAD)
    tok_2 = make_tiny_t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(tok_2), pad_token_id=tok_2.pad_token_id, eos_token_id=tok_2.eos_token_id,
        decoder_start_token_id=tok_2.pad_token_id, **FLUX_TEXT_ENCODER_2_CONFIG,
    )
    return _save_pipeline(FluxPipeline, out_dir, {
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        "vae": _build(lambda: AutoencoderKL(**FLUX_VAE_CONFIG), seed),
        "text_encoder": _build(lambda: CLIPTextModel(_clip_config(CLIPTextConfig, tok, FLUX_TEXT_ENCODER_CONFIG)), seed),
        "tokenizer": tok,
        "text_encoder_2": _build(lambda: T5EncoderModel(t5_config), seed + 1),
        "tokenizer_2": tok_2,
        "transformer": _build(lambda: FluxTransformer2DModel(**{**FLUX_TRANSFORMER_CONFIG, **(transformer_overrides or {})}), seed),
    }, ("tokenizer",))


# Components that are null in the tiny SD3 model_index.json. diffusers 0.42 refuses to load a
# pipeline whose non-optional components are null unless they are passed explicitly, so load
# with StableDiffusion3Pipeline.from_pretrained(path, **SD3_NO_T5_LOAD_KWARGS). The same kwargs
# skip loading T5-XXL from the real SD3 repository, so one loader call serves both.
SD3_NO_T5_LOAD_KWARGS: dict[str, None] = {"text_encoder_3": None, "tokenizer_3": None}

# Vision-transformer baselines from DIFT's table (DINOv2, OpenCLIP): tiny random encoders with the real
# models' patch size and token layout, written with save_pretrained like the real checkpoints.
TINY_DINOV2_CONFIG: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                                      "mlp_ratio": 2, "patch_size": 14, "image_size": 224}  # real B/14: 768, 12
TINY_CLIP_VISION_CONFIG: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                                           "num_attention_heads": 2, "patch_size": 14, "image_size": 224,
                                           "projection_dim": 32}  # real ViT-H/14: 1280, 32 layers


def make_tiny_dinov2(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-initialised ``Dinov2Model`` folder (patch 14, CLS token first, then patch tokens)."""
    model = _build(lambda: Dinov2Model(Dinov2Config(**TINY_DINOV2_CONFIG)), seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def make_tiny_clip_vision(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-initialised ``CLIPVisionModel`` folder (patch 14, CLS token first, then patch tokens)."""
    model = _build(lambda: CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG)), seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


TINY_BUILDERS = {
    "tiny-sd2": make_tiny_sd2,
    "tiny-sd3": make_tiny_sd3,
    "tiny-flux": make_tiny_flux,
    "tiny-dinov2": make_tiny_dinov2,
    "tiny-clip": make_tiny_clip_vision,
}


def make_tiny(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model called ``name`` ("tiny-sd2", "tiny-sd3" or "tiny-flux") into ``out_dir``."""
    try:
        builder = TINY_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(TINY_BUILDERS)}") from None
    return builder(out_dir, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-initialised tiny diffusers pipeline.")
    parser.add_argument("name", choices=sorted(TINY_BUILDERS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny(args.name, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
