"""A small, seeded dataset in the exact DAVIS-2017 semi-supervised layout, with exact masks and known motions.

Each sequence films a still, richly textured background (smooth noise at several scales under random shapes
and lines, so no two places look alike: `pipeline.demo.hpatches._scene`) and 1-3 objects, each a textured
blob (a filled ellipse or polygon cut out of its own tinted, striped texture) that moves by a known transform
per frame. Objects are painted in id order, a later one on top of an earlier one, and each through a binary
mask with no anti-aliasing at its edge: a pixel is object j's exactly when it is painted with object j's
texture, so the annotations are the truth, occlusion included.

Sequence `n` is `demo<n>-duo`, `demo<n>-solo`, `demo<n>-trio` for n % 3 = 0, 1, 2 (2, 1, 3 objects). Object
1 `shift`s by whole pixels per frame; object 2 `turn`s (rotates a few degrees and grows or shrinks a few
percent per frame about its centre, drifting slowly); object 3 `drift`s by quarter pixels per frame. Each
object stays inside the frame where it has room; placements are redrawn until every object shows at least
60% of itself in frame 0 and 35% in every frame, and in a three-object sequence until two objects overlap in
some frame (at most 200 draws, then the last stands).
`motions(spec)` gives each object's frame-0 -> frame-k transforms.

Written: `ImageSets/2017/val.txt` (every demo sequence; there is no train split), and for every frame
`JPEGImages/480p/<seq>/%05d.jpg` (JPEG quality 95, 4:4:4 colour, no metadata) and
`Annotations/480p/<seq>/%05d.png` (indexed, DAVIS's palette): frame 0's annotation is the task's input, the
rest score it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.data.davis import RESOLUTION, YEAR, write_labels
from pipeline.demo.hpatches import _scene
from pipeline.errors import PipelineError

QUALITY = 95  # JPEG quality of the frames
COUNTS = (2, 1, 3)  # objects of sequence n: COUNTS[n % 3]
NAMES = {1: "solo", 2: "duo", 3: "trio"}
KINDS = ("shift", "turn", "drift")  # object j's motion: KINDS[j - 1]
TRIES = 200  # placements drawn per sequence before settling for the last


@dataclass(frozen=True)
class DavisDemoSpec:
    seed: int = 0
    sequences: int = 3
    frames: int = 8  # per sequence
    size: tuple[int, int] = (240, 128)  # (W, H) of every frame


@dataclass(frozen=True)
class ObjectMotion:
    """Object `object_id` of a sequence: how it moves (`shift`, `turn` or `drift`) and, per frame k, the 3x3
    affine map of frame-0 pixels to frame-k pixels, (x_k, y_k, 1) = transforms[k] @ (x_0, y_0, 1)."""

    object_id: int
    kind: str
    transforms: np.ndarray  # (frames, 3, 3) float64; transforms[0] is the identity


@dataclass(frozen=True)
class _Object:
    """One object's shape and pose per frame: template pixel q is shown at image pixel p = centres[k] +
    linears[k] @ (q - origin)."""

    kind: str
    mask: np.ndarray  # (h, w) bool template of the shape, False on its border
    centres: np.ndarray  # (frames, 2) float64 (x, y), dyadic (eighths of a pixel): exact in float arithmetic
    linears: np.ndarray  # (frames, 2, 2) float64

    @property
    def origin(self) -> np.ndarray:
        height, width = self.mask.shape
        return np.array([(width - 1) / 2, (height - 1) / 2])


def names(spec: DavisDemoSpec) -> list[str]:
    """The demo's sequence names, in val.txt's order."""
    return [f"demo{n}-{NAMES[COUNTS[n % 3]]}" for n in range(spec.sequences)]


def _check(spec: DavisDemoSpec) -> None:
    if spec.sequences < 1:
        raise PipelineError(None, "sequences", f"expected at least 1, got {spec.sequences}")
    if spec.frames < 2:
        raise PipelineError(None, "frames", f"expected at least 2 (frame 0 and one to score), got {spec.frames}")
    if min(spec.size) < 64:
        raise PipelineError(None, "size", f"expected (W, H) of at least 64x64, got {spec.size}")


def _shape(radius: float, kind: int, rng: np.random.Generator) -> np.ndarray:
    """A filled ellipse (kind 0) or star-ish polygon (kind 1) of about `radius` pixels, drawn without
    anti-aliasing, in a template with an empty border."""
    side = 2 * int(np.ceil(radius)) + 5
    mask = np.zeros((side, side), np.uint8)
    centre = (side - 1) / 2
    if kind == 0:
        axes = (int(radius), int(radius * rng.uniform(0.55, 0.9)))
        cv2.ellipse(mask, (int(centre), int(centre)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    else:
        count = int(rng.integers(5, 9))
        angles = rng.uniform(0, 2 * np.pi) + (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * 2 * np.pi / count
        reach = radius * rng.uniform(0.65, 1.0, count)
        corners = np.c_[centre + reach * np.cos(angles), centre + reach * np.sin(angles)]
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1, cv2.LINE_8)
    return mask.astype(bool)


def _rotation(angle: float, scale: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _path(start_range: tuple[np.ndarray, np.ndarray], step: np.ndarray, frames: int,
          rng: np.random.Generator) -> np.ndarray:
    """(frames, 2) centres start + k step, the start drawn (in eighths of a pixel) so that every centre lies in
    [low, high] where it can (else the middle)."""
    low, high = start_range
    travel = step * (frames - 1)
    first_low, first_high = low - np.minimum(travel, 0), high - np.maximum(travel, 0)
    start = np.where(first_low <= first_high, rng.uniform(first_low, np.maximum(first_low, first_high)),
                     (low + high - travel) / 2)
    start = np.round(start * 8) / 8
    return start + step * np.arange(frames)[:, None]


def _objects(count: int, spec: DavisDemoSpec, rng: np.random.Generator) -> list[_Object]:
    """One draw of the sequence's objects: shapes, sizes, motions and placements."""
    width, height = spec.size
    frames = spec.frames
    k = np.arange(frames)
    found = []
    for j in range(count):
        kind = KINDS[j]
        radius = rng.uniform(0.16, 0.24) * min(width, height)
        mask = _shape(radius, int(rng.integers(2)), rng)
        angle = float(rng.uniform(0, 2 * np.pi))
        if kind == "turn":
            spin = np.deg2rad(rng.uniform(3, 6)) * rng.choice([-1, 1])
            growth = rng.uniform(1.015, 1.03) ** rng.choice([-1, 1])
            scales = growth ** k
            linears = np.stack([_rotation(angle + spin * i, s) for i, s in zip(k, scales)])
            step = rng.integers(-4, 5, 2) / 4  # slow drift, quarter pixels
        else:
            scales = np.ones(frames)
            linears = np.repeat(_rotation(angle, 1.0)[None], frames, axis=0)
            if kind == "shift":
                step = rng.choice([-3, -2, 2, 3], 2) * rng.choice([[1, 0], [0, 1], [1, 1]])
                step = step.astype(np.float64)
            else:
                step = rng.choice([-7, -6, -5, -3, 3, 5, 6, 7], 2) / 4
        reach = np.hypot(*mask.shape) / 2 * scales.max() * 0.85  # the shape's extent, most of its template
        margin = np.array([reach, reach]) + 1
        centres = _path((margin, np.array([width - 1, height - 1]) - margin), step, frames, rng)
        found.append(_Object(kind, mask, centres, linears))
    return found


def _template_coordinates(obj: _Object, frame: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 2) template (x, y) shown at each image pixel in `frame`."""
    width, height = size
    x, y = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    dx, dy = x - obj.centres[frame][0], y - obj.centres[frame][1]  # exact: whole pixels minus eighths
    inverse = np.linalg.inv(obj.linears[frame])
    # Element by element, not a matrix product (whose kernels may round a pixel differently by its position):
    # equal offsets from the centre give equal bits, so a whole-pixel shift moves the mask exactly.
    return np.stack([inverse[0, 0] * dx + inverse[0, 1] * dy + obj.origin[0],
                     inverse[1, 0] * dx + inverse[1, 1] * dy + obj.origin[1]], -1)


def _cover(obj: _Object, q: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose template coordinate rounds (to nearest) onto the shape."""
    nearest = np.floor(q + 0.5).astype(np.int64)
    height, width = obj.mask.shape
    inside = (nearest[..., 0] >= 0) & (nearest[..., 0] < width) & (nearest[..., 1] >= 0) & \
             (nearest[..., 1] < height)
    cover = np.zeros(q.shape[:2], bool)
    cover[inside] = obj.mask[nearest[inside][:, 1], nearest[inside][:, 0]]
    return cover


def _labels(objs: list[_Object], frame: int, size: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(H, W) uint8 ids of `frame` (a later object on top) and each object's template coordinates."""
    width, height = size
    labels = np.zeros((height, width), np.uint8)
    coordinates = []
    for j, obj in enumerate(objs, start=1):
        q = _template_coordinates(obj, frame, size)
        labels[_cover(obj, q)] = j
        coordinates.append(q)
    return labels, coordinates


def _acceptable(objs: list[_Object], spec: DavisDemoSpec) -> bool:
    """Every object shows >= 60% of itself in frame 0 and >= 35% in every frame; with three, two overlap."""
    overlap = False
    for frame in range(spec.frames):
        labels = np.zeros(spec.size[::-1], np.uint8)
        full = []
        for j, obj in enumerate(objs, start=1):
            cover = _cover(obj, _template_coordinates(obj, frame, spec.size))
            overlap |= bool((labels[cover] > 0).any())
            labels[cover] = j
            full.append(cover.sum())
        shown = [(labels == j).sum() / max(area, 1) for j, area in enumerate(full, start=1)]
        if min(shown) < (0.6 if frame == 0 else 0.35):
            return False
    return overlap or len(objs) < 3


def _plan(spec: DavisDemoSpec, index: int) -> list[_Object]:
    """Sequence `index`'s objects, from its own stream (`[seed, index, 0]`): other sequences do not shift it."""
    rng = np.random.default_rng([spec.seed, index, 0])
    count = COUNTS[index % 3]
    for _ in range(TRIES):
        objs = _objects(count, spec, rng)
        if _acceptable(objs, spec):
            break
    return objs


def motions(spec: DavisDemoSpec = DavisDemoSpec()) -> dict[str, list[ObjectMotion]]:
    """Each demo sequence's objects (ids 1..n) with their frame-0 -> frame-k pixel transforms."""
    _check(spec)
    found = {}
    for index, name in enumerate(names(spec)):
        found[name] = []
        for j, obj in enumerate(_plan(spec, index), start=1):
            transforms = np.zeros((spec.frames, 3, 3))
            back = np.linalg.inv(obj.linears[0])
            for k in range(spec.frames):
                same = np.array_equal(obj.linears[k], obj.linears[0])  # a translation: keep it exact
                linear = np.eye(2) if same else obj.linears[k] @ back
                transforms[k, :2, :2] = linear
                transforms[k, :2, 2] = obj.centres[k] - linear @ obj.centres[0]
                transforms[k, 2, 2] = 1
            transforms[0] = np.eye(3)
            found[name].append(ObjectMotion(j, obj.kind, transforms))
    return found


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 texture of one object: multi-scale noise under a strong tint, striped at its own
    frequency and angle, so it looks like neither the background nor another object."""
    base = _scene(size, size, rng).astype(np.float32) / 255
    tint = rng.permutation([1.0, rng.uniform(0.3, 0.7), rng.uniform(0.0, 0.2)]).astype(np.float32)  # saturated
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    pixels = (0.45 * base + 0.55 * tint) * (0.6 + 0.4 * stripes[..., None])
    return np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def _sequence(spec: DavisDemoSpec, index: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The frames (H, W, 3) uint8 and their label maps (H, W) uint8 of sequence `index`."""
    objs = _plan(spec, index)
    rng = np.random.default_rng([spec.seed, index, 1])  # pixels: a stream of their own
    background = _scene(*spec.size, rng)
    textures = [_texture(max(obj.mask.shape), rng) for obj in objs]
    images, labels = [], []
    for frame in range(spec.frames):
        ids, coordinates = _labels(objs, frame, spec.size)
        image = background.copy()
        for j, (texture, q) in enumerate(zip(textures, coordinates), start=1):
            maps = q.astype(np.float32)
            painted = cv2.remap(texture, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT)
            shown = ids == j  # painted through its binary mask, where no later object covers it
            image[shown] = painted[shown]
        images.append(image)
        labels.append(ids)
    return images, labels


def generate(root: str | Path, spec: DavisDemoSpec = DavisDemoSpec()) -> Path:
    """Write the demo under `root` (the `DAVIS` folder; same spec -> same bytes) and return `root`. It writes in
    place: rerunning rewrites the same bytes, and frames a demo sequence's folder has beyond `spec.frames`
    (from a longer earlier run) are removed so the folder holds exactly this run's frames."""
    _check(spec)
    root = Path(root)
    listing = root / "ImageSets" / YEAR / "val.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{name}\n" for name in names(spec)))
    for index, name in enumerate(names(spec)):
        images, labels = _sequence(spec, index)
        jpegs = root / "JPEGImages" / RESOLUTION / name
        pngs = root / "Annotations" / RESOLUTION / name
        jpegs.mkdir(parents=True, exist_ok=True)
        written = set()
        for frame, (pixels, ids) in enumerate(zip(images, labels)):
            Image.fromarray(pixels).save(jpegs / f"{frame:05d}.jpg", format="JPEG", quality=QUALITY,
                                         subsampling=0)  # 4:4:4: no colour bleeds across a mask's edge
            write_labels(pngs / f"{frame:05d}.png", ids)
            written |= {jpegs / f"{frame:05d}.jpg", pngs / f"{frame:05d}.png"}
        for stale in [*jpegs.glob("*.jpg"), *pngs.glob("*.png")]:
            if stale not in written:
                stale.unlink()
    return root
