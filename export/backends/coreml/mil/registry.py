"""The op table of the MIL reference executor: MIL op type -> numpy implementation.

Each implementation is registered with :func:`mil_op` (the timm / coremltools habit: a decorator fills
the table, the executor only looks names up). An implementation takes the op's MIL inputs as keyword
arguments, named exactly as in the coremltools op definition, with that definition's defaults as
Python defaults, and returns one array or a tuple of arrays (one per MIL output).
"""

from __future__ import annotations

from typing import Any, Callable

from edgevit.errors import EdgevitError

OpFn = Callable[..., Any]

#: MIL op type -> implementation. Filled by the ``ops_*`` modules when
#: :mod:`edgevit.export.backends.coreml.mil` loads.
OPS: dict[str, OpFn] = {}


class UnsupportedOpError(EdgevitError):
    """The program uses a MIL op the reference executor does not implement."""


def mil_op(*names: str) -> Callable[[OpFn], OpFn]:
    """Register ``fn`` as the implementation of the MIL op types ``names``."""

    def register(fn: OpFn) -> OpFn:
        for name in names:
            if name in OPS:
                raise ValueError(f"MIL op '{name}' registered twice")
            OPS[name] = fn
        return fn

    return register
