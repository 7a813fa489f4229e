"""The examples of README.md and docs/ that are marked runnable run, as written, against the demo.

A fenced block preceded by `<!-- runnable -->` is run in a copy of the project after `dvc repro` of the demo
(bash: `bash -euo pipefail`, python: the interpreter); `<!-- runnable: serves -->` marks a command that serves
until stopped: it must print its URL, and the URL must answer. So a renamed option, a wrong path or a stale
xarray call in the documentation fails here, not in a reader's shell.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, copy_project

MARKER = re.compile(r"^<!-- runnable(?:: (?P<how>[\w-]+))? -->\n", re.M)
FENCE = re.compile(r"```(?P<lang>\w*)\n(?P<code>.*?)^```", re.M | re.S)
LANGUAGES = {"bash", "python"}
HOW = {None, "serves"}


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    lang: str
    how: str | None
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def examples_of(path: Path) -> list[Example]:
    """The runnable blocks of one page, each with the line its fence opens on."""
    text = path.read_text()
    found = []
    for marker in MARKER.finditer(text):
        fence = FENCE.match(text, marker.end())
        line = text.count("\n", 0, marker.end()) + 1
        where = f"{path.relative_to(REPO).as_posix()}:{line}"
        assert fence, f"{where}: a runnable marker must be followed directly by a fenced block"
        assert fence["lang"] in LANGUAGES, f"{where}: runnable blocks are {sorted(LANGUAGES)}, not {fence['lang']!r}"
        assert marker["how"] in HOW, f"{where}: unknown runnable mode {marker['how']!r}"
        found.append(Example(path.relative_to(REPO).as_posix(), line, fence["lang"], marker["how"], fence["code"]))
    return found


def all_examples() -> list[Example]:
    return [example for page in pages() for example in examples_of(page)]


def commands_named(text: str) -> set[str]:
    return set(re.findall(r"cli\.py (\w[\w-]*)", text))


def test_every_command_is_named_in_the_readme_and_run_by_an_example():
    from cli import cli

    named = commands_named((REPO / "README.md").read_text())
    assert named == set(cli.commands), "the README's command list names every command, and only those"
    run = set().union(*(commands_named(e.code) for e in all_examples()))
    assert named <= run, f"named in the README but run by no example: {sorted(named - run)}"


def test_the_examples_are_found_where_they_are_marked():
    """A marker the parser skipped would be an example nobody runs: every one parses, in the pages that have them."""
    total = sum(len(re.findall(r"^<!--\s*runnable", page.read_text(), re.M)) for page in pages())
    examples = all_examples()
    assert len(examples) == total
    assert {e.page for e in examples} >= {"README.md", "docs/guides/matching.md", "docs/guides/datasets.md",
                                          "docs/guides/explorer.md", "docs/reference/store.md"}
    assert any(e.how == "serves" for e in examples) and any(e.lang == "python" for e in examples)


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg", "DIFT_CACHE_DIR": str(home),
            "PYTHONPATH": ""}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A copy of the project (with the profiles and the docs' assets) after `dvc repro` of the demo."""
    root = copy_project(tmp_path_factory.mktemp("examples") / "project")
    for name in ("profiles", "docs/assets", "benchmarks/results"):
        shutil.copytree(REPO / name, root / name)
    env = _env(tmp_path_factory.mktemp("cache"))
    for command in (["git", "init", "-q"], ["git", "add", "."],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], ["dvc", "repro"]):
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, env


@pytest.mark.slow
@pytest.mark.parametrize("example", all_examples(), ids=str)
def test_example_runs(demo, example):
    root, env = demo
    command = ["bash", "-euo", "pipefail", "-c", example.code] if example.lang == "bash" else [sys.executable, "-c", example.code]
    if example.how == "serves":
        _serves(command, root, env)
        return
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{example} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _serves(command: list[str], root: Path, env: dict[str, str]) -> None:
    """Start it, read lines until it prints its URL, fetch that page, stop it."""
    server = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        seen = []
        for line in server.stdout:
            seen.append(line)
            url = re.search(r"http://\S+", line)
            if url:
                assert b"<html" in _page(url[0]).lower()
                return
        pytest.fail(f"it stopped without printing a URL:\n{''.join(seen)[-3000:]}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _page(url: str, patience: float = 60) -> bytes:
    """The page at `url`, asked again while the server that printed it is still starting to listen."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as page:
                return page.read()
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_the_readmes_links_lead_somewhere():
    """The README is read on a forge, outside the site's --strict build: every relative link and image must name a
    file of the repository (the report excepted: `dvc repro` writes it), and an anchor a heading of that page."""
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(targets) > 10
    for target in targets:
        if target.startswith(("http://", "https://")) or target == "reports/index.md":
            continue
        path, _, anchor = target.partition("#")
        assert (REPO / path).is_file(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (REPO / path).read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, target
