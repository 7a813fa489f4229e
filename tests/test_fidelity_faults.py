"""A `pca:K` extraction (fit, fidelity sample, float16 reference, matching, figures, the other images) is one
writer from start to end, and every step can be killed and run again.

Each run is `python cli.py extract` in its own process, stopped (SIGSTOP) when it enters a chosen step: a second
`extract` is then refused in one line; the first is killed (-9), and a plain re-run must end with the clean
run's store, file for file, and its fidelity figures. The steps are found by the functions the run calls
(`sys.setprofile`), so no code is changed for the test (the store's fingerprint covers its code).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, store_files

pytestmark = pytest.mark.slow

# (step, the file and function entered, how many times): where in the run each stop lands; the fidelity sample
# is 5 or 6 images, extracted twice (lossy, then float16) before the others.
STEPS = [
    ("fit", "pipeline/cache/codecs.py", "add", 3),  # LayerMoments.add: the axes being fitted
    ("sample", "pipeline/cache/store.py", "mark_done", 2),  # the fidelity sample's images
    ("reference", "pipeline/cache/store.py", "mark_done", 9),  # the float16 reference
    ("matching", "pipeline/matching/match.py", "match_store", 2),  # the reference matched, the lossy store next
    ("bfloat16", "pipeline/matching/match.py", "match_store", 3),  # the reference read as bfloat16
    ("cleanup", "pipeline/workflows/fidelity.py", "reference_path", 2),  # the figures recorded, the reference to delete
    ("rest", "pipeline/cache/store.py", "mark_done", 15),  # the other images
]

STOPPER = """
import os, runpy, signal, sys
where, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = 0
def hook(frame, event, arg):
    global calls
    if event == "call" and frame.f_code.co_name == name and frame.f_code.co_filename.endswith(where):
        calls += 1
        if calls == nth:
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGSTOP)
sys.setprofile(hook)
sys.argv = ["cli.py", *sys.argv[4:]]
runpy.run_path(os.path.join(os.environ["REPO"], "cli.py"), run_name="__main__")
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_root, tiny_models):
    from pipeline.cache.encode import encode
    from pipeline.config import EncoderParams
    from pipeline.data.spair import load_split, write_split

    base = tmp_path_factory.mktemp("fidelity-faults")
    split = load_split(demo_root, "test")
    write_split(split, base / "pairs.parquet", base / "images.parquet")
    encode(EncoderParams(model=tiny_models["tiny-sd3"], canvas=128), split.images, demo_root,
           base / "store" / "latents" / "sd3.zarr")
    params = {
        "data": {"root": str(demo_root), "pairs": str(base / "pairs.parquet"), "images": str(base / "images.parquet")},
        "encoders": {"sd3": {"model": tiny_models["tiny-sd3"], "canvas": 128}},
        "backbones": {"sd3": {"kind": "sd3", "model": tiny_models["tiny-sd3"], "latents": "sd3",
                              "layers": ["transformer_blocks.1", "transformer_blocks.3"], "timesteps": [261],
                              "ensemble": 1, "storage": "pca:16", "fit_images": 8}},
        "fidelity": {"images": 6, "min_identical": 0.0, "max_pck_change": 100.0},
        "match": {"transforms": {"sd3": ["raw", "drop:auto+adaln"]}},
        "store": str(base / "store"),
    }
    (base / "params.yaml").write_text(yaml.safe_dump(params))
    return base


def extract(project, out, stop: tuple | None = None) -> subprocess.Popen:
    args = ["extract", "--backbone", "sd3", "--store", str(out), "--params", str(project / "params.yaml")]
    command = [sys.executable, "-c", STOPPER, *(map(str, stop) if stop else ("-", "-", "0")), *args]
    # One thread, MKL's too: torch takes its thread count from MKL_NUM_THREADS when that is set (CI sets 2), and
    # at two threads one image's posterior std once differed by 4e-4 between a CI run and its rerun.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), REPO=str(REPO))
    return subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def stopped(process) -> bool:
    """Wait until the process stops itself (or ends): True if it stopped."""
    started = time.monotonic()
    while time.monotonic() - started < 300:
        if process.poll() is not None:
            return False
        with open(f"/proc/{process.pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return True
        time.sleep(0.02)
    raise TimeoutError("the run neither stopped nor ended")


def figures(out) -> dict:
    return json.loads((out / "zarr.json").read_text())["attributes"]["fidelity"]


@pytest.fixture(scope="module")
def clean(project):
    out = project / "clean.zarr"
    finished(extract(project, out))
    return out


def recorded(out) -> bool:
    return "fidelity" in json.loads((out / "zarr.json").read_text())["attributes"]


@pytest.mark.parametrize("step,where,function,nth", STEPS, ids=[s[0] for s in STEPS])
def test_a_second_extract_is_refused_and_a_kill_converges_to_the_clean_run(project, clean, step, where, function, nth):
    out = project / f"{step}.zarr"
    reference = project / f"{step}.zarr.fidelity-reference"
    first = extract(project, out, (where, function, nth))
    assert stopped(first), f"the run ended before step {step}: {first.stderr.read()[-2000:]}"
    if step in ("reference", "matching", "bfloat16"):
        assert reference.exists() and not recorded(out)
    if step in ("cleanup", "rest"):
        assert recorded(out)
    try:
        second = extract(project, out)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2
        assert err.strip().splitlines() == [f"error: {out}: another process is writing this store (it holds {out}.lock); "
                                            "wait for it to finish or stop it"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finished(extract(project, out))
    assert figures(out) == figures(clean)
    assert store_files(out) == store_files(clean)
    assert not reference.exists()
