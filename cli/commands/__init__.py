"""One module per command; importing them registers them on the `surgery` group."""

from . import extract_cmd, inspect_cmd  # noqa: F401
