"""DAVIS label propagation at DAVIS 480p size: pipeline.matching.label_propagation against DIFT's code.

A 854 x 480 video as DIFT_sd reads it (eval_davis.py: canvas 832 x 480, up_ft_index 2 = SD2's up_blocks.2,
640 channels at stride 8, so a 60 x 104 grid), `--frames` frames of smooth random float16 features (a
field drifting frame to frame, plus noise), written to a temporary Zarr v3 array (one chunk a frame) and
read back frame by frame as from the cache; a first-frame annotation of 3 objects; DIFT_sd's settings
(temperature 0.2, topk 15, neighbourhood 15, 28 frames queued).

Timed, per frame (reading the frame and making its mask included, medians):
- propagation: `propagate` + `to_mask` over the whole video;
- naive: DIFT's code as transcribed in tests/test_label_propagation.py (Tsingularity/dift @ 9421eb2,
  eval_davis.py): its dense hw x hw neighbourhood mask (4 nested Python loops, once a video: timed
  apart), then, per frame, the dense (contexts, hw, hw) affinity. On 2 CPU cores it is slow, so it runs the
  first `--naive-frames` frames (1 to n contexts; compared with propagation on the same frames) and one
  frame at full context (the last frame, 29 contexts, from the same queue as propagation's: its features
  and predicted soft maps; about 10 GB of memory; `--no-full-context` skips it).
Masks are compared on every frame the naive code ran. The last line:
`propagation: <s> s/frame, naive: <s> s/frame, speedup: <x>x, identical masks: <a>/<b>`, at full context
when the naive code ran there, else on the first frames.

    python benchmarks/label_propagation.py [--frames 70] [--naive-frames 5] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache.encode import canvas_shape  # noqa: E402
from pipeline.matching.label_propagation import (PropagationSettings, first_labels,  # noqa: E402
                                                  one_hot, propagate, to_mask)


def _dift():
    """The transcription of DIFT's code in tests/test_label_propagation.py (tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("dift_transcription", REPO / "tests" / "test_label_propagation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORIGINAL = (854, 480)  # DAVIS 480p (W, H)
STRIDE = 8  # DIFT_sd's up_ft_index 2 (index2factor)
CHANNELS = 640  # SD2's up_blocks.2 output width (block_out_channels (320, 640, 1280, 1280), reversed)
OBJECTS = 3


def write_video(path: Path, frames: int, grid: tuple[int, int], seed: int = 0) -> zarr.Array:
    """Smooth random features, float16, one chunk a frame: a coarse field drifting frame to frame plus noise."""
    rng = np.random.default_rng(seed)
    h, w = grid
    array = zarr.create_array(store=str(path), shape=(frames, h, w, CHANNELS), chunks=(1, h, w, CHANNELS),
                              dtype="float16")
    coarse = rng.standard_normal((1, CHANNELS, 8, 13)).astype(np.float32)
    for t in range(frames):
        coarse = coarse + 0.15 * rng.standard_normal(coarse.shape).astype(np.float32)
        field = F.interpolate(torch.from_numpy(coarse), size=grid, mode="bilinear", align_corners=False)[0]
        frame = field.permute(1, 2, 0).numpy() + 0.5 * rng.standard_normal((h, w, CHANNELS)).astype(np.float32)
        array[t] = frame.astype(np.float16)
    return array


def annotation() -> np.ndarray:
    """A (H, W) first-frame annotation of 3 ellipses."""
    width, height = ORIGINAL
    y, x = np.mgrid[:height, :width]
    seg = np.zeros((height, width), np.uint8)
    for index, (cx, cy, ax, ay) in enumerate([(250, 260, 120, 150), (560, 200, 90, 60), (700, 380, 110, 70)], 1):
        seg[((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1] = index
    return seg


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=70, help="video length (DAVIS 2017 val: 69 on average)")
    parser.add_argument("--naive-frames", type=int, default=5, help="frames 1..n through DIFT's code from the start")
    parser.add_argument("--full-context", action=argparse.BooleanOptionalAction, default=True,
                        help="one frame through DIFT's code at full context (~10 GB)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3, help="frames left out of propagation's median")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.frames < 2 or args.naive_frames < 1:
        parser.error("--frames must be >= 2 and --naive-frames >= 1")
    dift = _dift()
    settings = PropagationSettings()  # DIFT_sd's
    canvas_w, canvas_h = canvas_shape(*ORIGINAL, 480, "short-side")
    grid = (canvas_h // STRIDE, canvas_w // STRIDE)
    frames, device = args.frames, args.device
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"grid: {grid[0]} x {grid[1]} cells (canvas {canvas_w} x {canvas_h}, stride {STRIDE}), {CHANNELS} channels, "
          f"{frames} frames, {OBJECTS} objects; temperature {settings.temperature}, topk {settings.topk}, "
          f"neighbourhood {settings.neighborhood}, context {settings.context}; device {device}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    seg = annotation()
    labels = first_labels(seg, grid)
    first = one_hot(labels, OBJECTS)
    results: dict = {"grid": grid, "channels": CHANNELS, "frames": frames, "device": device,
                     "threads": torch.get_num_threads(), "settings": vars(settings)}

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_video(Path(folder) / "features.zarr", frames, grid)
        written = time.perf_counter() - start
        store = zarr.open_array(str(Path(folder) / "features.zarr"), mode="r")
        reads: list[float] = []

        def cached(indices):
            for t in indices:
                start = time.perf_counter()
                frame = store[t]
                reads.append(time.perf_counter() - start)
                yield frame

        # ---- propagation, the whole video
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ours_soft, ours_masks, ours_times = [], [], []
        start = time.perf_counter()
        for soft in propagate(first, cached(range(frames)), settings, device):
            ours_masks.append(to_mask(soft, STRIDE, ORIGINAL))
            sync()
            now = time.perf_counter()
            ours_times.append(now - start)
            start = now
            ours_soft.append(soft.cpu())
        rss_ours = peak_rss_gib()
        gpu_ours = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        print(f"store: zarr v3, one chunk a frame ({grid[0] * grid[1] * CHANNELS * 2 / 2 ** 20:.1f} MiB float16): "
              f"written in {written:.1f} s, read {1000 * statistics.median(reads):.1f} ms a frame (median)",
              flush=True)
        steady = ours_times[args.warmup:] or ours_times
        full = ours_times[settings.context:]  # frames settings.context + 1.. : the queue is full
        print(f"propagation over the video: {statistics.median(steady):.3f} s/frame (median of frames {args.warmup + 1}.."
              f"{frames - 1}), {statistics.median(full) if full else float('nan'):.3f} s/frame at full context "
              f"({settings.context + 1} frames, {len(full)} frames), first frames "
              f"{' '.join(f'{t:.2f}' for t in ours_times[:args.naive_frames])} s", flush=True)

        # ---- DIFT's code
        naive_frames = min(args.naive_frames, frames - 1)
        h, w = grid
        start = time.perf_counter()
        neighbourhood = dift.dift_restrict_neighborhood(h, w, settings.neighborhood)
        mask_seconds = time.perf_counter() - start
        neighbourhood = neighbourhood.unsqueeze(0).to(device)  # DIFT's .repeat(ncontext) at frame 1: 1 context
        print(f"naive neighbourhood mask ({h * w} x {h * w}, 4 nested loops, once a video): {mask_seconds:.1f} s",
              flush=True)

        def to_device(arrays):
            return (torch.from_numpy(a).to(device) for a in arrays)

        first_seg = first[None].to(device)
        naive_masks, naive_times, naive_soft = [], [], []
        loop = dift.dift_track(to_device(cached(range(naive_frames + 1))), first_seg, STRIDE, ORIGINAL[1],
                               ORIGINAL[0], settings.context, settings.temperature, settings.topk,
                               settings.neighborhood, neighbourhood)
        start = time.perf_counter()
        for soft, mask in loop:
            sync()
            now = time.perf_counter()
            naive_times.append(now - start)
            naive_soft.append(soft.cpu())
            naive_masks.append(mask)
            start = time.perf_counter()
        identical = [np.array_equal(a, b) for a, b in zip(naive_masks, ours_masks)]
        pixels = [int((a != b).sum()) for a, b in zip(naive_masks, ours_masks)]
        # Cells whose soft labels differ beyond rounding: where float32 rounding ranks a query's k-th and
        # (k+1)-th cosines differently (they are within an ulp or two), and their successors through the queue.
        cells = [int(((a - b).abs().amax(0) > 1e-4).sum()) for a, b in zip(naive_soft, ours_soft)]
        soft_error = max(float((a - b).abs().max()) for a, b in zip(naive_soft, ours_soft))
        early_naive = statistics.median(naive_times)
        early_ours = statistics.median(ours_times[:naive_frames])
        print(f"naive frames 1..{naive_frames} (1..{naive_frames} contexts): {early_naive:.3f} s/frame, propagation "
              f"{early_ours:.3f} s/frame on the same frames: {early_naive / early_ours:.1f}x; max |soft difference| "
              f"{soft_error:.2e}, cells differing by > 1e-4 per frame: {' '.join(map(str, cells))} (of {h * w}), "
              f"mask pixels differing: {' '.join(map(str, pixels))} (of {ORIGINAL[0] * ORIGINAL[1]})", flush=True)
        results["naive_first"] = {"frames": naive_frames, "naive_s": naive_times,
                                  "propagation_s": ours_times[:naive_frames], "max_soft_difference": soft_error,
                                  "cells_differing": cells, "pixels_differing": pixels}

        summary_naive, summary_ours = early_naive, early_ours
        last = frames - 1
        if args.full_context and last > settings.context:
            # Frame `last` from the queue propagation had: frame 0, then frames last - context .. last - 1.
            queued = range(last - settings.context, last)
            feats = [dift.dift_extract_feature(torch.from_numpy(f).to(device)).T
                     for f in cached([0, *queued])]
            segs = [first_seg] + [ours_soft[t - 1][None].to(device) for t in queued]
            target = torch.from_numpy(store[last]).to(device)
            sync()
            start = time.perf_counter()
            soft, _, _ = dift.dift_label_propagation(settings.temperature, settings.topk, settings.neighborhood,
                                                     target, feats, segs, neighbourhood)
            mask = dift.dift_mask(soft.clone(), STRIDE, ORIGINAL[1], ORIGINAL[0])
            sync()
            full_naive = time.perf_counter() - start
            identical.append(np.array_equal(mask, ours_masks[last - 1]))
            full_pixels = int((mask != ours_masks[last - 1]).sum())
            full_error = float((soft[0].cpu() - ours_soft[last - 1]).abs().max())
            del soft, feats, segs
            summary_naive, summary_ours = full_naive, statistics.median(full)
            print(f"naive at full context (frame {last}, {settings.context + 1} contexts): {full_naive:.2f} s, "
                  f"propagation {summary_ours:.3f} s/frame at full context; max |soft difference| {full_error:.2e}, "
                  f"mask pixels differing: {full_pixels}", flush=True)
            results["naive_full_context"] = {"frame": last, "naive_s": full_naive, "max_soft_difference": full_error,
                                             "pixels_differing": full_pixels}
        rss_all = peak_rss_gib()

    memory = f"peak RSS: {rss_ours:.2f} GiB after propagation, {rss_all:.2f} GiB after the naive code"
    if cuda:
        memory += f"; propagation's peak CUDA memory {gpu_ours:.2f} GiB"
    print(memory)
    speedup = summary_naive / summary_ours
    results.update({"propagation_s_per_frame": statistics.median(steady), "propagation_full_context_s": 
                    statistics.median(full) if full else None, "propagation_s": ours_times,
                    "neighbourhood_mask_s": mask_seconds, "peak_rss_gib": {"propagation": rss_ours, "all": rss_all},
                    "summary": {"propagation_s": summary_ours, "naive_s": summary_naive, "speedup": speedup,
                                "identical_masks": [sum(identical), len(identical)]}})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"propagation: {summary_ours:.3f} s/frame, naive: {summary_naive:.3f} s/frame, speedup: {speedup:.1f}x, "
          f"identical masks: {sum(identical)}/{len(identical)}")


if __name__ == "__main__":
    main()
