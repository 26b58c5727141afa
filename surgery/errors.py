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
    """An option value is invalid (rank too large, bad regex, bad size string...)."""


class OutputError(SurgeryError):
    """The output location is unusable (exists, read-only, inside an input...)."""


class ValidationError(SurgeryError):
    """A numeric check failed (ONNX outputs differ, non-finite merged weights...)."""
