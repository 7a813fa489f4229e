"""Thin DVC stage entry points: read params.yaml, call `pipeline/`. Run as `python -m stages.<name>`."""

import sys

from pipeline.errors import as_expected


def run(main, *args) -> None:
    """Run a stage's `main`: an expected fault prints one line `error: file: field: reason` and exits 2,
    as the CLI does, instead of a traceback."""
    try:
        main(*args)
    except Exception as caught:
        exc = as_expected(caught)
        if exc is None:
            raise
        for line in str(exc).splitlines():  # a parameters file reports all its problems, one line each
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
