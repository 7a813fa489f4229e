"""Image files, read and written in one place: every fault is a one-line PipelineError naming the file."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError


@contextlib.contextmanager
def _reading(path: str | Path):
    try:
        yield
    except FileNotFoundError:
        raise PipelineError(path, None, "image is missing") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PipelineError(path, None, f"unreadable image ({exc})") from None


def open_rgb(path: str | Path) -> Image.Image:
    """The image, decoded completely, as RGB (grayscale, CMYK and RGBA all become RGB)."""
    with _reading(path), Image.open(path) as image:
        return image.convert("RGB")


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    return np.asarray(open_rgb(path))


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) of an image that decodes completely: a truncated file fails here, not mid-extraction."""
    with _reading(path), Image.open(path) as image:
        image.load()
        return image.size


def read_rgba(path: str | Path) -> np.ndarray:
    """(H, W, 4) uint8 RGBA of an image that has an alpha channel (an edit sticker: alpha is its mask)."""
    with _reading(path), Image.open(path) as image:
        if not (image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info):
            raise PipelineError(path, "alpha", f"the edit needs an alpha channel (its mask); image mode is {image.mode}")
        return np.asarray(image.convert("RGBA"))


def save_image(path: str | Path, pixels: np.ndarray) -> Path:
    """Write an (H, W, 3|4) uint8 array (format from the suffix)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(path, None, f"cannot write image ({exc})") from None
    return path
