import numpy as np
from click.testing import CliRunner
from PIL import Image

from cli import cli
from conftest import demo_project
from pipeline.evaluation import figures
from pipeline.matching.maps import StoreMaps
from pipeline.matching.match import match_store


def test_heatmap_peak_is_the_prediction(demo_stores):
    pairs = demo_stores["pairs"]
    pair = pairs[pairs["src_image"] != pairs["trg_image"]].iloc[3]
    path = demo_stores["stores"]["tiny-sd3"]
    maps = StoreMaps(path)
    variant = figures.Variant(str(path), "transformer_blocks.3", 261)
    scores = figures.similarity_map(maps, variant, pair, keypoint=2)
    assert scores.shape == (pair["trg_height"], pair["trg_width"])
    predictions = match_store(path, pairs[pairs["filename"] == pair["filename"]], layers=["transformer_blocks.3"])
    y, x = np.unravel_index(scores.argmax(), scores.shape)
    assert (predictions.iloc[2]["pred_x"], predictions.iloc[2]["pred_y"]) == (x, y)


def test_cli_show(demo_stores, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_project(demo_stores, tmp_path))
    stores = [str(demo_stores["stores"][name]) for name in ("tiny-sd2", "tiny-sd3")]
    args = ["show", "--store", stores[0], "--store", stores[1], "--layer", "up_blocks.1", "--layer",
            "transformer_blocks.1", "--out", "h.png"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "h.png") as image:
        assert image.width > image.height  # source + 2 panels side by side
    result = CliRunner().invoke(cli, args + ["--keypoint", "99"])
    assert result.exit_code == 2 and result.output.startswith("error: keypoint: pair ")
