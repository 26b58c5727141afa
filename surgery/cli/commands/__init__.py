"""One module per command; importing them registers them on the `surgery` group."""

from . import demo_cmd, export_cmd, extract_cmd, inspect_cmd  # noqa: F401
from . import merge_cmd  # noqa: F401
from . import analyze_cmd, factorize_cmd, init_cmd  # noqa: F401
from . import refine_cmd  # noqa: F401
