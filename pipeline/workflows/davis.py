"""DAVIS-2017 label propagation from the cache, DIFT's protocol: every frame of every video encoded and
extracted once into the dataset's own stores (store/davis/, frames on DIFT's rectangular canvas), then each
video's first mask carried through its frames at every stored layer, timestep and transform, the predicted
masks written as DAVIS's indexed PNGs and scored with DAVIS's J and F, one row per object and variant.

What propagation does with a video is pipeline/matching/label_propagation.py; how a mask is scored,
pipeline/evaluation/video_segmentation.py. This module only connects the dataset, the stores and the two.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.cache.current import check_current
from pipeline.cache.encode import encode
from pipeline.cache.extract import extract
from pipeline.config import DavisParams, Params
from pipeline.data import davis
from pipeline.errors import PipelineError
from pipeline.evaluation.video_segmentation import score_video
from pipeline.matching.label_propagation import PropagationSettings, propagate_video
from pipeline.matching.maps import StoreMaps
from pipeline.matching.match import write_parquet_atomically
from pipeline.models.hub import resolve_device

OBJECT_COLUMNS = ["backbone", "layer", "timestep", "transform", "temperature", "topk", "neighborhood", "context",
                  "sequence", "context_used", "object", "frames", "J_mean", "J_recall", "J_decay", "F_mean", "F_recall",
                  "F_decay"]


def dataset_attrs(dataset: DavisParams) -> dict:
    """What a store of DAVIS frames records as its dataset (the store contract, docs/reference/store.md)."""
    return {"name": "davis", "task": dataset.task, "root": dataset.root, "split": dataset.split}


def extract_store(params: Params, name: str, replace: str = "never", client=None) -> Path:
    """Backbone `name`'s features of every frame of the split, in params.dataset_store("davis", name): the
    frames through the backbone's encoder on DIFT's rectangular canvas (a latents store shared by the
    backbones of that encoder), then the backbone as datasets.davis.backbones.<name> changes it. Both resume."""
    dataset = params.datasets.davis
    frames = davis.images_table(dataset.root, dataset.split)
    encoder = params.backbone(name).latents
    latents = encode(params.dataset_encoder("davis", name), frames, dataset.root,
                     params.dataset_latents("davis", encoder), replace="outdated", dataset=dataset_attrs(dataset),
                     on_error="fail", check_disk=params.check_disk)
    return extract(params.dataset_backbone("davis", name), name, latents, params.dataset_store("davis", name),
                   replace=replace, client=client, on_error="fail", check_disk=params.check_disk)


def settings(dataset: DavisParams, sequence: str) -> PropagationSettings:
    """The propagation settings of one video: `context` capped where `context_caps` says (DIFT: `shooting`)."""
    return PropagationSettings(temperature=dataset.temperature, topk=dataset.topk, neighborhood=dataset.neighborhood,
                               context=min(dataset.context, dataset.context_caps.get(sequence, dataset.context)))


def variant_folder(layer: str, timestep: int, transform: str) -> str:
    """Where a variant's masks go under predictions/<backbone>/: `up_blocks.2/t51/raw`."""
    return f"{layer}/t{timestep}/{transform.replace(':', '-')}"


def written_masks(maps: StoreMaps, root: Path, sequence: str, names: list[str], layer: str, timestep: int,
                  transform: str, propagation: PropagationSettings, device: str, out: Path):
    """Yield each frame's predicted (H, W) labels, frame 0's being its annotation, each written as DAVIS's
    indexed PNG `out/<frame>.png` (the layout DAVIS's own evaluation reads)."""
    keys = [f"{sequence}/{name}" for name in names]
    annotation = davis.read_labels(davis.annotation_path(root, keys[0]))
    stride = maps.load(keys[0], layer, timestep, transform).stride
    out.mkdir(parents=True, exist_ok=True)
    davis.write_labels(out / f"{names[0]}.png", annotation)
    yield annotation
    features = (maps.load(key, layer, timestep, transform).features for key in keys)
    for name, labels in zip(names[1:], propagate_video(annotation, features, stride, propagation, device)):
        davis.write_labels(out / f"{name}.png", labels)
        yield labels


def propagate_store(params: Params, name: str, masks: Path, store_path: str | Path | None = None) -> pd.DataFrame:
    """Every video at every stored layer x timestep x transform: its masks under `masks` and a row per
    object (OBJECT_COLUMNS)."""
    dataset = params.datasets.davis
    root = Path(dataset.root)
    maps = StoreMaps(store_path or params.dataset_store("davis", name))
    if (maps.root.attrs.get("dataset") or {}).get("name") != "davis":
        raise PipelineError(maps.path, "dataset", "not a store of DAVIS frames (extract it with the davis-extract stage)")
    videos = {sequence: davis.frames(root, sequence) for sequence in davis.sequences(root, dataset.split)}
    maps.check_images([f"{sequence}/{frame}" for sequence, names in videos.items() for frame in names])
    device = str(resolve_device(dataset.device))
    protocol = {"temperature": dataset.temperature, "topk": dataset.topk, "neighborhood": dataset.neighborhood,
                "context": dataset.context}
    variants = [(layer, int(t), transform) for layer in maps.layers for t in maps.timesteps
                for transform in params.match.transforms_for(name)]
    rows = []
    total = len(variants) * sum(len(names) - 1 for names in videos.values())
    with tqdm(total=total, unit="frame", desc=f"davis {name}") as bar:
        for layer, timestep, transform in variants:
            for sequence, names in videos.items():
                out = masks / variant_folder(layer, timestep, transform) / sequence
                propagation = settings(dataset, sequence)
                predicted = written_masks(maps, root, sequence, names, layer, timestep, transform, propagation,
                                          device, out)
                truth = (davis.read_labels(davis.annotation_path(root, f"{sequence}/{frame}")) for frame in names)
                try:
                    scores = score_video(truth, _counted(predicted, bar))
                except PipelineError as exc:  # name the video and variant it happened in
                    raise PipelineError(maps.path, f"{sequence} at {layer}, t={timestep}, {transform}",
                                        f"{exc.field + ': ' if exc.field else ''}{exc.reason}") from None
                for row in scores.to_dict("records"):
                    rows.append({"backbone": name, "layer": layer, "timestep": timestep, "transform": transform,
                                 **protocol, "sequence": sequence, "context_used": propagation.context, **row})
    return pd.DataFrame(rows, columns=OBJECT_COLUMNS)


def _counted(frames, bar):
    for index, frame in enumerate(frames):
        if index:
            bar.update()
        yield frame


def propagate_to_files(params: Params, name: str, masks: str | Path, table: str | Path) -> Path:
    """The masks of backbone `name` under `masks` and its object table at `table`, written whole or not at all;
    a stale store is refused."""
    check_current(params.dataset_store("davis", name), params, allow_stale=False, anyway=None)
    frame = propagate_store(params, name, Path(masks))
    table = Path(table)
    table.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomically(frame, table)
    print(f"{table}: {len(frame)} object scores", file=sys.stderr)
    return table

