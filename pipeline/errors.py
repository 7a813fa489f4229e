"""Expected faults: bad input, bad parameters, stores built with other settings.

Each is reported as one line naming the file, the field and the reason; the CLI prints it
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path


class PipelineError(Exception):
    """An expected fault the user can fix: one line, `file: field: reason`."""

    def __init__(self, where: str | Path | None, field: str | None, reason: str):
        self.where = str(where) if where is not None else None
        self.field = field
        self.reason = reason
        super().__init__(": ".join(p for p in (self.where, self.field, reason) if p))

    def __reduce__(self):
        # Exceptions pickle as cls(*args); ours takes three arguments, and dask ships errors
        # from workers back to the driver by pickling them.
        return PipelineError, (self.where, self.field, self.reason)


def size_text(width: int, height: int) -> str:
    """An image or canvas size as every message writes it: width first, as SPair's `imsize`, PIL and DAVIS do.
    Arrays and feature grids are (rows, columns), height first; a message never prints their shapes for a size."""
    return f"{width} x {height} (W x H)"


# zarr's crc32c codec (pipeline/cache/codecs.py, CHECKSUM) refuses a damaged chunk with this ValueError.
CHECKSUM_MISMATCH = "Stored and computed checksum do not match"


def as_expected(exc: BaseException) -> PipelineError | None:
    """`exc` as an expected fault, or None for a bug: a PipelineError, or a damaged chunk refused on read
    where no reader named it (StoreMaps names the chunk; a latents store read by extraction, a store's
    per-image table or overflow counts do not)."""
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, ValueError) and str(exc).startswith(CHECKSUM_MISMATCH):
        return PipelineError(None, "checksum", "a chunk read here is damaged (its crc32c does not match); "
                                               "`cli.py verify --store <store>` names it")
    return None


def report_skipped(where: str | Path, skipped: list[tuple[str, str]]) -> None:
    """List what `on_error: skip` left out, one line each, in the stage's output."""
    if skipped:
        print(f"{where}: skipped {len(skipped)} item(s) (on_error: skip):", file=sys.stderr)
        for _, message in skipped:
            print(f"  skipped: {message}", file=sys.stderr)
