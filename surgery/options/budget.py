"""Parameter budgets ('2e6', '150000', '1%'), parsed without torch.

A budget is what the user typed; options objects check its syntax before any heavy import,
and the operation resolves a percentage once it knows the model's size.
`surgery.core.lowrank` re-exports `parse_budget`.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any

from surgery.errors import OptionError

__all__ = ["as_int", "parse_budget"]


def as_int(value: Any, what: str) -> int:
    """An integer (anything with __index__, never a bool), else OptionError naming `what`.

    Example:
        >>> as_int(3, "rank")
        3
    """
    if isinstance(value, bool):
        raise OptionError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise OptionError(f"{what} must be an integer, got {value!r}") from None


_NUMBER = re.compile(r"^[0-9][0-9_]*(\.[0-9_]*)?([eE][+-]?[0-9]+)?$")


def parse_budget(text, model_params: int | None = None) -> int:
    """A parameter budget: "150000", "1e6", "1_000_000" or "2%" of model_params.

    Counts must be whole non-negative numbers; percentages must be in (0, 100] and
    are rounded down. Raises OptionError naming the bad string.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise OptionError(f"budget must be >= 0 parameters, got {text}")
        return text
    if not isinstance(text, str):
        raise OptionError(f"budget must be a string like '2%' or '1e6', got {text!r}")
    s = text.strip()
    if s.endswith("%"):
        num = s[:-1].strip()
        if not _NUMBER.match(num):
            raise OptionError(f"bad budget {text!r}; use a percentage like '2%' or a count like '1e6'")
        pct = float(num)
        if not 0.0 < pct <= 100.0:
            raise OptionError(f"budget percentage must be in (0, 100], got {text!r}")
        if model_params is None or as_int(model_params, "model_params") <= 0:
            raise OptionError(f"budget {text!r} is a percentage but the model parameter count is unknown")
        return int(math.floor(model_params * pct / 100.0))
    if not _NUMBER.match(s):
        raise OptionError(f"bad budget {text!r}; use a count like '150000' / '1e6' or a percentage like '2%'")
    if re.fullmatch(r"[0-9][0-9_]*", s):
        return int(s)  # exact for large counts (float would round)
    value = float(s)
    if not math.isfinite(value) or value != math.floor(value):
        raise OptionError(f"budget {text!r} is not a whole number of parameters")
    return int(value)
