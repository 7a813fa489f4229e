"""A small, seeded dataset in the exact SPair-71k layout, with exact ground truth.

Each category has a procedurally textured object shape whose keypoints are parts of that shape
(the same keypoint id is the same part in every image of the category). Source images are drawn;
target images are made from them by known warps (similarity, affine, perspective, an occluding
patch), so every target keypoint is the warped source keypoint. Cross-instance pairs (two drawn
objects of one category) give true semantic pairs, identity pairs give a sanity check.

The warps are also written to `DemoTransforms.json` beside the SPair folders, which the SPair
reader ignores; tests use it to check predictions against the exact transform.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CATEGORIES = ("star", "blob", "tile")
SOURCE_SIZES = ((192, 144), (144, 192), (160, 160))  # (W, H): landscape, portrait, square
WARPS = ("similarity", "affine", "perspective", "occlusion")
# One colour per keypoint id, shared by every image, so parts are recognisable across instances.
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
    dtype=np.uint8,
)


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    sources_per_category: int = 2
    sizes: tuple[tuple[int, int], ...] = SOURCE_SIZES  # (W, H) of the drawn sources, in turn (SPair's: ~500 x 375)
    categories: tuple[str, ...] = CATEGORIES  # a subset of CATEGORIES


def _shape(category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(outline polygon, keypoints) of an object in unit coordinates centred on 0."""
    if category == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.55))
        outline = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        return outline, np.vstack([outline, [[0.0, 0.0]]])
    if category == "blob":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        wobble = 1 + 0.15 * np.sin(3 * t + rng.uniform(0, 2 * np.pi)) + 0.1 * np.cos(2 * t)
        outline = np.stack([wobble * np.cos(t), 0.75 * wobble * np.sin(t)], 1)
        return outline, np.vstack([outline[::12], [[0.0, 0.0]]])
    if category == "tile":
        skew = rng.uniform(-0.2, 0.2)
        outline = np.array([[-1 + skew, -0.7], [1 + skew, -0.7], [1 - skew, 0.7], [-1 - skew, 0.7]])
        mids = (outline + np.roll(outline, -1, 0)) / 2
        return outline, np.vstack([outline, mids, [[0.0, 0.0]]])
    raise ValueError(f"no demo shape for category {category!r}")


def _texture(height: int, width: int, rng: np.random.Generator, smooth: int) -> np.ndarray:
    """Colourful smooth noise plus a grating: something for features to latch on to."""
    coarse = rng.random((height // smooth + 2, width // smooth + 2, 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    freq, phase = rng.uniform(0.03, 0.12, 2), rng.uniform(0, 2 * np.pi)
    grating = 0.5 + 0.5 * np.sin(2 * np.pi * (freq[0] * xx + freq[1] * yy) + phase)
    colour = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    return np.clip(0.6 * field + 0.4 * grating[..., None] * colour, 0, 1)


def _draw_source(category: str, size: tuple[int, int], rng: np.random.Generator):
    width, height = size
    outline, keypoints = _shape(category, rng)
    scale = min(width, height) * rng.uniform(0.3, 0.38)
    centre = np.array([width / 2, height / 2]) + rng.uniform(-0.08, 0.08, 2) * [width, height]
    angle = rng.uniform(-0.4, 0.4)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outline, keypoints = outline @ rot.T * scale, keypoints @ rot.T * scale
    # A wobbly blob near an edge can poke out of the picture: shrink it until it fits (rarely needed).
    room = np.minimum(centre, [width - 1, height - 1] - centre) - 2
    fit = min(1.0, float((room / np.abs(np.vstack([outline, keypoints])).max(0)).min()))
    outline, keypoints = outline * fit + centre, keypoints * fit + centre

    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(outline).astype(np.int32)], 1)
    # A dim, desaturated background keeps the object the salient thing in the picture.
    image = 0.15 + 0.45 * _texture(height, width, rng, smooth=24).mean(-1, keepdims=True).repeat(3, -1)
    inside = _texture(height, width, rng, smooth=8)
    image = np.where(mask[..., None] > 0, inside, image)
    image = (image * 255).astype(np.uint8)
    for index, (x, y) in enumerate(np.round(keypoints).astype(int)):
        cv2.circle(image, (int(x), int(y)), 3, PALETTE[index % len(PALETTE)].tolist(), -1)
    return image, mask, outline, keypoints


def _warp_matrix(kind: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A homography from source to target pixels, and the target's (W, H)."""
    width, height = size
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1.0]])
    if kind in ("similarity", "occlusion"):
        angle, scale = rng.uniform(-0.45, 0.45), rng.uniform(0.8, 1.2)
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        core = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
        out = (width, height)
    elif kind == "affine":
        core = np.array([[rng.uniform(0.75, 1.1), rng.uniform(-0.3, 0.3), 0],
                         [rng.uniform(-0.3, 0.3), rng.uniform(0.75, 1.1), 0], [0, 0, 1.0]])
        out = (height, width)  # landscape <-> portrait
    elif kind == "perspective":
        corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
        moved = (corners + rng.uniform(-0.12, 0.12, (4, 2)) * [width, height]).astype(np.float32)
        core = centre @ cv2.getPerspectiveTransform(corners, moved) @ np.linalg.inv(centre)
        out = (width + 16, height - 16)
    else:
        raise ValueError(f"unknown demo warp {kind!r}")
    shift = rng.uniform(-0.05, 0.05, 2) * out
    uncentre = np.array([[1, 0, out[0] / 2 + shift[0]], [0, 1, out[1] / 2 + shift[1]], [0, 0, 1.0]])
    return uncentre @ core @ centre, out


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    mapped = np.c_[points, np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def _bbox(outline: np.ndarray, width: int, height: int) -> list[int]:
    x1, y1 = np.floor(outline.min(0)).astype(int)
    x2, y2 = np.ceil(outline.max(0)).astype(int)
    return [int(max(x1, 0)), int(max(y1, 0)), int(min(x2, width)), int(min(y2, height))]


def _keypoint_dict(points: np.ndarray, visible: np.ndarray) -> dict[str, list[int] | None]:
    return {
        str(i): [int(x), int(y)] if ok else None
        for i, ((x, y), ok) in enumerate(zip(np.round(points).astype(int), visible))
    }


class _Writer:
    """Writes images, their annotations and pairs in the SPair layout under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.images: dict[str, dict] = {}
        self.pairs: dict[str, list[dict]] = {"trn": [], "val": [], "test": []}
        self.transforms: dict[str, dict] = {}

    def image(self, category, name, pixels, mask, outline, keypoints, visible):
        height, width = mask.shape
        for folder in ("JPEGImages", "ImageAnnotation", "Segmentation"):
            (self.root / folder / category).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(self.root / "JPEGImages" / category / f"{name}.jpg", quality=92)
        Image.fromarray(mask * 255).save(self.root / "Segmentation" / category / f"{name}.png")
        record = {
            "filename": f"{name}.jpg", "src_database": "dift-cache demo", "src_annotation": "generated",
            "src_image": "generated", "image_width": width, "image_height": height, "image_depth": 3,
            "category": category, "pose": "Unspecified", "truncated": 0, "occluded": int(not visible.all()),
            "difficult": 0, "bndbox": _bbox(outline, width, height),
            "kps": _keypoint_dict(keypoints, visible), "azimuth_id": 0,
        }
        (self.root / "ImageAnnotation" / category / f"{name}.json").write_text(json.dumps(record))
        self.images[f"{category}/{name}"] = record

    def pair(self, split, category, src, trg, variation, transform=None):
        a, b = self.images[f"{category}/{src}"], self.images[f"{category}/{trg}"]
        ids = [k for k in a["kps"] if a["kps"][k] is not None and b["kps"][k] is not None]
        pair_id = len(self.pairs[split]) + 1
        name = f"{pair_id:06d}-{src}-{trg}:{category}"
        area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
        ratio = max(area(a["bndbox"]), area(b["bndbox"])) / min(area(a["bndbox"]), area(b["bndbox"]))
        record = {
            "pair_id": pair_id, "filename": name, "src_imname": a["filename"], "trg_imname": b["filename"],
            "src_imsize": [a["image_width"], a["image_height"], 3],
            "trg_imsize": [b["image_width"], b["image_height"], 3],
            "src_bndbox": a["bndbox"], "trg_bndbox": b["bndbox"], "category": category,
            "src_pose": a["pose"], "trg_pose": b["pose"],
            "src_kps": [a["kps"][k] for k in ids], "trg_kps": [b["kps"][k] for k in ids],
            "kps_ids": ids, "mirror": 0, "viewpoint_variation": variation,
            "scale_variation": 0 if ratio < 1.5 else 1 if ratio < 2.5 else 2,
            "truncation": 0, "occlusion": a["occluded"] + 2 * b["occluded"],
        }
        folder = self.root / "PairAnnotation" / split
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(record))
        self.pairs[split].append(record)
        self.transforms[f"{split}/{name}"] = transform or {"kind": "instance"}

    def finish(self):
        for layout in ("large", "small"):
            (self.root / "Layout" / layout).mkdir(parents=True, exist_ok=True)
            for split, records in self.pairs.items():
                text = "".join(f"{r['filename']}\n" for r in records)
                (self.root / "Layout" / layout / f"{split}.txt").write_text(text)
        (self.root / "DemoTransforms.json").write_text(json.dumps(self.transforms, indent=1))


def generate(root: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo dataset under `root` (same spec -> same bytes) and return `root`."""
    root = Path(root)
    rng = np.random.default_rng(spec.seed)
    writer = _Writer(root)
    warps: dict[str, dict] = {}
    for c, category in enumerate(CATEGORIES):
        if category not in spec.categories:
            continue
        sources = []
        for i in range(spec.sources_per_category):
            name = f"demo_{c}{i:02d}00"
            pixels, mask, outline, keypoints = _draw_source(
                category, spec.sizes[(c + i) % len(spec.sizes)], rng
            )
            writer.image(category, name, pixels, mask, outline, keypoints, np.ones(len(keypoints), bool))
            writer.pair("test", category, name, name, 0, {"kind": "identity", "matrix": np.eye(3).tolist()})
            sources.append(name)
            for w, kind in enumerate(WARPS, start=1):
                matrix, (tw, th) = _warp_matrix(kind, (mask.shape[1], mask.shape[0]), rng)
                warped = cv2.warpPerspective(pixels, matrix, (tw, th), flags=cv2.INTER_LINEAR,
                                             borderMode=cv2.BORDER_REFLECT)
                warped_mask = cv2.warpPerspective(mask, matrix, (tw, th), flags=cv2.INTER_NEAREST)
                points = _apply(matrix, keypoints)
                rounded = np.round(points)
                visible = (rounded >= 0).all(1) & (rounded[:, 0] <= tw - 1) & (rounded[:, 1] <= th - 1)
                if kind == "occlusion":
                    # A grey patch over one keypoint: that keypoint is no longer visible.
                    px, py = rounded[rng.integers(len(points))].astype(int)
                    half = max(tw, th) // 10
                    warped[max(py - half, 0): py + half, max(px - half, 0): px + half] = 128
                    hidden = (np.abs(rounded[:, 0] - px) <= half + 1) & (np.abs(rounded[:, 1] - py) <= half + 1)
                    visible &= ~hidden
                target = f"demo_{c}{i:02d}{w:02d}"
                writer.image(category, target, warped, warped_mask, _apply(matrix, outline), points, visible)
                variation = {"similarity": 0, "occlusion": 0, "affine": 1, "perspective": 2}[kind]
                warps[target] = {"kind": kind, "matrix": matrix.tolist()}
                writer.pair("test", category, name, target, variation, warps[target])
        # Cross-instance pairs: each source with the next two (all others when there are at most three),
        # so pairs grow linearly with the dataset.
        for i, src in enumerate(sources):
            for step in range(1, min(len(sources), 3)):
                writer.pair("test", category, src, sources[(i + step) % len(sources)], 1)
        # A few pairs in the other splits, so every split exists as in the release.
        for split, src, target in (("val", sources[0], f"{sources[0][:-2]}01"),
                                   ("trn", sources[-1], f"{sources[-1][:-2]}02")):
            writer.pair(split, category, src, target, 0, warps[target])
    writer.finish()
    return root
