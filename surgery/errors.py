"""Errors raised by the library for bad input.

Every message says what went wrong, where, and how to fix it, on one line.
The CLI turns a SurgeryError into that line on stderr and exit code 1.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class: bad input or a failed check. Never a bug in surgery."""

    exit_code = 1


class CheckpointError(SurgeryError):
    """A checkpoint is missing, of an unknown format, corrupt, truncated or unsafe."""


class AdapterError(SurgeryError):
    """An adapter directory or config is invalid or does not match its base."""


class OptionError(SurgeryError):
    """An option value is invalid (rank too large, bad regex, bad size string...).

    `field` names the options-object field at fault when there is one (the CLI maps it to
    its flag); errors raised while an options object is built are usage errors (exit 2)."""

    def __init__(self, message: str = "", field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class OutputError(SurgeryError):
    """The output location is unusable (exists, read-only, inside an input...)."""


class ValidationError(SurgeryError):
    """A numeric check failed (ONNX outputs differ, non-finite merged weights...).

    `report` carries the result of the check that failed (e.g. the export's result with its
    validation table) when there is one, so callers need not re-read files."""

    def __init__(self, message: str = "", report: object = None) -> None:
        super().__init__(message)
        self.report = report


class ResourceError(SurgeryError):
    """The work needs more of the machine than it has (memory for a tensor or an SVD);
    refused before the allocation, so nothing was written."""
