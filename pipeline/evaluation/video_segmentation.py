"""DAVIS-2017 semi-supervised video object segmentation scores: J (region similarity), F (boundary
measure), their per-object statistics (mean, recall, decay) and the global J&F.

Computed as davisvideochallenge/davis2017-evaluation @ ac7c43f computes them (davis2017/metrics.py,
utils.py, evaluation.py; evaluation_method.py for the global table), on numpy + OpenCV:
- J of one object in one frame: |truth & predicted| / |truth | predicted|, 1 when both are empty
  (`db_eval_iou`).
- F: boundary precision and recall, a boundary pixel counting as matched when the other mask's boundary
  lies within `bound_pix = ceil(0.008 x image diagonal)` pixels (a disk), and F their harmonic mean
  (`f_measure`, `_seg2bmap`). The disk is skimage.morphology.disk(bound_pix) (default strict_radius),
  written here in numpy: the grid X**2 + Y**2 <= r**2 over arange(-r, r + 1).
- Per object over the scored frames (`db_statistics`): mean = nanmean, recall = fraction of frames
  above 0.5, decay = mean of the first quarter of frames minus mean of the last, on the official's
  four overlapping bins (for up to 255 frames; past that the official's uint8 bin edges wrap, and
  `statistics` keeps the intended bins instead).
- Semi-supervised protocol (`DAVISEvaluation.evaluate`): frames 1 .. n-2 are scored (the first frame is
  the given annotation, the last is dropped too); the objects are labels 1 .. max of the FIRST truth
  frame; void pixels (255) of the truth become background and are not otherwise used (the official
  passes no void mask in this task); a prediction without some object scores it as empty; a predicted
  label above the object count in a scored frame is an error.
- Global (`evaluation_method.py`): each score is the plain mean over all objects of all sequences, and
  J&F = (J mean + F mean) / 2.

A video of fewer than 3 frames has no scored frame: its objects get a row with frames = 0 and NaN for
every statistic (what the official's nanmean gives on no values; the official itself stops on such a
video), and a summary over it is NaN, as the official's plain mean would be.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from itertools import zip_longest
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.data.davis import VOID, objects
from pipeline.errors import PipelineError

BOUND_TH = 0.008  # the official's default, used by its evaluation
COLUMNS = ["object", "frames", "J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"]


def region_similarity(truth: np.ndarray, predicted: np.ndarray) -> float:
    """J of two boolean masks (H, W): intersection over union, 1 when both are empty."""
    _same_shape(truth, predicted)
    return float(_region_similarities(np.asarray(truth, bool)[None], np.asarray(predicted, bool)[None])[0])


def boundary_measure(truth: np.ndarray, predicted: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F of two boolean masks (H, W). `bound_th` below 1 is a fraction of the image diagonal, from 1 on a
    number of pixels (as the official reads it)."""
    _same_shape(truth, predicted)
    return float(_boundary_measures(np.asarray(truth, bool)[None], np.asarray(predicted, bool)[None], bound_th)[0])


def statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame scores, as `db_statistics`; NaN for no frames.
    Up to 255 frames this is the official's value; past that see the comment on the bins."""
    values = np.asarray(per_frame, dtype=float)
    # Bin edges as the official rounds them: halves up (the 1e-10). It then casts them to uint8, which
    # only matters past 255 frames, where they wrap (and, under numpy 2, so does `ids[4] + 1`): no single
    # official value exists there, so the bins here stay the intended ones.
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
    with warnings.catch_warnings():
        # nanmean of no values is NaN with a warning; the official silences it the same way.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(values)
        recall = np.nanmean(values > 0.5)
        decay = np.nanmean(values[ids[0]:ids[1] + 1]) - np.nanmean(values[ids[3]:ids[4] + 1])
    return float(mean), float(recall), float(decay)


def score_video(truth_frames: Iterable[np.ndarray], predicted_frames: Iterable[np.ndarray]) -> pd.DataFrame:
    """Per-object J and F statistics of one video under the semi-supervised protocol.

    `truth_frames` and `predicted_frames` are the video's (H, W) label maps, frame 0 first, one
    prediction per truth frame. They are read as streams, holding at most two frames of each: whether a
    frame is scored depends on it not being the last. Returns one row per object (1-based `object`) with
    `frames` (how many were scored) and J_/F_ mean, recall, decay (NaN when no frame was scored).
    Predicted frames 0 and n-1 must match the truth's shape but are not otherwise read, as the official
    does not read them. Raises PipelineError for a shape mismatch, unequal frame counts, or a predicted
    label above the object count, naming the frame.
    """
    ids = None
    j_scores: list[np.ndarray] = []
    f_scores: list[np.ndarray] = []
    pending = None  # (index, truth, predicted) waiting for a later frame to show it is not the last
    for index, (truth, predicted) in enumerate(zip_longest(truth_frames, predicted_frames)):
        truth, predicted = _checked_pair(index, truth, predicted)
        truth = np.where(truth == VOID, 0, truth)
        if ids is None:
            ids = np.arange(1, objects(truth) + 1)
        if pending is not None and pending[0] >= 1:
            j, f = _score_frame(ids, *pending)
            j_scores.append(j)
            f_scores.append(f)
        pending = (index, truth, predicted)
    if ids is None:
        raise PipelineError(None, "frames", "the video has no frames")

    # (objects, frames), each object's row contiguous as the official's j_metrics_res[ii]
    j_table = np.ascontiguousarray(np.reshape(j_scores, (len(j_scores), len(ids))).T)
    f_table = np.ascontiguousarray(np.reshape(f_scores, (len(f_scores), len(ids))).T)
    rows = [(int(obj), len(j_scores), *statistics(j_table[k]), *statistics(f_table[k])) for k, obj in enumerate(ids)]
    return pd.DataFrame(rows, columns=COLUMNS).astype({"object": np.int64, "frames": np.int64})


def summary(objects: pd.DataFrame) -> dict:
    """The official global table over the rows of `score_video` of many videos (with a `sequence` column):
    each score is the plain mean over objects (a NaN row makes it NaN; no rows give NaN), and J&F the mean
    of J and F."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # the mean of no objects is NaN
        means = {column: float(np.mean(objects[column].to_numpy(dtype=float))) for column in COLUMNS[2:]}
    return {"J&F": (means["J_mean"] + means["F_mean"]) / 2,
            "J": means["J_mean"], "J_recall": means["J_recall"], "J_decay": means["J_decay"],
            "F": means["F_mean"], "F_recall": means["F_recall"], "F_decay": means["F_decay"],
            "objects": int(len(objects)), "sequences": int(objects["sequence"].nunique())}


def _score_frame(ids: np.ndarray, index: int, truth: np.ndarray, predicted: np.ndarray):
    """J and F of each object in one scored frame."""
    if predicted.max(initial=0) > len(ids):
        raise PipelineError(None, f"frame {index}", f"predicted label {int(predicted.max())} above the "
                                                    f"{len(ids)} object(s) of the first annotation")
    # Labels above the object count in the truth (objects that appear later) are not scored, as officially.
    truth_masks = truth[None] == ids[:, None, None]
    predicted_masks = predicted[None] == ids[:, None, None]
    return (_region_similarities(truth_masks, predicted_masks),
            _boundary_measures(truth_masks, predicted_masks, BOUND_TH))


def _region_similarities(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """J per mask of two boolean stacks (K, H, W)."""
    inter = np.sum(truth & predicted, axis=(-2, -1))
    union = np.sum(truth | predicted, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inter / union
    j[np.isclose(union, 0)] = 1
    return j


def _boundary_measures(truth: np.ndarray, predicted: np.ndarray, bound_th: float) -> np.ndarray:
    """F per mask of two boolean stacks (K, H, W)."""
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(truth.shape[-2:]))
    disk = _disk(bound_pix)
    truth_boundary = _boundary_map(truth)
    predicted_boundary = _boundary_map(predicted)
    truth_near = _dilated(truth_boundary, disk)
    predicted_near = _dilated(predicted_boundary, disk)

    n_predicted = np.sum(predicted_boundary, axis=(-2, -1))
    n_truth = np.sum(truth_boundary, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.sum(predicted_boundary & truth_near, axis=(-2, -1)) / n_predicted.astype(float)
        recall = np.sum(truth_boundary & predicted_near, axis=(-2, -1)) / n_truth.astype(float)
    # No boundary on one side: that side is vacuously all matched, the other side none.
    precision[n_predicted == 0] = 1
    recall[n_truth == 0] = 1
    recall[(n_predicted == 0) & (n_truth > 0)] = 0
    precision[(n_predicted > 0) & (n_truth == 0)] = 0
    total = precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 0.0, 2 * precision * recall / total)


def _dilated(masks: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """Each mask of a boolean stack (K, H, W) dilated by `disk`, with cv2.dilate as the official does."""
    out = np.empty_like(masks)
    for k, mask in enumerate(masks):
        out[k] = cv2.dilate(mask.astype(np.uint8), disk) > 0
    return out


def _boundary_map(mask: np.ndarray) -> np.ndarray:
    """`_seg2bmap` on a boolean stack (..., H, W): 1-pixel boundaries, offset half a pixel towards the
    origin; the last row keeps only horizontal changes and the last column only vertical ones, so the
    image's own bottom and right edges do not count as boundary."""
    east = np.zeros_like(mask)
    south = np.zeros_like(mask)
    south_east = np.zeros_like(mask)
    east[..., :, :-1] = mask[..., :, 1:]
    south[..., :-1, :] = mask[..., 1:, :]
    south_east[..., :-1, :-1] = mask[..., 1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[..., -1, :] = mask[..., -1, :] ^ east[..., -1, :]
    boundary[..., :, -1] = mask[..., :, -1] ^ south[..., :, -1]
    boundary[..., -1, -1] = False
    return boundary


def _disk(radius: float) -> np.ndarray:
    """skimage.morphology.disk(radius) (strict_radius=True) as uint8, for cv2.dilate."""
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    return ((x ** 2 + y ** 2) <= radius ** 2).astype(np.uint8)


def _same_shape(truth: np.ndarray, predicted: np.ndarray, field: str = "shape") -> None:
    if np.shape(truth) != np.shape(predicted) or np.ndim(truth) != 2:
        raise PipelineError(None, field, f"truth {np.shape(truth)} and prediction {np.shape(predicted)} "
                                         f"must be the same (H, W)")


def _checked_pair(index: int, truth, predicted) -> tuple[np.ndarray, np.ndarray]:
    if truth is None or predicted is None:
        missing = "prediction" if predicted is None else "truth"
        raise PipelineError(None, f"frame {index}", f"no {missing} frame: the videos must have as many "
                                                    f"predicted frames as truth frames")
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    _same_shape(truth, predicted, f"frame {index}")
    return truth, predicted


# ---- the study's tables: a row per object and variant (pipeline/workflows/davis.py) -> metrics/davis/ ----

VARIANT = ["backbone", "layer", "timestep", "transform"]
PROTOCOL = ["temperature", "topk", "neighborhood", "context"]
MEASURES = ["J&F", "J", "J_recall", "J_decay", "F", "F_recall", "F_decay"]


def describe_setting(objects: pd.DataFrame) -> str:
    """The protocol every DAVIS number names: propagation settings and what J&F averages."""
    settings = objects[PROTOCOL].drop_duplicates()
    if len(settings) != 1:
        raise PipelineError("metrics/davis", "protocol", f"the tables mix {len(settings)} propagation settings; "
                            "rerun davis-propagate for every backbone")
    s = settings.iloc[0]
    capped = objects[objects["context_used"] != objects["context"]][["sequence", "context_used"]].drop_duplicates()
    caps = "".join(f", {row.sequence}: last {int(row.context_used)}" for row in capped.sort_values("sequence").itertuples())
    window = f"{int(s['neighborhood'])}-cell window" if s["neighborhood"] else "no window"
    return (f"DAVIS-2017 semi-supervised, DIFT's label propagation (first frame + last {int(s['context'])}{caps}, "
            f"exp(cos / {s['temperature']:g}), {window}, top {int(s['topk'])}); "
            "J&F = mean of J and F over objects, frames 1..n-2 (davis2017-evaluation)")


def variant_scores(objects: pd.DataFrame) -> pd.DataFrame:
    """A row per variant: DAVIS's global measures over its objects (`summary`)."""
    rows = [{**dict(zip(VARIANT, key)), **summary(group)}
            for key, group in objects.groupby(VARIANT, sort=True)]
    return pd.DataFrame(rows, columns=[*VARIANT, *MEASURES, "objects", "sequences"])


def best_variants(scores: pd.DataFrame) -> dict[str, dict]:
    """Each backbone's variant of highest J&F (chosen on these videos), with its measures."""
    best = {}
    for backbone, group in scores.groupby("backbone", sort=True):
        row = group.sort_values(["J&F", "layer", "timestep", "transform"], ascending=[False, True, True, True]).iloc[0]
        best[backbone] = {"layer": row["layer"], "timestep": int(row["timestep"]), "transform": row["transform"],
                          **{m: round(float(row[m]), 4) for m in MEASURES}, "objects": int(row["objects"]),
                          "sequences": int(row["sequences"])}
    return best


def write_metrics(paths, folder: str | Path) -> str:
    """metrics/davis/: jf.csv (every variant's measures), jf.json (each backbone's best variant with the
    protocol, what `dvc metrics show` reads) and videos.csv (the best variants' J&F per video); returns the
    best variants as text."""
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise PipelineError(missing[0], None, "no object table: run its davis-propagate stage first")
    objects = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    protocol = describe_setting(objects)
    scores = variant_scores(objects)
    best = best_variants(scores)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scores.to_csv(folder / "jf.csv", index=False, float_format="%.4f")
    (folder / "jf.json").write_text(json.dumps({"protocol": protocol, **best}, indent=2) + "\n")
    videos = []
    for backbone, b in best.items():
        chosen = objects[(objects["backbone"] == backbone) & (objects["layer"] == b["layer"])
                         & (objects["timestep"] == b["timestep"]) & (objects["transform"] == b["transform"])]
        for sequence, group in chosen.groupby("sequence", sort=True):
            videos.append({"backbone": backbone, "sequence": sequence, **summary(group)})
    pd.DataFrame(videos).to_csv(folder / "videos.csv", index=False, float_format="%.4f")
    lines = [protocol]
    for backbone, b in best.items():
        lines.append(f"  {backbone} ({b['layer']}, t={b['timestep']}, {b['transform']}): J&F {100 * b['J&F']:.1f}, "
                     f"J {100 * b['J']:.1f}, F {100 * b['F']:.1f}")
    return "\n".join(lines)
