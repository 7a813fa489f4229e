"""DAVIS-2017 (semi-supervised) on disk -> sequences, an images table, and its label maps.

Layout (the release's own, also written by `pipeline.demo.davis`), under the folder `DAVIS`:
    ImageSets/2017/<split>.txt         one sequence name per line (val.txt, train.txt)
    JPEGImages/480p/<seq>/00000.jpg    the frames, in name order
    Annotations/480p/<seq>/00000.png   indexed ('P'-mode) PNGs: pixel value = object id, 0 background,
                                       255 void (in some frames)
The semi-supervised task gives frame 0's annotation as the input and scores the others against the rest.
Frames are keyed by `"<seq>/<frame>"` (the name's stem, e.g. `"bear/00000"`). The official reader is
davisvideochallenge/davis2017-evaluation, davis2017/davis.py (commit ac7c43f): it reads the split file line by
line and each sequence's frames and masks sorted by name.

Sizes are (W, H) everywhere here, as PIL has them; arrays are (H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.data.images import image_size
from pipeline.errors import PipelineError, size_text

YEAR = "2017"
RESOLUTION = "480p"
VOID = 255  # DAVIS's VOID_LABEL: pixels nobody scores
SPLITS = ("train", "val", "test-dev", "test-challenge")  # davis.py's SUBSET_OPTIONS


def _pascal_color_map(count: int = 256) -> np.ndarray:
    """(count, 3) uint8: the PASCAL VOC colour map, transcribed from davis2017-evaluation, davis2017/utils.py
    `color_map` (commit ac7c43f), which `save_mask` puts on every annotation it writes: the bits of the index,
    three at a time, spread over r, g, b from the most significant bit down."""
    cmap = np.zeros((count, 3), np.uint8)
    for i in range(count):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


PALETTE = _pascal_color_map()  # (256, 3) uint8; id 1 is (128, 0, 0), void 255 is (224, 224, 192)


def split_file(root: str | Path, split: str = "val") -> Path:
    """`<root>/ImageSets/2017/<split>.txt`."""
    return Path(root) / "ImageSets" / YEAR / f"{split}.txt"


def frame_folder(root: str | Path, sequence: str) -> Path:
    """`<root>/JPEGImages/480p/<seq>`."""
    return Path(root) / "JPEGImages" / RESOLUTION / sequence


def frames(root: str | Path, sequence: str) -> list[str]:
    """The sequence's frame names (stems such as "00000"), sorted as the official reader sorts them."""
    folder = frame_folder(root, sequence)
    if not folder.is_dir():
        raise PipelineError(folder, None, f"sequence {sequence!r} has no frame folder (expected "
                                          f"JPEGImages/{RESOLUTION}/{sequence}/00000.jpg ...)")
    found = sorted(p.stem for p in folder.iterdir() if p.suffix == ".jpg" and p.is_file())
    if not found:
        raise PipelineError(folder, None, f"sequence {sequence!r} has no frames (no .jpg in its folder)")
    return found


def sequences(root: str | Path, split: str = "val") -> list[str]:
    """The sequences of `split`, in the order `ImageSets/2017/<split>.txt` lists them (blank lines ignored),
    each checked to have frames and frame 0's annotation (the semi-supervised task's input)."""
    root = Path(root)
    listing = split_file(root, split)
    try:
        text = listing.read_text()
    except FileNotFoundError:
        reason = "no DAVIS here (expected DAVIS/ImageSets, JPEGImages, Annotations)" if not root.is_dir() else \
            f"missing sequence list of split {split!r}"
        raise PipelineError(listing, None, reason) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(listing, None, f"unreadable sequence list ({exc})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise PipelineError(listing, None, "empty sequence list (one sequence name per line)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise PipelineError(listing, None, f"sequence {repeated[0]!r} is listed more than once")
    for name in names:
        first = frames(root, name)[0]
        if not annotation_path(root, f"{name}/{first}").is_file():
            raise PipelineError(annotation_path(root, f"{name}/{first}"), None,
                                f"sequence {name!r} has no annotation of its first frame (the semi-supervised "
                                "task's input)")
    return names


def images_table(root: str | Path, split: str = "val") -> pd.DataFrame:
    """A row per frame of `split`: key `"<seq>/<frame>"`, path relative to `root`, category (the sequence), its
    (W, H) read off the file so that a truncated frame fails here rather than mid-extraction, and `sequence`,
    `frame` (0-based position in the sequence). A sequence's frames and its first annotation share one size."""
    root = Path(root)
    rows = []
    for seq in sequences(root, split):
        size = None
        for index, name in enumerate(frames(root, seq)):
            path = Path("JPEGImages") / RESOLUTION / seq / f"{name}.jpg"
            width, height = image_size(root / path)
            if size is None:
                size = (width, height)
                _check_annotation_size(annotation_path(root, f"{seq}/{name}"), size)
            elif (width, height) != size:
                raise PipelineError(root / path, None, f"frame is {size_text(width, height)}, the sequence's "
                                                       f"first frame {size_text(*size)}")
            rows.append({"image": f"{seq}/{name}", "path": path.as_posix(), "category": seq,
                         "width": int(width), "height": int(height), "sequence": seq, "frame": index})
    return pd.DataFrame(rows, columns=["image", "path", "category", "width", "height", "sequence", "frame"])


def _check_annotation_size(path: Path, size: tuple[int, int]) -> None:
    try:
        with Image.open(path) as image:
            found = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PipelineError(path, None, f"unreadable annotation ({exc})") from None
    if found != size:
        raise PipelineError(path, None, f"annotation is {size_text(*found)}, its frame "
                                        f"{size_text(*size)}")


def annotation_path(root: str | Path, image_key: str) -> Path:
    """The annotation of frame `"<seq>/<frame>"`: `<root>/Annotations/480p/<seq>/<frame>.png`."""
    seq, slash, name = image_key.rpartition("/")
    if not slash or not seq or not name:
        raise PipelineError(None, "image", f"{image_key!r} is not a DAVIS frame key (expected '<seq>/<frame>')")
    return Path(root) / "Annotations" / RESOLUTION / seq / f"{name}.png"


def read_labels(path: str | Path) -> np.ndarray:
    """(H, W) uint8 object ids of an annotation (0 background, 255 void). Only an indexed ('P'-mode) PNG is
    taken: an RGB rendering of the colours would read as colour values, not ids."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "P":
                raise PipelineError(path, None, f"annotation is not an indexed (palette, 'P'-mode) PNG; its mode "
                                                f"is {image.mode} (pixel values must be object ids)")
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise PipelineError(path, None, "missing annotation") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PipelineError(path, None, f"unreadable annotation ({exc})") from None


def objects(labels: np.ndarray) -> int:
    """How many objects a label map has: its largest id, void (255) left out; 0 for background only. DAVIS
    numbers a sequence's objects 1..n in its first frame (davis.py: num_objects = max of frame 0)."""
    ids = np.asarray(labels)
    ids = ids[ids != VOID]
    return int(ids.max()) if ids.size else 0


def write_labels(path: str | Path, labels: np.ndarray) -> Path:
    """Write (H, W) object ids as an indexed PNG with DAVIS's palette, as davis2017/utils.py `save_mask` does
    (same ids -> same bytes: no metadata)."""
    path = Path(path)
    ids = np.asarray(labels)
    if ids.ndim != 2 or not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
        raise PipelineError(path, "labels", f"expected an (H, W) array of integer ids, got shape {ids.shape}, "
                                            f"dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise PipelineError(path, "labels", f"ids must lie in 0..255, found {int(ids.min())}..{int(ids.max())}")
    image = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    image.putpalette(PALETTE.flatten().tolist())  # an 'L' image with a palette becomes 'P', values kept
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    except (OSError, ValueError) as exc:
        raise PipelineError(path, None, f"cannot write annotation ({exc})") from None
    return path
