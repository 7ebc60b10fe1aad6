"""User-facing errors: each names the file, the field and the fix.

The CLI turns an :class:`ElasticExportError` into one line on stderr and exit code 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class ElasticExportError(Exception):
    """Bad input that the user can fix. ``str(err)`` is the one-line message."""

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None,
                 fix: str | None = None):
        self.path = None if path is None else str(path)
        self.field = field
        self.fix = fix
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        if field:
            parts.append(f"field '{field}':")
        parts.append(message)
        if fix:
            parts.append(f"({fix})")
        super().__init__(" ".join(parts))


class ConfigError(ElasticExportError):
    """A config.json, recipe or manifest field is missing or invalid."""


class CheckpointError(ElasticExportError):
    """A weight file is missing, truncated, of the wrong shape or fails its checksum."""


class BudgetError(ElasticExportError):
    """A budget or subnet that the parent cannot satisfy."""
