"""Expected faults: bad input, bad parameters, stores built with other settings.

Each is reported as one line naming the file, the field and the reason; the CLI prints it
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """An expected fault the user can fix: one line, `file: field: reason`."""

    def __init__(self, where: str | Path | None, field: str | None, reason: str):
        self.where = str(where) if where is not None else None
        self.field = field
        self.reason = reason
        super().__init__(": ".join(p for p in (self.where, self.field, reason) if p))
