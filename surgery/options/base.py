"""What every options object shares: frozen dataclasses, validated once, torch-free.

An options object is built from keyword arguments (the CLI passes its parsed flags), checks
every rule in `__post_init__` and raises `OptionError(message, field=...)` naming the field at
fault. Nothing here imports torch, so the CLI can build options before any heavy import.
Rules that need the data (a rank larger than a matrix) stay in the operation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, TypeVar

from surgery.errors import OptionError
from surgery.options.patterns import check_regex

T = TypeVar("T", bound="Options")

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
DEVICE_CHOICES = ("cpu", "cuda")

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
}


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every command's options: frozen, validated in __post_init__, JSON-able."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Check every rule; raise OptionError(field=...) on the first broken one."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls: type[T], options: T | None = None, **fields: Any) -> T:
        """What every library entry point takes: `options` with `fields` replaced, or cls(**fields).

        Raises TypeError when `options` is another command's options object.
        Example: ExtractOptions.build(None, rank=4) == ExtractOptions(rank=4)"""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        if options is None:
            return cls(**fields)
        return options.replace(**fields) if fields else options

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "__fspath__"):
        return str(v)
    return v


# ----------------------------------------------------------------------------- rule helpers
# Each raises OptionError naming the field; messages say what is allowed.


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise OptionError(f"{field}: {message}", field=field)


def positive_int(value: Any, field: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
            f"must be a positive integer, got {value!r}")


def non_negative_int(value: Any, field: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field,
            f"must be an integer >= 0, got {value!r}")


def finite_number(value: Any, field: str, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False, allow_none: bool = False) -> None:
    """A finite real number within [lo, hi] (open ends when asked)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    rng = ""
    if lo is not None or hi is not None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        rng = f" in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    require(ok, field, f"must be a finite number{rng}, got {value!r}")


def one_of(value: Any, choices: tuple[Any, ...], field: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    require(value in choices, field, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def device_name(value: Any, field: str = "device", extra: tuple[str, ...] = ()) -> None:
    """'cpu', 'cuda', 'cuda:N' (availability is checked when the device is used)."""
    ok = isinstance(value, str) and (value in DEVICE_CHOICES + extra or re.fullmatch(r"cuda:\d+", value) is not None)
    require(ok, field, f"must be one of {', '.join(DEVICE_CHOICES + extra)} (or cuda:N), got {value!r}")


def regex(value: Any, field: str, allow_none: bool = True) -> None:
    """A valid regular expression that cannot backtrack for ever (surgery.options.patterns)."""
    if value is None and allow_none:
        return
    try:
        check_regex(value, field)
    except OptionError as e:
        raise OptionError(str(e), field=field) from None


def regexes(values: Any, field: str) -> None:
    for v in values or ():
        regex(v, field, allow_none=False)


def parse_size(text: str | int) -> int:
    """A byte count from an int or a size string: '5GB' -> 5_000_000_000, '500MiB' -> 524_288_000,
    '1000' -> 1000 (decimal units KB/MB/GB/TB, binary KiB/MiB/GiB/TiB, case-insensitive).

    Raises OptionError (no field: callers that know the field re-raise with it) for anything
    else, zero or negative sizes included.

    >>> parse_size("2KiB")
    2048
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise OptionError(
                f"invalid size {text!r}; use a number with an optional unit, e.g. 5GB, 500MB, 2GiB"
            )
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise OptionError(f"invalid size {text!r}; it must be positive")
    return value


def size(value: Any, field: str, allow_none: bool = True) -> int | None:
    """A size rule: None (when allowed), a positive int or a size string; returns the bytes."""
    if value is None and allow_none:
        return None
    try:
        return parse_size(value)
    except OptionError as e:
        raise OptionError(f"{field}: {e}", field=field) from None


def exclusive(field_a: str, a: Any, field_b: str, b: Any) -> None:
    """At most one of two options may be set (conflicting options)."""
    if a not in (None, False, ()) and b not in (None, False, ()):
        raise OptionError(f"{field_a} and {field_b} cannot be used together", field=field_a)
