import json
import pandas as pd
from click.testing import CliRunner

from cli import cli


def test_prepare_demo_through_cli(tmp_path):
    out = tmp_path / "pairs.parquet"
    result = CliRunner().invoke(cli, ["prepare", "--dataset", "demo", "--root", str(tmp_path / "demo"),
                                      "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pairs = pd.read_parquet(out)
    images = pd.read_parquet(tmp_path / "pairs-images.parquet")
    assert f"{len(pairs)} pairs, {len(images)} images" in result.output
    assert set(pairs["src_image"]) | set(pairs["trg_image"]) == set(images["image"])


def test_prepare_sample_and_missing_image(spair_sample, tmp_path):
    runner = CliRunner()
    out = tmp_path / "x.parquet"
    result = runner.invoke(cli, ["prepare", "--root", str(spair_sample), "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out)) == 7
    (spair_sample / "JPEGImages" / "bus" / "2008_000238.jpg").unlink()
    result = runner.invoke(cli, ["prepare", "--root", str(spair_sample), "--split", "test", "--out", str(out)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {spair_sample}/JPEGImages/bus/2008_000238.jpg: image is missing"]
    assert len(pd.read_parquet(out)) == 7  # the earlier table is untouched


def test_evaluate_writes_metrics(tmp_path):
    frame = pd.DataFrame({"pair": ["a", "b"], "category": ["x", "y"], "trg_x": [0, 0], "trg_y": [0, 0],
                          "pred_x": [0, 30], "pred_y": [0, 0], "threshold": [100.0, 100.0], "image_size": [200.0, 200.0],
                          "layer": ["l", "l"]})
    frame.to_parquet(tmp_path / "p.parquet")
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "p.parquet"), "--metrics", str(tmp_path / "m.json"),
                                      "--table", str(tmp_path / "m.csv")])
    assert result.exit_code == 0, result.output
    assert "PCK@0.1" in result.output
    table = pd.read_csv(tmp_path / "m.csv")
    row = table[(table.kind == "per_point") & (table.category == "all") & (table.alpha == 0.1) & (table.threshold_by == "bbox")]
    assert row["pck"].item() == 0.5


def test_plan_takes_matching_time_from_the_benchmark(tmp_path, monkeypatch):
    from pipeline.workflows import plan

    assert plan.match_seconds("dift", "basic", "cpu", tmp_path)[0] == plan.MATCH_SECONDS_PER_PAIR  # nothing measured yet
    assert plan.match_seconds("dift", "basic", "cpu", None)[0] == plan.MATCH_SECONDS_PER_PAIR
    rows = [{"device": "cpu", "threads": threads, "channels": channels, "exact": 0.001 * threads, "exact_no_stats": 0.0005,
             "geoaware": 0.0002} for threads in (1, 2) for channels in (1280, 1536)]
    (tmp_path / "match.json").write_text(json.dumps(rows))
    assert plan.match_seconds("dift", "basic", "cpu", tmp_path) == (0.002, "benchmarks/match.py on cpu")  # 2 threads, 1280 channels
    assert plan.match_seconds("dift", "none", "cpu", tmp_path)[0] == 0.0005
    assert plan.match_seconds("geoaware", "basic", "cpu", tmp_path)[0] == 0.0002
    seconds, basis = plan.match_seconds("dift", "basic", "cuda", tmp_path)
    assert seconds == 0.002 and "upper bound" in basis  # no CUDA figure: the CPU's


def test_look_ups_never_rewrite_the_study(tmp_path, monkeypatch):
    """`evaluate` and `show` write to lookups/ by default, and refuse a path dvc.lock records as a stage's output
    (metrics/pck.json, anything under reports/) unless --overwrite."""
    frame = pd.DataFrame({"pair": ["a"], "category": ["x"], "trg_x": [0], "trg_y": [0], "pred_x": [0], "pred_y": [0],
                          "threshold": [100.0], "image_size": [200.0], "layer": ["l"]})
    frame.to_parquet(tmp_path / "p.parquet")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "pck.json").write_text("the study's\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  evaluate:\n    outs:\n    - path: metrics/pck.json\n"
                                       "  report:\n    outs:\n    - path: reports\n")
    runner = CliRunner()
    assert runner.invoke(cli, ["evaluate", "p.parquet"]).exit_code == 0
    assert (tmp_path / "lookups" / "pck.csv").is_file()
    assert (tmp_path / "metrics" / "pck.json").read_text() == "the study's\n"

    refused = runner.invoke(cli, ["evaluate", "p.parquet", "--metrics", "metrics/pck.json"])
    assert refused.exit_code == 2
    assert refused.output.strip() == ("error: metrics/pck.json: an output of the pipeline (dvc.lock: metrics/pck.json); "
                                      "write elsewhere, or pass --overwrite to replace it")
    assert (tmp_path / "metrics" / "pck.json").read_text() == "the study's\n"
    inside = runner.invoke(cli, ["show", "--store", "absent.zarr", "--out", "reports/x.png"])
    assert inside.exit_code == 2 and "dvc.lock: reports" in inside.output
    assert runner.invoke(cli, ["evaluate", "p.parquet", "--metrics", "metrics/pck.json", "--overwrite"]).exit_code == 0
    assert (tmp_path / "metrics" / "pck.json").read_text() != "the study's\n"
