"""SPair-71k on disk -> a pairs table and an images table.

Layout (the release's own, also written by `pipeline.demo.dataset`):
    JPEGImages/<cat>/<name>.jpg, ImageAnnotation/<cat>/<name>.json,
    PairAnnotation/<split>/<pairid6>-<src>-<trg>:<cat>.json, Layout/{large,small}/<split>.txt

Conventions kept as the release has them: sizes `[W, H, C]`, keypoints `[x, y]` integer pixels
(0-based), boxes `[x1, y1, x2, y2]`. Images are keyed by `"<category>/<name>"` because the same VOC
image can occur under two categories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.data.images import image_size
from pipeline.errors import PipelineError, size_text

SPLITS = ("trn", "val", "test")

# Every field of a pair file, with the type each value must have.
PAIR_FIELDS = {
    "pair_id": int,
    "filename": str,
    "src_imname": str,
    "trg_imname": str,
    "src_imsize": list,
    "trg_imsize": list,
    "src_bndbox": list,
    "trg_bndbox": list,
    "category": str,
    "src_pose": str,
    "trg_pose": str,
    "src_kps": list,
    "trg_kps": list,
    "kps_ids": list,
    "mirror": int,
    "viewpoint_variation": int,
    "scale_variation": int,
    "truncation": int,
    "occlusion": int,
}


@dataclass(frozen=True)
class Split:
    """One split of a dataset: a row per pair and a row per image the pairs use, and what
    `on_error: skip` left out (a row per pair file: its name and the one-line reason)."""

    pairs: pd.DataFrame
    images: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["pair", "reason"]))


def image_key(category: str, imname: str) -> str:
    return f"{category}/{Path(imname).stem}"


def read_pair(path: Path) -> dict:
    """Read and check one PairAnnotation file; raise a one-line PipelineError if it is bad."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(path, None, "pair annotation file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(path, None, f"unreadable JSON ({exc})") from None
    if not isinstance(record, dict):
        raise PipelineError(path, None, "expected a JSON object")
    for field, kind in PAIR_FIELDS.items():
        if field not in record:
            raise PipelineError(path, field, "missing")
        if not isinstance(record[field], kind) or (kind is int and isinstance(record[field], bool)):
            raise PipelineError(path, field, f"expected {kind.__name__}, got {record[field]!r}")
    for side in ("src", "trg"):
        _check_side(path, record, side)
    if not record["kps_ids"]:
        raise PipelineError(path, "kps_ids", "no keypoints")
    return record


def _check_side(path: Path, record: dict, side: str) -> None:
    size, box, kps = record[f"{side}_imsize"], record[f"{side}_bndbox"], record[f"{side}_kps"]
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise PipelineError(path, f"{side}_imsize", f"expected [W, H, C] positive integers, got {size}")
    if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise PipelineError(path, f"{side}_bndbox", f"expected [x1, y1, x2, y2], got {box}")
    if box[2] < box[0] or box[3] < box[1]:
        axis = "x2 < x1" if box[2] < box[0] else "y2 < y1"
        raise PipelineError(path, f"{side}_bndbox", f"inverted box {box} ({axis})")
    if box[2] == box[0] or box[3] == box[1]:
        raise PipelineError(path, f"{side}_bndbox", f"zero-area box {box}")
    if len(kps) != len(record["kps_ids"]):
        raise PipelineError(
            path, f"{side}_kps", f"{len(kps)} keypoints but {len(record['kps_ids'])} kps_ids"
        )
    width, height = size[0], size[1]
    for i, point in enumerate(kps):
        if not (isinstance(point, list) and len(point) == 2):
            raise PipelineError(path, f"{side}_kps[{i}]", f"expected [x, y], got {point!r}")
        x, y = point
        # Boxes are VOC-style and may touch x == W, so a keypoint on that edge is accepted too.
        if not (0 <= x <= width and 0 <= y <= height):
            raise PipelineError(
                path, f"{side}_kps[{i}]", f"keypoint {point} outside the {size_text(width, height)} image"
            )


def pair_files(root: Path, split: str, layout: str | None = None) -> list[Path]:
    """The pair files of a split: every file in PairAnnotation/<split>, or those a Layout lists."""
    if split not in SPLITS:
        raise PipelineError(root, "split", f"unknown split {split!r}; expected one of {SPLITS}")
    folder = root / "PairAnnotation" / split
    if layout is None:
        if not folder.is_dir():
            raise PipelineError(folder, None, "folder is missing (is this an SPair-71k root?)")
        return sorted(folder.glob("*.json"))
    listing = root / "Layout" / layout / f"{split}.txt"
    if not listing.is_file():
        raise PipelineError(listing, None, "layout file is missing")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [folder / f"{name}.json" for name in names]


def load_split(
    root: str | Path,
    split: str,
    layout: str | None = None,
    categories: list[str] | None = None,
    on_error: str = "fail",
) -> Split:
    """Read one split of an SPair-format dataset, checking every pair and every image it uses.

    `on_error: skip` leaves out a bad pair file, and every pair whose image is missing, unreadable
    or of another size than annotated, and lists them in `Split.skipped`.
    """
    root = Path(root)
    skipped: list[tuple[str, str]] = []

    def bad(path: Path, exc: PipelineError) -> None:
        if on_error != "skip":
            raise exc
        skipped.append((path.stem, str(exc)))

    records = []
    for path in pair_files(root, split, layout):
        try:
            records.append(read_pair(path))
        except PipelineError as exc:
            bad(path, exc)
    if categories:
        present = sorted({r["category"] for r in records})
        unknown = sorted(set(categories) - set(present))
        if unknown:
            raise PipelineError(
                root, "categories", f"unknown category {unknown}; split {split!r} has {present}"
            )
        records = [r for r in records if r["category"] in categories]

    users: dict[str, list[str]] = {}  # image -> the pairs that use it, named in its errors
    for record in records:
        for side in ("src", "trg"):
            users.setdefault(image_key(record["category"], record[f"{side}_imname"]), []).append(record["filename"])
    images: dict[str, dict] = {}
    broken: dict[str, PipelineError] = {}
    rows = []
    for record in records:
        row = {"split": split, **record}
        try:
            for side in ("src", "trg"):
                key = image_key(record["category"], record[f"{side}_imname"])
                if key not in images and key not in broken:
                    try:
                        images[key] = _image_row(root, record, side, key, users[key])
                    except PipelineError as exc:
                        broken[key] = exc
                if key in broken:
                    raise broken[key]
                row[f"{side}_image"] = key
                row[f"{side}_width"], row[f"{side}_height"] = images[key]["width"], images[key]["height"]
        except PipelineError as exc:
            bad(Path(record["filename"]), exc)
            continue
        rows.append(row)
    if not rows:
        raise PipelineError(root / "PairAnnotation" / split, None, f"split {split!r} has no pairs"
                            + (f" left after skipping {len(skipped)}" if skipped else ""))

    pairs = pd.DataFrame(rows).sort_values(["pair_id", "filename"], kind="stable").reset_index(drop=True)
    used = set(pairs["src_image"]) | set(pairs["trg_image"])
    image_table = pd.DataFrame(sorted((v for k, v in images.items() if k in used), key=lambda r: r["image"]))
    return Split(pairs=pairs, images=image_table.reset_index(drop=True),
                 skipped=pd.DataFrame(skipped, columns=["pair", "reason"]))


def _image_row(root: Path, record: dict, side: str, key: str, users: list[str]) -> dict:
    path = Path("JPEGImages") / record["category"] / record[f"{side}_imname"]
    width, height, depth = record[f"{side}_imsize"]
    actual = image_size(root / path)
    if actual != (width, height):
        named = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        raise PipelineError(root / path, "size", f"image is {size_text(*actual)} but annotated {size_text(width, height)} "
                                                 f"({record['filename']}.json {side}_imsize); used by {len(users)} "
                                                 f"pair(s): {named}")
    return {"image": key, "category": record["category"], "name": Path(record[f"{side}_imname"]).stem,
            "path": path.as_posix(), "width": width, "height": height, "depth": depth}


def write_split(split: Split, pairs_path: str | Path, images_path: str | Path,
                skipped_path: str | Path | None = None) -> None:
    """Write both tables as parquet (list columns stay lists), and what was skipped as CSV."""
    for table, path in ((split.pairs, pairs_path), (split.images, images_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(path, index=False)
    if skipped_path is not None:
        split.skipped.to_csv(skipped_path, index=False)
