"""What a store's fingerprint records besides its parameters: the identity of the model (its weight and
config files), of the code that computed the contents, and the versions of the libraries that ran it.

Code identity (`code_closure`) is the code the computation actually reaches, function by function: from
its roots (a stage's worker functions, a backbone's class), every function, class and module-level
constant of the project that their source names, followed through the names that source names in turn.
Each function counts by its source as parsed (comments, docstrings and layout do not count) and as live:
names are resolved in the function's namespace when the fingerprint is computed, so a function replaced
at run time counts with its own source. A fix to anything a store's values go through gives the store
another fingerprint (the stage rebuilds it, the CLI refuses to resume it); code the computation does not
reach (planning, reports, orchestration that only the stage's entry point runs) does not count.
Libraries are not followed: their versions (`library_versions`) stand for them.

A model's identity (`model_identity`) is the full content of its weight, config and tokenizer files, each
file's sha256 computed once (memoised in the process and in a small JSON cache outside the model folder,
`file_digests`), so a multi-GB checkpoint is read again only when it changes.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import sys
import tempfile
import textwrap
import time
import types
import weakref
from pathlib import Path

from pipeline.config import user_cache
from pipeline.errors import PipelineError

# A model folder's identity is its weights, configs and tokenizer files: not READMEs, licences, sample
# images, nor hidden files (huggingface_hub's download records hold timestamps; the model stage's record
# of its source).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".txt")

# The libraries whose code computes stored values (the models' forward passes, the VAE, the codecs, the
# float16 casts and the pca fit).
VERSIONED = ("torch", "diffusers", "transformers", "zarr", "numpy")


def library_versions(packages=VERSIONED) -> dict[str, str | None]:
    """{package: installed version} (None for one that is not installed), and Python's major.minor: the code
    digests are of Python's parse of the source (`ast.dump`), which differs between Python versions, so a
    store read under another Python is stale, and the message says why."""
    versions = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# ---------------------------------------------------------------------------------------------------------
# Model identity


def model_identity(model: str) -> str:
    """For a local folder, a digest of the names and full contents (sha256) of its weight, config and
    tokenizer files; for a hub id, the id itself (a hub revision is a parameter of its own); none ("") for
    an encoder without a model (`pixels`): "" is not the working directory."""
    folder = Path(model)
    if not model or not folder.is_dir():
        return model
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    sums = file_digests(files)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sums[path]}\n".encode())
    return digest.hexdigest()[:16]


# A digest is remembered only for a file last changed this long before it was read: a file written again
# within the filesystem's timestamp granularity of an earlier read could keep its size and mtime.
SETTLED_NS = 2_000_000_000
_clock = time.time_ns
_known: dict[str, tuple[tuple[int, ...], str]] = {}  # resolved path -> (stat key, sha256), this process


def _stat_key(path: Path) -> tuple[str, tuple[int, ...]]:
    """(resolved path, (size, mtime_ns, ctime_ns, inode)): a file with the same key has the same contents."""
    resolved = path.resolve()
    st = os.stat(resolved)
    return str(resolved), (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_digests(paths) -> dict[Path, str]:
    """{path: sha256 of its contents}, each file read only when this process and the digest cache
    (`digest_cache_path`) have not seen it with its current size, mtime, ctime and inode."""
    found: dict[Path, str] = {}
    unknown: dict[Path, tuple[str, tuple[int, ...]]] = {}
    for path in paths:
        where, key = _stat_key(Path(path))
        known = _known.get(where)
        if known is not None and known[0] == key:
            found[path] = known[1]
        else:
            unknown[path] = (where, key)
    if not unknown:
        return found
    cached = _read_cache()
    fresh = {}
    for path, (where, key) in unknown.items():
        entry = cached.get(where)
        if entry is not None and entry[0] == key:
            found[path] = entry[1]
            _known[where] = entry
            continue
        started = _clock()
        found[path] = _sha256(Path(path))
        # Remembered only if the file did not change while it was read, and not just before.
        if _stat_key(Path(path)) == (where, key) and max(key[1], key[2]) < started - SETTLED_NS:
            _known[where] = fresh[where] = (key, found[path])
    if fresh:
        _write_cache(fresh)
    return found


def digest_cache_path() -> Path | None:
    """`file-digests.json` in the user's cache (pipeline/config.py, `user_cache`); never inside a model folder
    (a DVC output). None without a home directory: digests are then computed every time."""
    try:
        return user_cache() / "file-digests.json"
    except PipelineError:
        return None


def _read_cache() -> dict[str, tuple[tuple[int, ...], str]]:
    """The digest cache's entries; {} when it is absent, unreadable or not what this module writes."""
    path = digest_cache_path()
    try:
        files = json.loads(path.read_text())["files"]
        return {where: (tuple(int(v) for v in entry["key"]), str(entry["sha256"])) for where, entry in files.items()}
    except Exception:  # noqa: BLE001 - a damaged or foreign cache is only a cache: recompute
        return {}


def _write_cache(fresh: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Add `fresh` to the digest cache (dropping files that are gone), atomically: a temporary file renamed
    over it. Another process's concurrent additions may be lost, which only costs it a read again; a cache
    that cannot be written is silently left as it is."""
    path = digest_cache_path()
    if path is None:
        return
    entries = {where: entry for where, entry in _read_cache().items() if os.path.exists(where)} | fresh
    text = json.dumps({"files": {where: {"key": list(key), "sha256": sha} for where, (key, sha) in sorted(entries.items())}})
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".file-digests.", suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------------
# Code identity


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _short(digest: str) -> str:
    return digest[:12]


def _code_text(code: types.CodeType) -> str:
    """A function without a source file: its bytecode, names and constants stand for it."""
    def const(value):
        if isinstance(value, types.CodeType):
            return _code_text(value)
        if isinstance(value, frozenset):
            return repr(sorted(map(repr, value)))
        return repr(value)

    return repr((code.co_code.hex(), code.co_names, tuple(const(c) for c in code.co_consts)))


# The project's code is its `pipeline` package; the fingerprinting itself is not part of what it fingerprints.
PROJECT_PACKAGE = "pipeline"
NOT_FOLLOWED = ("pipeline.cache.provenance",)
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_MISSING = object()


def _in_project(module_name) -> bool:
    name = str(module_name or "")
    return ((name == PROJECT_PACKAGE or name.startswith(PROJECT_PACKAGE + "."))
            and not any(name == n or name.startswith(n + ".") for n in NOT_FOLLOWED))


def _written_in_project(function) -> bool:
    """Its code is in the project's files (not a library's, nor generated)."""
    filename = function.__code__.co_filename
    if filename.startswith("<") or "site-packages" in filename:
        return False
    return Path(filename).resolve().is_relative_to(_PROJECT_ROOT)


def _project_function(function) -> bool:
    """A function of the `pipeline` package, or one defined in the project's own files (a test's replacement
    of a pipeline function counts with its own source)."""
    if str(function.__module__).split(".")[0] == PROJECT_PACKAGE:
        return _in_project(function.__module__)
    return _written_in_project(function)


def _unwrap(obj):
    """The function behind a library's decorator (functools.cache, lru_cache, contextmanager: their wrappers
    are the library's) or a partial; a wrapper written in the project counts itself (its closure holds
    the function it wraps)."""
    while True:
        if isinstance(obj, functools.partial):
            obj = obj.func
        elif inspect.ismethod(obj):
            obj = obj.__func__
        elif (callable(obj) and not inspect.isclass(obj) and "__wrapped__" in getattr(obj, "__dict__", {})
              and not (inspect.isfunction(obj) and _written_in_project(obj))):
            obj = obj.__wrapped__
        else:
            return obj


def _references(tree: ast.AST):
    """The names a piece of source reads, as chains: `store.write_image` -> ("store", "write_image");
    annotations left out (never evaluated here: `from __future__ import annotations`)."""
    def visit(node):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                yield (base.id, *reversed(chain))
                return
            yield from visit(base)
            return
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                yield (node.id,)
            return
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns") or (field == "type_comment"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    yield from visit(child)

    yield from visit(tree)


@dataclasses.dataclass(frozen=True)
class _Source:
    """What a function's or class's source says: its digest, the name chains it reads (`_references`) and
    the imports it makes itself, as (bound name, module, member or None, relative level)."""

    digest: str
    chains: tuple = ()
    imports: tuple = ()


# Parsing is the cost of a closure: once per code object (a replaced function has its own) and per class.
_function_sources: dict[tuple[str, types.CodeType], _Source] = {}
_class_sources: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parsed(tree: ast.AST, imports: bool = True) -> tuple[tuple, tuple]:
    chains = tuple(dict.fromkeys(_references(tree)))
    found = []
    for node in ast.walk(tree) if imports else ():
        if isinstance(node, ast.Import):
            found += [(alias.asname or alias.name.split(".")[0], alias.name if alias.asname else alias.name.split(".")[0],
                       None, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(alias.asname or alias.name, node.module or "", alias.name, node.level) for alias in node.names]
    return chains, tuple(found)


def _function_source(function) -> _Source:
    key = (function.__code__.co_filename, function.__code__)
    if key not in _function_sources:
        try:
            source = inspect.getsource(function.__code__)  # its own code: not what a wrapper wraps
        except (OSError, TypeError):  # no source file: its bytecode stands for it
            _function_sources[key] = _Source(hashlib.sha256(_code_text(function.__code__).encode()).hexdigest())
            return _function_sources[key]
        try:
            tree = ast.parse(textwrap.dedent(source))
        except SyntaxError:  # a lambda cut out of a longer expression: its text as it is
            _function_sources[key] = _Source(hashlib.sha256(source.strip().encode()).hexdigest())
            return _function_sources[key]
        chains, imports = _parsed(tree)
        digest = hashlib.sha256(ast.dump(_without_docstrings(tree)).encode()).hexdigest()
        _function_sources[key] = _Source(digest, chains, imports)
    return _function_sources[key]


def _class_source(cls) -> _Source:
    """The class without its methods (they count one by one, as they are now): decorators, class attributes
    (a dataclass's fields); what those name (not its bases: they count as classes)."""
    if cls not in _class_sources:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
            node = tree.body[0]
            assert isinstance(node, ast.ClassDef)
        except (OSError, TypeError, SyntaxError, IndexError, AssertionError):
            text = repr(sorted(k for k in vars(cls) if not k.startswith("__")))
            _class_sources[cls] = _Source(hashlib.sha256(text.encode()).hexdigest())
            return _class_sources[cls]
        node.body = [n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        _without_docstrings(node)
        digest = hashlib.sha256(ast.dump(node).encode()).hexdigest()
        node.bases, node.keywords = [], []
        _class_sources[cls] = _Source(digest, _parsed(node, imports=False)[0])
    return _class_sources[cls]


class _Closure:
    """The walk behind `code_closure`: entries {qualified name: digest}, each object once."""

    def __init__(self, opaque):
        self.opaque = {id(_unwrap(f)) for f in opaque}
        self.entries: dict[str, str] = {}
        self.names: dict[int, str] = {}  # id -> its entry's name
        self.kept: list = []  # what `names` refers to stays alive during the walk (ids are not reused)
        self.pending: list = []

    def add(self, obj, name: str, digest: str) -> str:
        while name in self.entries:  # another object under the same name (a replaced function's original)
            name += "'"
        self.entries[name] = _short(digest)
        self.names[id(obj)] = name
        self.kept.append(obj)
        return name

    def visit(self, obj, binding: str | None, root: bool = False) -> str | None:
        """Count what an object found under the name `binding` stands for; its entry's name."""
        obj = _unwrap(obj)
        if id(obj) in self.names:
            return self.names[id(obj)]
        if isinstance(obj, types.ModuleType):
            return None
        if inspect.isfunction(obj):
            if not (root or _project_function(obj)):
                return None
            return self.add_function(obj, self._function_name(obj, binding))
        if inspect.isclass(obj):
            if not (root or _in_project(obj.__module__)):
                return None
            name = self.add(obj, f"{obj.__module__}.{obj.__qualname__}", _class_source(obj).digest)
            self.pending.append(("class", obj, name))
            return name
        if _in_project(type(obj).__module__):  # an instance: its class's code
            return self.visit(type(obj), None)
        if binding is not None:
            text = self.constant_text(obj, binding.rsplit(".", 1)[-1].isupper())
            if text is not None:
                return self.add(obj, binding, hashlib.sha256(text.encode()).hexdigest())
        return None

    def add_function(self, function, name: str) -> str:
        name = self.add(function, name, _function_source(function).digest)
        self.pending.append(("function", function, name))
        return name

    @staticmethod
    def _function_name(function, binding: str | None) -> str:
        """Its module and qualified name when that is where it is found; else where it was found (a
        replacement is named by what it replaces)."""
        found = sys.modules.get(function.__module__)
        for part in function.__qualname__.split("."):
            found = getattr(found, part, None) if found is not None else None
        if binding is None or _unwrap(found) is function:
            return f"{function.__module__}.{function.__qualname__}"
        return binding

    def constant_text(self, value, upper: bool, depth: int = 0) -> str | None:
        """A module-level constant's text: numbers, strings and tuples of them; dicts, lists, sets and other
        objects only under an UPPER_CASE name (by convention not rebound or mutated: a module's cache is
        not a constant). Project functions and classes inside are followed; None when not a constant."""
        if depth > 8:
            return None
        if isinstance(value, enum.Enum):
            return repr(value)
        if isinstance(value, _SCALARS):
            return repr(value)
        if inspect.isfunction(value) or inspect.isclass(value) or isinstance(value, functools.partial):
            name = self.visit(value, None)
            return f"<{name or getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}>"
        if isinstance(value, tuple) or (upper and isinstance(value, list)):
            parts = [self.constant_text(v, upper, depth + 1) for v in value]
            return None if None in parts else f"{type(value).__name__}({', '.join(parts)})"
        if isinstance(value, frozenset) or (upper and isinstance(value, set)):
            parts = [self.constant_text(v, upper, depth + 1) for v in value]
            return None if None in parts else f"{type(value).__name__}({', '.join(sorted(parts))})"
        if upper and isinstance(value, dict):
            parts = [(self.constant_text(k, upper, depth + 1), self.constant_text(v, upper, depth + 1))
                     for k, v in value.items()]
            return None if any(None in p for p in parts) else "{" + ", ".join(f"{k}: {v}" for k, v in parts) + "}"
        if upper and not isinstance(value, types.ModuleType) and not callable(value):
            text = repr(value)
            return None if re.search(r" at 0x[0-9a-f]+", text) else text
        return None

    def run(self) -> None:
        """Follow what each counted function's and class's source names, until nothing new is found."""
        while self.pending:
            kind, obj, name = self.pending.pop(0)
            if kind == "function":
                self._follow_function(obj, name)
            else:
                self._follow_class(obj, name)

    def _follow_function(self, function, name: str) -> None:
        if id(function) in self.opaque:  # a registry: its own source counts, not everything it could return
            return
        source = _function_source(function)
        code = function.__code__
        imports = {bound: _imported(module, member, level, function.__globals__.get("__package__"))
                   for bound, module, member, level in source.imports}
        cells = {}
        for var, cell in zip(code.co_freevars, function.__closure__ or ()):
            try:
                cells[var] = cell.cell_contents
            except ValueError:  # not yet assigned
                pass
        local = set(code.co_varnames) | set(code.co_cellvars)
        module = function.__globals__.get("__name__", "")

        def lookup(var):
            if var in imports:
                return imports[var], f"{name}.<import {var}>"
            if var in cells:
                return cells[var], f"{name}.<closure {var}>"
            if var in local:
                return _MISSING, None
            return function.__globals__.get(var, _MISSING), f"{module}.{var}"

        self._follow_references(source.chains, lookup)

    def _follow_class(self, cls, name: str) -> None:
        for base in cls.__mro__[1:]:
            if _in_project(base.__module__):
                self.visit(base, None)
        for attribute, member in sorted(vars(cls).items()):
            for suffix, function in self._members(member):
                function = _unwrap(function)
                if inspect.isclass(function):
                    self.visit(function, None)
                elif (inspect.isfunction(function) and id(function) not in self.names
                      and not function.__code__.co_filename.startswith("<")):  # generated (dataclass): the class's fields
                    self.add_function(function, f"{name}.{attribute}{suffix}")
        namespace = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
        self._follow_references(_class_source(cls).chains,
                                lambda var: (namespace.get(var, _MISSING), f"{cls.__module__}.{var}"))

    @staticmethod
    def _members(member):
        """(name suffix, function) of a class attribute: a method, a static or class method, a property's
        accessors, a cached property, a nested class."""
        if isinstance(member, (staticmethod, classmethod)):
            return [("", member.__func__)]
        if isinstance(member, property):
            return [(suffix, f) for suffix, f in (("", member.fget), (".setter", member.fset), (".deleter", member.fdel))
                    if f is not None]
        if isinstance(member, functools.cached_property):
            return [("", member.func)]
        if inspect.isfunction(_unwrap(member)) or inspect.isclass(member):
            return [("", member)]
        return []

    def _follow_references(self, chains, lookup) -> None:
        for chain in chains:
            obj, binding = lookup(chain[0])
            if obj is _MISSING:
                continue
            self.visit(obj, binding)
            for attribute in chain[1:]:  # through the project's modules: `codecs.cast`, `pipeline.cache.store.x`
                if not (isinstance(obj, types.ModuleType) and _in_project(obj.__name__)):
                    break
                module = obj.__name__
                obj = getattr(obj, attribute, _MISSING)
                if obj is _MISSING:
                    obj = _import(f"{module}.{attribute}")  # a submodule not imported yet
                    if obj is _MISSING:
                        break
                self.visit(obj, f"{module}.{attribute}")


def _imported(module: str, member: str | None, level: int, package: str | None):
    """What a function's own import binds, imported now as running the function would: the project's modules
    and their members; nothing followed for other libraries."""
    if level:
        base = (package or "").rsplit(".", level - 1)[0] if level > 1 else (package or "")
        module = f"{base}.{module}" if module else base
    if not _in_project(module):
        return _MISSING
    found = _import(module)
    if member is None or found is _MISSING:
        return found
    value = getattr(found, member, _MISSING)
    return _import(f"{module}.{member}") if value is _MISSING else value


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return _MISSING


def code_closure(roots, opaque=()) -> dict[str, str]:
    """{qualified name: digest} of the code that `roots` (functions, classes) reach, sorted by name.

    From each root: a function counts by its source (parsed, without docstrings), then every name its
    source reads is resolved where the function would resolve it now (its own imports, its closure, its
    module's globals) and followed when it is the project's (the `pipeline` package): a function ->
    its source and what it names; a class -> its body without methods, each of its methods and its
    project bases; a module -> the attribute named on it; an instance of a project class -> that class;
    a module-level constant -> its value (numbers, strings, tuples; dicts, lists and other values under an
    UPPER_CASE name). Annotations are not followed, nor other libraries (their versions stand for them).
    `opaque`: functions that count by their own source only, without following what they name (a
    registry that would otherwise bring in every class it can return)."""
    walk = _Closure(opaque)
    for root in roots:
        walk.visit(root, None, root=True)
    walk.run()
    return dict(sorted(walk.entries.items()))


def module_classes(module: types.ModuleType) -> list[type]:
    """The classes a module defines (not those it imports): roots for code that libraries dispatch to by
    registry (Zarr's codecs)."""
    return [value for _, value in sorted(vars(module).items())
            if inspect.isclass(value) and value.__module__ == module.__name__]


# ---------------------------------------------------------------------------------------------------------
# What changed


def _is_digest(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{12,64}", value) is not None


def _shown(value, width: int = 40) -> str:
    if value is _MISSING:
        return "(none)"
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _changes(old: dict, new: dict, prefix: str):
    for key in sorted(set(old) | set(new), key=str):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before == after:
            continue
        path = str(key) if not prefix else f"{prefix} {key}" if "." in str(key) else f"{prefix}.{key}"
        if isinstance(before, dict) and isinstance(after, dict):
            yield from _changes(before, after, path)
        elif (before is _MISSING or after is _MISSING) and (isinstance(before, dict) or isinstance(after, dict)
                                                            or _is_digest(before) or _is_digest(after)):
            yield f"{path} {'added' if before is _MISSING else 'removed'}"
        elif _is_digest(before) and _is_digest(after):
            yield f"{path} changed"
        else:
            yield f"{path}: {_shown(before)} -> {_shown(after)}"


def differences(old: dict, new: dict, limit: int = 4) -> list[str]:
    """What differs between two stores' determinants, one item per differing key, nested dicts descended
    into: "ensemble: 8 -> 4", "model_identity changed", "code pipeline.cache.extract._Images.maps changed",
    "versions.torch: '2.13.0' -> '2.14.0'", "code pipeline.x.f added". Digests are named, not shown; long
    values are shortened. At most `limit` items, then "and N more" when there are more."""
    found = list(_changes(old, new, ""))
    if len(found) > limit:
        return found[:limit] + [f"and {len(found) - limit} more"]
    return found
