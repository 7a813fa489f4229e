"""The project's own structure: DVC dependencies derived from the imports, the layout table of the docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "stages")


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _has_code(path: Path) -> bool:
    """An __init__.py that is only a docstring runs nothing a stage could depend on."""
    body = ast.parse(path.read_text()).body
    return not all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _imported_files(path: Path) -> set[Path]:
    """Project files `path` imports anywhere in it (function-level imports too), with the packages that
    importing them runs."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # a submodule, if it is one
    files = set()
    for dotted in found:
        if dotted.split(".")[0] not in PROJECT_PACKAGES:
            continue
        parts = dotted.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            file = _module_file(".".join(parts[:depth]))
            if file is not None and (file.name != "__init__.py" or _has_code(file)):
                files.add(file)
    return files


def transitive_imports(entry: Path) -> set[Path]:
    seen, todo = set(), [entry]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo += list(_imported_files(file) - seen)
    return seen


def _covered(file: Path, deps: list[str]) -> bool:
    relative = file.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_each_stage_depends_on_every_module_its_entry_point_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        entry = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
        deps = [d for d in stage.get("deps", []) if "${" not in d]
        files = transitive_imports(_module_file(entry))
        assert len(files) > 1 and _module_file(entry) in files
        gaps = sorted(f.relative_to(ROOT).as_posix() for f in files if not _covered(f, deps))
        if gaps:
            missing[name] = gaps
    assert not missing, f"dvc.yaml deps miss modules their stage imports: {missing}"


def test_the_derivation_sees_function_level_and_from_imports(tmp_path):
    # The check above is only as good as the import walk: a stage that imports the store lazily, inside a
    # function, still depends on it.
    entry = ROOT / "stages" / "extract.py"
    files = {f.relative_to(ROOT).as_posix() for f in transitive_imports(entry)}
    assert {"pipeline/cache/extract.py", "pipeline/cache/store.py", "pipeline/models/backbones/sd3.py",
            "pipeline/config.py", "stages/__init__.py"} <= files
    assert "pipeline/demo/tiny_models.py" not in files  # fixtures stay out of the real stages


def test_no_real_stage_depends_on_the_fixtures():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    fixtures = ROOT / "pipeline" / "demo" / "tiny_models.py"
    users = {name for name, stage in stages.items()
             if fixtures in transitive_imports(_module_file(re.search(r"python -m (stages\.\w+)",
                                                                       stage.get("do", stage)["cmd"]).group(1)))}
    assert users == {"model"}  # it builds the demo's `tiny:` models; nothing that reads a store imports them


def _layout_rows() -> dict[str, str]:
    section = (ROOT / "docs" / "reference" / "layout.md").read_text()
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`pipeline/"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_layout_table_matches_the_library_tree():
    rows = _layout_rows()
    folders = sorted(p.parent for p in (ROOT / "pipeline").rglob("__init__.py"))
    assert {f"{p.relative_to(ROOT).as_posix()}/" for p in folders} == set(rows)
    for folder in folders:
        named = set(re.findall(r"`(\w+\.py|\w+/)`", rows[f"{folder.relative_to(ROOT).as_posix()}/"]))
        present = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
        present |= {f"{p.name}/" for p in folder.iterdir() if p.is_dir() and not p.name.startswith("__")}
        assert named - {"__init__.py"} == present, folder
