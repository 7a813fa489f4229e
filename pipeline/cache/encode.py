"""Images onto the model canvas, through the VAE once: the posterior (mean, std) per image.

Canvas modes: `squash` (DIFT: resize to a square, ignoring aspect, bicubic), `pad` (keep aspect, fit the
long side, bicubic, pad right/bottom with 0 in [-1, 1] space) and `center` (GeoAware-SC's and sd-dino's
letterbox, exactly as their `resize` (utils/utils_correspondence.py) lays it out: the long side fits,
the short side is `int(np.around(size * short / long))`, Lanczos, centred at `(size - short) // 2`, padded
with black, uint8 0, i.e. -1 in [-1, 1]). The store's images table records the valid region
[valid_x0, valid_x1) x [valid_y0, valid_y1) of every image. Ensemble members later sample
`mean + std * eps` from the stored posterior, so the VAE never runs twice per image.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from diffusers import AutoencoderKL

from pipeline.cache import sizes, store
from pipeline.cache.provenance import code_closure, library_versions, model_identity
from pipeline.cache.store import FeatureStore
from pipeline.config import EncoderParams
from pipeline.data.images import open_rgb
from pipeline.errors import PipelineError, report_skipped, size_text
from pipeline.models import hub

CANVAS_MODES = ("squash", "pad", "center", "short-side")
# Per mode: PIL's resampling filter and the padding's value in [-1, 1] (`center`: GeoAware-SC's uint8 0).
# short-side: DIFT's DAVIS frames go through cv2.resize's default (bilinear, no antialiasing) instead.
RESAMPLING = {"squash": Image.Resampling.BICUBIC, "pad": Image.Resampling.BICUBIC, "center": Image.Resampling.LANCZOS}
PAD_VALUE = {"squash": 0.0, "pad": 0.0, "center": -1.0, "short-side": 0.0}
LONG_SIDE_MULTIPLE = 32  # short-side: DIFT's read_frame floors the long side to it (Tsingularity/dift @ 9421eb2, eval_davis.py)


def canvas_shape(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """(W, H) of the canvas of a width x height image: size x size, or for `short-side` the short side `size`
    and the long side scaled with it, floored to a multiple of 32 (DIFT: 854 x 480 -> 832 x 480)."""
    if mode != "short-side":
        return size, size
    if height > width:
        return size, int((size * height / width) // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE)
    return int((size * width / height) // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE), size


def canvas_layout(width: int, height: int, size: int, mode: str) -> tuple[int, int, int, int]:
    """(x0, y0, w, h): where a width x height image lies on its canvas (`canvas_shape`), and its resized size."""
    if mode == "squash":
        return 0, 0, size, size
    if mode == "short-side":
        return 0, 0, *canvas_shape(width, height, size, mode)
    if mode == "pad":
        scale = size / max(width, height)
        return 0, 0, max(1, round(width * scale)), max(1, round(height * scale))
    if mode == "center":  # GeoAware-SC's `resize`: np.around (half to even) of size x short / long, centred
        if height <= width:
            h = max(1, int(np.around(size * height / width)))
            return 0, (size - h) // 2, size, h
        w = max(1, int(np.around(size * width / height)))
        return (size - w) // 2, 0, w, size
    raise PipelineError("params.yaml", "canvas_mode", f"unknown canvas mode {mode!r}; expected one of {CANVAS_MODES}")


def load_canvas(path: Path, size: int, mode: str) -> torch.Tensor:
    """The image as a (3, H, W) tensor in [-1, 1], (W, H) its `canvas_shape`."""
    rgb = open_rgb(path)
    x0, y0, w, h = canvas_layout(rgb.width, rgb.height, size, mode)
    # In float64, then float32: the values the uint8 storage of a pixels store decodes to (codecs.UINT8_LOSSLESS).
    if mode == "short-side":  # DIFT's read_frame: cv2.resize(img, (tw, th)) of the uint8 frame
        resized = cv2.resize(np.asarray(rgb), (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        resized = np.asarray(rgb.resize((w, h), RESAMPLING[mode]))
    pixels = (np.asarray(resized, dtype=np.float64) / 127.5 - 1.0).astype(np.float32)
    canvas_width, canvas_height = canvas_shape(rgb.width, rgb.height, size, mode)
    canvas = np.full((canvas_height, canvas_width, 3), PAD_VALUE[mode], np.float32)
    canvas[y0:y0 + h, x0:x0 + w] = pixels
    return torch.from_numpy(canvas).permute(2, 0, 1)


def images_on_canvas(images: pd.DataFrame, size: int, mode: str) -> pd.DataFrame:
    """The images table with each image's valid region on the canvas, [valid_x0, valid_x1) x [valid_y0, valid_y1)."""
    table = images[["image", "category", "width", "height"]].copy()
    layout = np.array([canvas_layout(w, h, size, mode) for w, h in zip(table["width"], table["height"])],
                      dtype=np.float64).reshape(-1, 4)
    table["valid_x0"], table["valid_y0"] = layout[:, 0], layout[:, 1]
    table["valid_x1"], table["valid_y1"] = layout[:, 0] + layout[:, 2], layout[:, 1] + layout[:, 3]
    return table


def store_canvas(table: pd.DataFrame, size: int, mode: str, where: str | Path) -> tuple[int, int]:
    """(W, H) of the canvas every image of a store shares: a store's arrays have one grid, so images whose
    `short-side` canvases differ (a portrait among landscapes) are refused before anything is encoded."""
    shapes = {canvas_shape(int(w), int(h), size, mode) for w, h in zip(table["width"], table["height"])}
    if len(shapes) > 1:
        first = table.iloc[0]
        first_shape = canvas_shape(int(first["width"]), int(first["height"]), size, mode)
        other = next(row for row in table.itertuples() if canvas_shape(row.width, row.height, size, mode) != first_shape)
        raise PipelineError(where, "canvas", f"{other.image}, {size_text(other.width, other.height)}, would have a "
                            f"{size_text(*canvas_shape(other.width, other.height, size, mode))} canvas, "
                            f"{first['image']} a {size_text(*first_shape)} one: a store holds one canvas shape")
    return shapes.pop() if shapes else (size, size)


def peak_memory(device: torch.device) -> int:
    """Bytes: the device's peak allocation on CUDA; on the CPU this process's resident high-water mark (the
    kernel's VmHWM: rusage's ru_maxrss would carry over the peak of the process that started this one)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    status = Path("/proc/self/status")
    if status.exists():
        line = next((line for line in status.read_text().splitlines() if line.startswith("VmHWM:")), None)
        if line is not None:
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no procfs: Linux reports KiB, macOS bytes


def encode(params: EncoderParams, images: pd.DataFrame, dataset_root: str | Path, out: str | Path,
           replace: str = "never", dataset: dict | None = None, on_error: str = "fail", check_disk: bool = True) -> Path:
    """Write the latents store `out`: posterior mean and std per image (for `kind: pixels`, the canvas
    itself as the mean, std 0, so pixel-space backbones read it the same way). Resumes an interrupted run.
    `on_error: skip` records an unreadable image's reason in the store and goes on."""
    table = images_on_canvas(images, params.canvas, params.canvas_mode)
    canvas_size = store_canvas(table, params.canvas, params.canvas_mode, out)
    device = hub.resolve_device(params.device)
    dtype = hub.resolve_dtype(params.dtype, device)
    vae, factors = None, {"scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": 3}
    if params.kind == "vae":
        hub.quiet()
        vae = hub.from_pretrained(AutoencoderKL, params.model, subfolder="vae", dtype=dtype).to(device).eval()
        factors = {"scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.get("shift_factor") or 0.0,
                   "latent_channels": vae.config.latent_channels}
    determinants = {**asdict(params), "model_identity": model_identity(params.model),
                    "images": store.fingerprint(table.to_dict("list")),
                    "schema_version": store.SCHEMA_VERSION, "code": latents_code(), "versions": library_versions()}
    determinants.pop("device")
    attrs = {"kind": "latents", "encoder": params.kind, "model": params.model, "canvas": params.canvas,
             "canvas_mode": params.canvas_mode, "dtype": params.dtype, "device": str(device), "dataset": dataset or {},
             **factors, "determinants": determinants}
    if params.canvas_mode == "short-side":
        attrs["canvas_size"] = list(canvas_size)  # (W, H); a square canvas is canvas x canvas
    if check_disk:
        pending = FeatureStore.pending_count(out, determinants, len(table))
        sizes.check_disk(out, sizes.latents_bytes_per_image(params, factors["latent_channels"], canvas_size) * pending, pending)
    skipped = []
    with store.writer_lock(out), store.writing(out):
        latents = FeatureStore.create(out, attrs, table, None, replace)
        latents.redo()
        done = latents.done_mask()
        paths = images.set_index("image")["path"]
        with tqdm(total=len(table), initial=int(done.sum()), unit="img", desc=f"encode {Path(out).name}") as bar:
            for index in np.flatnonzero(~done):
                key = table["image"].iloc[index]
                try:
                    _encode_image(latents, index, key, vae, Path(dataset_root) / paths[key], params, device, dtype, out)
                except PipelineError as exc:
                    if on_error != "skip":
                        raise
                    latents.mark_skipped(index, str(exc))
                    skipped.append((key, str(exc)))
                bar.update()
        latents.finish()
    report_skipped(out, skipped)
    return Path(out)


def latents_code() -> dict[str, str]:
    """{qualified name: digest} of the code that computes a latents store's values (pipeline/cache/provenance.py,
    `code_closure`): the images table's valid regions, the VAE's loading and what each image's encoding reaches."""
    return code_closure([images_on_canvas, hub.from_pretrained, _encode_image])


def posterior(vae, pixels: torch.Tensor, device, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The VAE posterior (mean, std) of a (3, H, W) canvas as (H/8, W/8, C) float32 arrays. A half-precision
    VAE that overflows to NaN/inf on an image (the SD-family VAEs can, in float16) encodes that image
    again in float32."""
    with torch.no_grad():
        result = vae.encode(pixels[None].to(device, dtype)).latent_dist
        finite = torch.isfinite(result.mean).all() and torch.isfinite(result.std).all()
        if not finite and dtype != torch.float32:
            vae.to(torch.float32)
            try:
                result = vae.encode(pixels[None].to(device, torch.float32)).latent_dist
            finally:
                vae.to(dtype)
    return (result.mean[0].permute(1, 2, 0).float().cpu().numpy(),
            result.std[0].permute(1, 2, 0).float().cpu().numpy())


def _encode_image(latents: FeatureStore, index: int, key: str, vae, path: Path, params: EncoderParams, device, dtype, out) -> None:
    start = time.perf_counter()
    pixels = load_canvas(path, params.canvas, params.canvas_mode)
    if vae is None:
        mean = pixels.permute(1, 2, 0).numpy()
        std = np.zeros_like(mean)
    else:
        mean, std = posterior(vae, pixels, device, dtype)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise PipelineError(path, None, "the VAE gave non-finite latents for this image")
    h, w, c = mean.shape
    stride = pixels.shape[1] / h  # canvas rows a cell (a rectangular canvas's `canvas` is its short side)
    node = latents.ensure_layer(
        "posterior", {"mean": (("y", "x", "channel"), (h, w, c)), "std": (("y", "x", "channel"), (h, w, c))},
        {"y": (np.arange(h) + 0.5) * stride, "x": (np.arange(w) + 0.5) * stride, "channel": np.arange(c)},
        {"stride": stride, "description": "the canvas in [-1, 1]" if vae is None else
         "VAE posterior on the canvas, before any scaling"}, dtype="float32",
        storage={"mean": "canvas", "std": "zero"} if vae is None else None,
    )
    latents.write_image(index, [(node["mean"], mean), (node["std"], std)])
    latents.mark_done(index, time.perf_counter() - start, peak_memory(device))
