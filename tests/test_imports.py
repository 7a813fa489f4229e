"""The layout's rules, read off the source: imports point one way along the flow (data -> models -> cache ->
matching -> evaluation -> workflows -> explorer, on a base of errors, kinds and config) with no cycle; only
the store module opens Zarr groups; one list of backbone kinds; package faces only name things; an import
inside a function says why in a comment."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from pipeline import config
from pipeline.models.backbones.registry import BACKBONES, FAMILIES
from pipeline.models.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

# Lowest first; a module may import its own layer or one below. The most specific prefix decides.
LAYERS = (
    ("pipeline.errors", "pipeline.models.kinds", "pipeline.config", "pipeline.cluster"),
    ("pipeline.data",),
    ("pipeline.models",),
    ("pipeline.demo",),
    ("pipeline.cache",),
    ("pipeline.matching",),
    ("pipeline.evaluation",),
    ("pipeline.workflows",),
    ("pipeline.explorer",),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only: nothing runs them)."""
    return {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and
            isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
            for node in ast.walk(block) if isinstance(node, (ast.Import, ast.ImportFrom))}


def project_imports(path: Path) -> list[tuple[int, str]]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_of(source: str, own: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in the source of module `own`, at the top or inside
    a function; a `from pipeline.x import y` of a submodule `y` counts as an import of `pipeline.x.y`."""
    tree = ast.parse(source)
    skipped = _type_checking_only(tree)
    package = own if is_package else own.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("pipeline")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("pipeline"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*candidate.split("."))).is_dir()
                found.append((node.lineno, candidate if is_module else base))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges[module_name(path)] = {target for _, target in project_imports(path)}
    return edges


def test_imports_point_along_the_flow():
    against = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for line, target in project_imports(path):
            if layer(target) > layer(source):
                against.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target}")
    assert not against, "imports against the flow:\n" + "\n".join(against)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    # A package imports its parent packages' __init__ as a side effect of any import: those edges are implied.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if target not in edges or target == module:
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if state.get(module) is None:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_rules_see_what_they_must():
    """The readers above on planted sources: a relative import of a submodule from inside a function is an
    arrow to that submodule (here against the flow), a TYPE_CHECKING import is none."""
    planted = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.explorer import server\n"
               "def f():\n    from ..matching import maps\n    from . import store\n")
    assert imports_of(planted, "pipeline.cache.planted") == [(5, "pipeline.matching.maps"), (6, "pipeline.cache.store")]
    assert layer("pipeline.matching.maps") > layer("pipeline.cache.planted") == layer("pipeline.cache.store")
    assert layer("pipeline.models.kinds") < layer("pipeline.data") < layer("pipeline.models.hub")


def test_only_the_store_module_opens_zarr_groups():
    store = PACKAGE / "cache" / "store.py"
    offenders = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "stages").rglob("*.py"), ROOT / "cli.py"]):
        if path == store:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("open_group", "open", "open_array", "create_group") \
                    and isinstance(node.value, ast.Name) and node.value.id == "zarr":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: zarr.{node.attr}")
    assert not offenders, "Zarr opened outside pipeline/cache/store.py:\n" + "\n".join(offenders)


def test_one_list_of_backbone_kinds():
    assert set(BACKBONES) == set(KINDS), "every declared kind has exactly one family class, and no class more"
    for family in FAMILIES:
        assert family.kinds and set(family.kinds) <= set(KINDS), family
    assert sum(len(family.kinds) for family in FAMILIES) == len(KINDS)  # no kind claimed by two families
    assert set(typing.get_args(config.BackboneParams.__annotations__["kind"] if not isinstance(
        config.BackboneParams.__annotations__["kind"], str) else eval(config.BackboneParams.__annotations__["kind"],
                                                                     vars(config)))) == set(KINDS)
    # No other module spells out two or more kind names together (a list, tuple, set or dict of them), but
    # for a family's own kinds in its file.
    names = set(KINDS)
    own = {Path(__import__(family.__module__, fromlist=["_"]).__file__).resolve(): set(family.kinds) for family in FAMILIES}
    spelled = []
    for path in sorted([*PACKAGE.rglob("*.py"), ROOT / "cli.py"]):
        if path == PACKAGE / "models" / "kinds.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else \
                node.keys if isinstance(node, ast.Dict) else []
            values = [e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(values) >= 2 and len(values) == len(elements) and set(values) <= names and \
                    not set(values) <= own.get(path.resolve(), set()):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}: {values}")
    assert not spelled, "kind names listed outside pipeline/models/kinds.py:\n" + "\n".join(spelled)


@pytest.mark.parametrize("face", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_faces_only_name_things(face):
    body = ast.parse(face.read_text()).body
    code = [node for node in body if not (isinstance(node, (ast.Import, ast.ImportFrom)) or
                                          (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)))]
    assert not code, f"{face.relative_to(ROOT)} holds code (line {code[0].lineno}): move it to a module of its own"


def test_an_import_inside_a_function_says_why():
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not unexplained, ("imports inside functions without a reason (a heavy optional dependency, in a "
                             "comment); move them to the top:\n" + "\n".join(unexplained))
