"""Thin DVC stage entry points: read params.yaml, call `pipeline/`. Run as `python -m stages.<name>`."""

import sys

from pipeline.errors import PipelineError


def run(main, *args) -> None:
    """Run a stage's `main`: an expected fault prints one line `error: file: field: reason` and exits 2,
    as the CLI does, instead of a traceback."""
    try:
        main(*args)
    except PipelineError as exc:
        for line in str(exc).splitlines():  # a parameters file reports all its problems, one line each
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
