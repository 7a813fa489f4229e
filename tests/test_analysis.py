import numpy as np
import pandas as pd

from pipeline.evaluation.analysis import correct, load_predictions
from pipeline.matching.match import match_store
from pipeline.evaluation.metrics import pck_table


def test_predictions_dataset_gives_the_same_pck(demo_stores, tmp_path):
    frames = [match_store(demo_stores["stores"][name], demo_stores["pairs"]) for name in ("tiny-sd2", "vae-sd3")]
    for name, frame in zip(("a", "b"), frames):
        frame.to_parquet(tmp_path / f"{name}.parquet")
    dataset = load_predictions(tmp_path)
    assert set(dataset.dims) == {"point", "backbone", "layer", "timestep", "protocol", "transform"}
    assert dataset.sizes["point"] == demo_stores["pairs"]["kps_ids"].map(len).sum()
    pck = correct(dataset).mean("point")  # per point PCK@0.1 of every variant; NaN where a variant is absent
    table = pck_table(pd.concat(frames))
    expected = table[(table["kind"] == "per_point") & (table["category"] == "all") & (table["alpha"] == 0.1)]
    for row in expected.itertuples():
        value = pck.sel(backbone=row.backbone, layer=row.layer, timestep=row.timestep, protocol=row.protocol,
                        transform=row.transform).item()
        assert value == row.pck
    assert np.isnan(pck.sel(backbone="vae-sd3", layer="up_blocks.1").values).all()
    best = pck.sel(protocol="dift", transform="raw").max("timestep").idxmax("layer")
    assert best.sel(backbone="vae-sd3").item() == "latent"
