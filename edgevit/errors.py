"""User-facing errors: each one becomes a single line on stderr and exit code 2 in the CLI."""

from __future__ import annotations

from typing import Any


class EdgevitError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 2


class MissingBackendError(EdgevitError):
    """A target's Python package is not installed; the message names the extra to install."""

    def __init__(self, target: str, package: str, extra: str) -> None:
        super().__init__(
            f"target '{target}' needs the Python package '{package}': pip install 'edgevit[{extra}]'"
        )


class ParityError(EdgevitError):
    """The exported artifact disagrees with PyTorch beyond the precision's tolerance.

    ``result`` is the :class:`edgevit.api.ExportResult`: the artifact and its manifest (marked failed)
    were written, for inspection.
    """

    exit_code = 1

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result
