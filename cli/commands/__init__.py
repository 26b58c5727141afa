"""One module per command; importing them registers them on the `surgery` group."""

from . import inspect_cmd  # noqa: F401
