"""One frozen options object per command, validated once, torch-free (the CLI builds them
before any heavy import). See base.py for the shared rules."""

from surgery.options.base import DEVICE_CHOICES, DTYPE_CHOICES, Options

__all__ = ["Options", "DTYPE_CHOICES", "DEVICE_CHOICES"]
