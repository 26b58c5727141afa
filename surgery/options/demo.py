"""Options of `demo` (surgery.ops.pipeline.run_pipeline): extract -> merge -> export on a model pair.

    DemoOptions(rank=8, optimize=True)
    DemoOptions(rank=0)          # OptionError('rank: must be a positive integer, got 0', field='rank')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from surgery.errors import OptionError
from surgery.options.base import Options, positive_int, require


@dataclasses.dataclass(frozen=True)
class DemoOptions(Options):
    """How the demo pipeline runs.

    Attributes:
        rank: LoRA rank of the extracted adapter.
        optimize: also export, and validate, the optimised ONNX graph.

    Raises:
        OptionError: naming the field at fault, when the object is built.
    """

    rank: int = 4
    optimize: bool = False

    def validate(self) -> None:  # noqa: D102 - see Options.validate
        positive_int(self.rank, "rank")
        require(isinstance(self.optimize, bool), "optimize", f"must be True or False, got {self.optimize!r}")

    @classmethod
    def build(cls, options: DemoOptions | None = None, **fields: Any) -> DemoOptions:
        """`options` with `fields` replaced, or DemoOptions(**fields); OptionError for an unknown field.

        Example: DemoOptions.build(None, rank=8) == DemoOptions(rank=8)"""
        unknown = sorted(set(fields) - set(cls.field_names()))
        if unknown:
            raise OptionError(f"{unknown[0]}: not a demo option; the options are {', '.join(cls.field_names())}",
                              field=unknown[0])
        if options is None:
            return cls(**fields)
        return options.replace(**fields) if fields else options
