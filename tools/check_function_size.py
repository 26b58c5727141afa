"""Fail when a function in the library is longer than the project allows (60 lines).

A function's length runs from its `def` line (decorators excluded) to its last line,
docstring and comments included: what a reader has to take in at once.

    python tools/check_function_size.py                 # surgery/, limit 60
    python tools/check_function_size.py --max 40 PATH   # files or directories

Exit 0 when every function fits, 1 (one line per offender) otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MAX = 60


def long_functions(path: Path, limit: int) -> Iterator[tuple[int, str, int]]:
    """(line, qualified name, length) of every function in `path` longer than `limit` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > limit:
                    yield child.lineno, name[:-1], length
            yield from walk(child, name)

    yield from walk(tree, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["surgery"], help="files or directories (default: surgery)")
    parser.add_argument("--max", type=int, default=DEFAULT_MAX, help=f"longest allowed (default {DEFAULT_MAX})")
    args = parser.parse_args(argv)
    files = sorted(f for p in map(Path, args.paths) for f in ([p] if p.is_file() else p.rglob("*.py")))
    found = [(f, *hit) for f in files for hit in long_functions(f, args.max)]
    for f, line, name, length in found:
        print(f"{f}:{line}: {name} is {length} lines long (max {args.max}); split it into named steps")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
