"""User regexes, refused when they could hang the tool (ReDoS).

Include/exclude patterns, `modules=` and an adapter's target_modules are matched with
`re.search` against module names taken from checkpoints, which a hostile file can make
long. Python's backtracking engine takes exponential time on a few pattern shapes
(`(a+)+`, `([a-z_.0-9]*)*X`, `(a|a)*`), so those are refused before they are compiled,
with the fix in the message. The check reads the parse tree (`re._parser`):

- a repeat that may run many times (`*`, `+`, `{m,n}` with n >= WIDE) around another such
  repeat (star height > 1);
- such a repeat around something that can match the empty string (`(a?)*`);
- such a repeat around a choice whose alternatives can start with the same character or
  can both be empty (`(a|a)*`, `(ab|a)+`), or around a variable-length item whose characters
  can also start what follows it (`(a?a)*`).

It is a heuristic: it refuses the classic catastrophic shapes, not every slow pattern.
Torch-free (options use it); `surgery.io.guards` re-exports `check_regex`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any

from surgery.errors import OptionError, SurgeryError

#: longest pattern accepted (a module filter is a few dozen characters)
MAX_REGEX_CHARS = 1000
#: a repeat whose upper bound reaches this counts as unbounded
WIDE = 16
#: characters probed when deciding whether two character classes overlap
_PROBE = range(256)

try:  # the regex parser: re._parser since Python 3.11, sre_parse before (deprecated since)
    _sre: Any = importlib.import_module("re._parser")
    _c: Any = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover - Python 3.10
    _sre = importlib.import_module("sre_parse")
    _c = importlib.import_module("sre_constants")

_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}
_ZERO_WIDTH = {_c.AT, _c.ASSERT, _c.ASSERT_NOT}
_ANY_CHAR = frozenset(c for c in _PROBE if c != 10)
_CATEGORIES = {
    _c.CATEGORY_DIGIT: str.isdigit, _c.CATEGORY_NOT_DIGIT: lambda s: not s.isdigit(),
    _c.CATEGORY_SPACE: str.isspace, _c.CATEGORY_NOT_SPACE: lambda s: not s.isspace(),
    _c.CATEGORY_WORD: lambda s: s.isalnum() or s == "_", _c.CATEGORY_NOT_WORD: lambda s: not (s.isalnum() or s == "_"),
}


class _Unsafe(Exception):
    """Why a pattern is refused (turned into the caller's error)."""


# ----------------------------------------------------------------------------- character sets


def _in_set(items: Sequence[tuple[Any, Any]]) -> frozenset[int]:
    """The probe characters (and literal code points) an IN [...] class matches."""
    negate = any(op is _c.NEGATE for op, _ in items)
    hit: set[int] = set()
    for op, av in items:
        if op is _c.LITERAL:
            hit.add(av)
        elif op is _c.RANGE:
            lo, hi = av
            hit.update(range(lo, min(hi, 255) + 1))
        elif op is _c.CATEGORY:
            test = _CATEGORIES.get(av)
            hit.update(c for c in _PROBE if test is None or test(chr(c)))
    return frozenset(c for c in _PROBE if c not in hit) if negate else frozenset(hit)


def _item_chars(op: Any, av: Any) -> frozenset[int] | None:
    """The characters one single-character item matches, or None when it is not one."""
    if op is _c.LITERAL:
        return frozenset({av})
    if op is _c.NOT_LITERAL:
        return frozenset(c for c in _PROBE if c != av)
    if op is _c.ANY:
        return _ANY_CHAR
    if op is _c.IN:
        return _in_set(av)
    return None


def _first(seq: Sequence[tuple[Any, Any]]) -> tuple[frozenset[int], bool]:
    """(characters a match of SEQ can start with, whether SEQ can match the empty string)."""
    chars: set[int] = set()
    for op, av in seq:
        one = _item_chars(op, av)
        if one is not None:
            return frozenset(chars | one), False
        if op in _ZERO_WIDTH:
            continue
        if op is _c.SUBPATTERN:
            sub, empty = _first(av[-1])
        elif op is _c.BRANCH:
            firsts = [_first(alt) for alt in av[1]]
            sub, empty = frozenset().union(*(f for f, _ in firsts)), any(e for _, e in firsts)
        elif op in _REPEATS:
            sub, empty = _first(av[2])
            empty = empty or av[0] == 0
        else:  # group references, conditionals, atomic groups: assume anything
            sub, empty = _ANY_CHAR, True
        chars |= sub
        if not empty:
            return frozenset(chars), False
    return frozenset(chars), True


def _all_chars(seq: Sequence[tuple[Any, Any]]) -> frozenset[int]:
    """Every character some match of SEQ can contain."""
    chars: set[int] = set()
    for op, av in seq:
        one = _item_chars(op, av)
        if one is not None:
            chars |= one
        elif op is _c.SUBPATTERN:
            chars |= _all_chars(av[-1])
        elif op is _c.BRANCH:
            for alt in av[1]:
                chars |= _all_chars(alt)
        elif op in _REPEATS:
            chars |= _all_chars(av[2])
        elif op not in _ZERO_WIDTH:
            chars |= _ANY_CHAR
    return frozenset(chars)


# ----------------------------------------------------------------------------- the shapes refused


def _wide(av: Any) -> bool:
    return av[1] == _c.MAXREPEAT or av[1] >= WIDE


def _follow(items: Sequence[tuple[Any, Any]], i: int, wrap: frozenset[int]) -> frozenset[int]:
    """What can come right after items[i]: the start of the rest, and WRAP when the rest can be empty."""
    follow, empty = _first(items[i + 1:])
    return follow | wrap if empty else follow


def _check_choice(alternatives: Sequence[Any], follow: frozenset[int]) -> None:
    """Inside a wide repeat: a choice whose alternatives can match the same text."""
    firsts = [_first(alt) for alt in alternatives]
    if sum(empty for _, empty in firsts) > 1:
        raise _Unsafe("a repeated choice with two alternatives that match the same empty text")
    starts = [chars | follow if empty else chars for chars, empty in firsts]
    for i, a in enumerate(starts):
        if any(a & b for b in starts[i + 1:]):
            raise _Unsafe("a repeated choice whose alternatives can match the same text")


def _check_sequence(seq: Sequence[tuple[Any, Any]], wrap: frozenset[int]) -> None:
    """Inside a wide repeat: a choice whose alternatives overlap, or a variable-length item
    whose characters can also start what follows it (the next items, or after the end of SEQ
    the characters WRAP: the next round of the repeat)."""
    items = [(op, av) for op, av in seq if op not in _ZERO_WIDTH]
    for i, (op, av) in enumerate(items):
        follow = _follow(items, i, wrap)
        if op is _c.SUBPATTERN:
            _check_sequence(av[-1], follow)
        elif op is _c.BRANCH:
            _check_choice(av[1], follow)
            for alt in av[1]:
                _check_sequence(alt, follow)
        elif op in _REPEATS:
            if av[0] != av[1] and _all_chars(av[2]) & follow:
                raise _Unsafe("a repeated group holding an optional or repeated part that can also match "
                              "the text after it")
            _check_sequence(av[2], follow | _first(av[2])[0])


def _check_repeat(av: Any) -> None:
    """The rules for one wide repeat's body."""
    body = av[2]
    if _has_wide_repeat(body):
        raise _Unsafe("a repeat inside a repeat (nested quantifiers such as (a+)+)")
    first, empty = _first(body)
    if empty:
        raise _Unsafe("a repeat of something that can match the empty text")
    _check_sequence(body, first)


def _has_wide_repeat(seq: Sequence[tuple[Any, Any]]) -> bool:
    for op, av in seq:
        if op in _REPEATS and _wide(av):
            return True
        if op is _c.SUBPATTERN and _has_wide_repeat(av[-1]):
            return True
        if op is _c.BRANCH and any(_has_wide_repeat(alt) for alt in av[1]):
            return True
        if op in (_c.ASSERT, _c.ASSERT_NOT) and _has_wide_repeat(av[1]):
            return True
    return False


def _walk(seq: Sequence[tuple[Any, Any]]) -> None:
    """Apply the rules to every wide repeat of the tree."""
    for op, av in seq:
        if op in _REPEATS:
            if _wide(av):
                _check_repeat(av)
            _walk(av[2])
        elif op is _c.SUBPATTERN:
            _walk(av[-1])
        elif op is _c.BRANCH:
            for alt in av[1]:
                _walk(alt)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            _walk(av[1])
        elif op is _c.GROUPREF_EXISTS:
            for part in av[1:]:
                if part is not None:
                    _walk(part)


def _shown(pattern: str, limit: int = 80) -> str:
    """The pattern as repr() writes it (one line, control characters escaped), cut at LIMIT."""
    return repr(pattern[:limit]) + ("…" if len(pattern) > limit else "")


def check_regex(pattern: object, what: str, *, error: type[SurgeryError] = OptionError,
                max_length: int = MAX_REGEX_CHARS) -> re.Pattern[str]:
    """Compile a user's regular expression, refusing one that could backtrack for ever.

    Args:
        pattern: the pattern text (anything else is refused).
        what: how the message names it, e.g. "include" or "adapter_config.json target_modules".
        error: the SurgeryError subclass to raise (OptionError; AdapterError for an adapter's
            config). Callers that know an options field re-raise OptionError with it.
        max_length: longer patterns are refused unparsed.

    Returns:
        The compiled pattern.

    Raises:
        error: one line naming the pattern (as repr() shows it, cut at 80 characters), what is wrong,
        and the fix: not a string, too long, invalid, or a catastrophic-backtracking shape
        (nested quantifiers, a repeated choice with overlapping alternatives, ...).

    Example:
        >>> check_regex(r"layers\\.\\d+\\.mlp", "include").search("model.layers.3.mlp") is not None
        True
        >>> check_regex("(a+)+", "include")
        Traceback (most recent call last):
        surgery.errors.OptionError: include: '(a+)+' has a repeat inside a repeat (nested quantifiers ...
    """
    if not isinstance(pattern, str):
        raise error(f"{what}: expected a regular expression (text), got {type(pattern).__name__}")
    shown = f"{what}: {_shown(pattern)}"
    if len(pattern) > max_length:
        raise error(f"{shown} has {len(pattern)} characters, over the {max_length}-character limit of a pattern; "
                    "use a shorter one")
    try:
        tree = _sre.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise error(f"{shown} is not a valid regular expression ({' '.join(str(e).split())})") from None
    try:
        _walk(tree)
    except _Unsafe as e:
        raise error(f"{shown} has {e}, which can take exponential time on long names; rewrite it without a "
                    "repeat around an ambiguous part (e.g. '(a+)+' -> 'a+', '(a|a)*' -> 'a*')") from None
    except RecursionError:
        raise error(f"{shown} is nested too deeply; use a simpler pattern") from None
    return compiled


__all__ = ["check_regex", "MAX_REGEX_CHARS", "WIDE"]
