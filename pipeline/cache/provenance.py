"""What a store's fingerprint records besides its parameters: the identity of the model (its weight and
config files) and of the code that computed the contents.

Code identity is a digest of the source of the modules that compute a store's values, as parsed
(comments, docstrings and layout do not count) and as live (a function replaced at run time counts
with its own source), so a fix to a backbone's code gives its stores another fingerprint: the stage
rebuilds them, the CLI refuses to resume them. Orchestration (progress, locking, sharding) lives in
other modules and does not count.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from pathlib import Path
from types import ModuleType

# A model folder's identity is its weights, configs and tokenizer files: not READMEs, licences, sample
# images, nor hidden files (huggingface_hub's download records hold timestamps; the model stage's record
# of its source).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".txt")


def model_identity(model: str) -> str:
    """For a local folder, a digest of its weight, config and tokenizer files: names, sizes, first and
    last MiB (cheap on multi-GB checkpoints, yet different for any retrained or re-initialised weights);
    for a hub id, the id itself (a hub revision is a parameter of its own); none ("") for an encoder
    without a model (`pixels`): "" is not the working directory."""
    folder = Path(model)
    if not model or not folder.is_dir():
        return model
    digest = hashlib.sha256()
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    for path in sorted(files):
        digest.update(path.relative_to(folder).as_posix().encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 1 << 20:
                handle.seek(max(size - (1 << 20), 1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _source_digest(source: str) -> str:
    try:
        text = ast.dump(_without_docstrings(ast.parse(textwrap.dedent(source))))
    except SyntaxError:  # a lambda cut out of a longer expression: its text as it is
        text = source.strip()
    return hashlib.sha256(text.encode()).hexdigest()


def _live_functions(module: ModuleType):
    """(qualified name, function) of the module's functions and its classes' methods, as they are now."""
    for name, value in sorted(vars(module).items()):
        if inspect.isfunction(value):
            yield name, value
        elif inspect.isclass(value) and value.__module__ == module.__name__:
            for attribute, member in sorted(vars(value).items()):
                function = getattr(member, "__func__", member)  # staticmethod / classmethod
                if inspect.isfunction(function):
                    yield f"{name}.{attribute}", function


def code_identity(module: ModuleType) -> str:
    """A digest of `module`'s source (parsed) and of every function and method it holds now."""
    digest = hashlib.sha256(_source_digest(inspect.getsource(module)).encode())
    for name, function in _live_functions(module):
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):  # no source file: its bytecode stands for it
            source = repr((function.__code__.co_code, function.__code__.co_consts))
        digest.update(f"{name}:{_source_digest(source)}".encode())
    return digest.hexdigest()[:16]


def code_identities(modules) -> dict[str, str]:
    """{"code:<module>": digest} for the fingerprint: a change names the module that changed."""
    return {f"code:{module.__name__}": code_identity(module) for module in modules}
