"""Rules several commands' options share: module selection, where the math runs, tuples.

Torch-free like the rest of surgery.options.
"""

from __future__ import annotations

from typing import Any

from surgery.options.base import Options, device_name, positive_int, regexes, require

#: what --device accepts besides cpu / cuda / cuda:N
DEVICE_EXTRA = ("auto",)


#: what torch.Generator.manual_seed accepts
SEED_RANGE = (-(2**63), 2**64)


def freeze(obj: Options, *names: str, one: tuple[str, ...] = ("include", "exclude")) -> None:
    """Store list/generator values of these fields as tuples (a frozen object holds tuples).

    Called from an options object's __post_init__, before validation. A plain string in a
    field named in `one` (a single pattern) becomes a 1-tuple; elsewhere it is left alone so
    that the rule can name it.

    Example:
        >>> freeze(opts, "include", "exclude")   # ["attn"] -> ("attn",), "attn" -> ("attn",)
    """
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, str) and name in one:
            object.__setattr__(obj, name, (value,))
        elif value is not None and not isinstance(value, (str, bytes, tuple)) and hasattr(value, "__iter__"):
            object.__setattr__(obj, name, tuple(value))


def selection_rules(include: Any, exclude: Any) -> None:
    """include / exclude: tuples of valid regular expressions (matched with re.search on module names)."""
    for field, value in (("include", include), ("exclude", exclude)):
        require(isinstance(value, tuple), field, f"must be a list of regular expressions, got {value!r}")
        regexes(value, field)


def compute_rules(device: Any, threads: Any) -> None:
    """device: auto | cpu | cuda | cuda:N (availability is checked when used); threads: None or >= 1."""
    device_name(device, "device", extra=DEVICE_EXTRA)
    positive_int(threads, "threads", allow_none=True)


def seed_rule(value: Any, field: str = "seed") -> None:
    """An int (not a bool) that torch.Generator.manual_seed accepts."""
    require(isinstance(value, int) and not isinstance(value, bool) and SEED_RANGE[0] <= value < SEED_RANGE[1],
            field, f"must be an integer, got {value!r}")


def flag(value: Any, field: str) -> None:
    """True or False."""
    require(isinstance(value, bool), field, f"must be true or false, got {value!r}")


def shard_size_rule(value: Any, field: str = "shard_size", allow_none: bool = True) -> None:
    """A byte count >= 1 or a size string ('5GB', '500MiB': parsed where it is used)."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        require(bool(value.strip()), field, "must be a size such as '5GB' or '500MB', got ''")
        return
    positive_int(value, field)
