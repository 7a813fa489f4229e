"""A small, seeded dataset in the exact HPatches sequences layout, with exact homographies and keypoints.

Each sequence photographs one planar, richly textured scene (smooth noise at several scales under random
shapes and lines, so no two places look alike). `i_demo<n>` sequences keep the camera still and change the
light (gain, gamma, colour, a shading ramp): every H_1_k is the identity. `v_demo<n>` sequences move the
camera: image k is the scene warped by a known, moderate homography (scale, rotation, some perspective), at
its own size as in the release, so H_1_k maps image-1 pixels to image-k pixels (x_k ~ H @ [x1, y1, 1]).

Keypoint files in DIFT's format go to a sibling folder (`<root.parent>/<spec.keypoints>/<seq>-<k>.kp`):
image 1 gets random points, image k gets image 1's points mapped through H_1_k that land inside it (in the
same order, first) and a few extra points, so the true matches are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

KEYPOINTS = 300  # per image 1 (DIFT's superpoint-1k files have up to 1000)
EXTRA = 30  # unmatched points added to each image k


@dataclass(frozen=True)
class HPatchesDemoSpec:
    seed: int = 0
    sequences: int = 4  # half illumination (rounded down), half viewpoint
    size: tuple[int, int] = (320, 240)  # (W, H) of every image 1
    keypoints: str | None = "superpoint-1k"  # folder beside root for the .kp files; None writes none


def _scene(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: colour noise smoothed at several scales, then random filled shapes and lines."""
    field = np.zeros((height, width, 3), np.float32)
    for cell, weight in ((48, 0.45), (12, 0.35), (3, 0.2)):
        coarse = rng.random((height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        field += weight * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    field = (field - field.min()) / (field.max() - field.min())
    image = np.ascontiguousarray((field * 255).astype(np.uint8))
    for _ in range(width * height // 2500):
        colour = rng.integers(0, 256, 3).tolist()
        centre = rng.uniform([0, 0], [width, height])
        shape = rng.integers(3)
        if shape == 0:
            radius = int(rng.uniform(3, 0.06 * max(width, height)))
            cv2.circle(image, tuple(np.round(centre).astype(int).tolist()), radius, colour, -1, cv2.LINE_AA)
        elif shape == 1:
            corners = centre + rng.normal(0, 0.05 * max(width, height), (int(rng.integers(3, 6)), 2))
            cv2.fillPoly(image, [np.round(corners).astype(np.int32)], colour, cv2.LINE_AA)
        else:
            end = centre + rng.normal(0, 0.15 * max(width, height), 2)
            cv2.line(image, tuple(np.round(centre).astype(int).tolist()), tuple(np.round(end).astype(int).tolist()),
                     colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    return image


def _relight(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same pixels under other light: gain, gamma, a colour cast and a shading ramp."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.normal(size=2)
    ramp = (xx * direction[0] + yy * direction[1]) / (np.hypot(*direction) * max(width, height))
    light = rng.uniform(0.5, 1.2) * (1 + 0.3 * (ramp - ramp.mean()))
    pixels = (image.astype(np.float32) / 255) ** rng.uniform(0.7, 1.5)
    pixels = pixels * light[..., None] * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    return np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def _homography(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A moderate homography from image-1 pixels to image-k pixels, and image k's (W, H)."""
    width, height = size
    out = (int(round(width * rng.uniform(0.85, 1.15))), int(round(height * rng.uniform(0.85, 1.15))))
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1.0]])
    corners = np.float32([[-width, -height], [width, -height], [width, height], [-width, height]]) / 2
    moved = (corners + rng.uniform(-0.08, 0.08, (4, 2)) * [width, height]).astype(np.float32)
    perspective = cv2.getPerspectiveTransform(corners, moved)
    angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.2)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    similarity = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    shift = rng.uniform(-0.05, 0.05, 2) * out
    uncentre = np.array([[1, 0, out[0] / 2 + shift[0]], [0, 1, out[1] / 2 + shift[1]], [0, 0, 1.0]])
    matrix = uncentre @ similarity @ perspective @ centre
    return _as_written(matrix / matrix[2, 2]), out


def _as_written(matrix: np.ndarray) -> np.ndarray:
    """The matrix as its H file will read back, so pixels, keypoints and file agree to the last digit."""
    return np.array([[float(f"{v:.10g}") for v in row] for row in matrix])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    mapped = np.c_[points, np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def _random_points(count: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Points with decimals anywhere on the pixel centres' span [0, W-1] x [0, H-1], as written (4 decimals)."""
    return np.round(rng.uniform([0, 0], [size[0] - 1, size[1] - 1], (count, 2)), 4)


def _sequence(kind: str, size: tuple[int, int], rng: np.random.Generator):
    """Six images (H, W, 3) and the five homographies 1 -> 2..6 of one sequence."""
    width, height = size
    if kind == "i":
        scene = _scene(width, height, rng)
        return [scene] + [_relight(scene, rng) for _ in range(5)], [np.eye(3)] * 5
    margin = max(width, height) // 2  # scene beyond image 1, seen by the other viewpoints
    canvas = _scene(width + 2 * margin, height + 2 * margin, rng)
    to_canvas = np.array([[1, 0, margin], [0, 1, margin], [0, 0, 1.0]])  # image-1 pixels -> canvas pixels
    images, matrices = [canvas[margin:margin + height, margin:margin + width].copy()], []
    for _ in range(5):
        matrix, out = _homography(size, rng)
        # warpPerspective samples src(M^-1 x): image k at x_k shows the canvas at to_canvas @ H^-1 @ x_k.
        images.append(cv2.warpPerspective(canvas, matrix @ np.linalg.inv(to_canvas), out, flags=cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_REFLECT))
        matrices.append(matrix)
    return images, matrices


def generate(root: str | Path, spec: HPatchesDemoSpec = HPatchesDemoSpec()) -> Path:
    """Write the demo sequences under `root` and their keypoints beside it (same spec -> same bytes); return
    `root`. Like `pipeline.demo.dataset.generate`, it writes in place: rerunning rewrites the same bytes."""
    root = Path(root)
    illumination = spec.sequences // 2
    names = [f"i_demo{n}" for n in range(illumination)] + \
            [f"v_demo{n}" for n in range(spec.sequences - illumination)]
    for index, name in enumerate(names):
        rng = np.random.default_rng([spec.seed, index])  # one stream per sequence: others do not shift it
        images, matrices = _sequence(name[0], spec.size, rng)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, pixels in enumerate(images, start=1):
            Image.fromarray(pixels).save(folder / f"{k}.ppm")
        for k, matrix in enumerate(matrices, start=2):
            np.savetxt(folder / f"H_1_{k}", matrix, fmt="%.10g")
        if spec.keypoints is None:
            continue
        kp_folder = root.parent / spec.keypoints
        kp_folder.mkdir(parents=True, exist_ok=True)
        first = _random_points(KEYPOINTS, spec.size, rng)
        np.savetxt(kp_folder / f"{name}-1.kp", first, fmt="%.4f")
        for k, (pixels, matrix) in enumerate(zip(images[1:], matrices), start=2):
            height, width = pixels.shape[:2]
            mapped = _apply(matrix, first)
            inside = (mapped >= 0).all(1) & (mapped[:, 0] <= width - 1) & (mapped[:, 1] <= height - 1)
            points = np.vstack([mapped[inside], _random_points(EXTRA, (width, height), rng)])
            np.savetxt(kp_folder / f"{name}-{k}.kp", points, fmt="%.4f")
    return root
