"""The ``edgevit`` command line (typer + rich).

Errors caused by input (unknown model or target, bad size, unwritable directory, missing backend
package) print one line on stderr and exit with 2; a failed parity check exits with 1.

This package holds the typer ``app``, :func:`main` and what every command shares (consoles, the
one-line error); each command group lives in its own module with its renderer beside it:
:mod:`.listing` (models, targets, passes, devices), :mod:`.export`, :mod:`.inspect`, :mod:`.bench`,
:mod:`.check`, :mod:`.sweep`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

import edgevit
from edgevit.export.isolated import Terminated, install_sigterm_handler

app = typer.Typer(
    name="edgevit",
    help="Export vision transformers to ONNX, Core ML, TFLite and OpenVINO, and prove each artifact right.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Rich falls back to 80 columns when not on a terminal (CI logs); the parity table needs more.
out_console = Console(width=None if sys.stdout.isatty() else 132)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 132)

MODEL_HELP = ("Zoo model name (see 'edgevit models'), a saved Hugging Face folder (config.json + weights), "
              "or package.module:factory (a callable returning an nn.Module; needs --input-shape).")
INPUT_SHAPE_HELP = "Input shape of a folder or module:factory, e.g. 1,3,224,224 [default: a folder's config]."
REMOTE_HELP = ("Measure on another machine: ssh:[user@]host, ssh://[user@]host[:port], adb:SERIAL or a name "
               "from the devices file; comma-separated for several.")


def fail(message: str, code: int = 2) -> None:
    """One line on stderr (``error: ...``) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``--input-shape`` as a tuple (None when not given); a malformed shape is a one-line error."""
    from edgevit.references import parse_input_shape

    return parse_input_shape(text) if text else None


def _version_callback(value: bool) -> None:
    if value:
        out_console.print(f"edgevit {edgevit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    """edgevit: efficient ViTs from PyTorch to edge runtimes, with conversion parity."""


# The commands, in the order 'edgevit --help' lists them (the modules import the helpers above).
from edgevit.cli import bench, check, export, inspect, listing, sweep  # noqa: E402

app.command("models")(listing.models_cmd)
app.command("targets")(listing.targets_cmd)
app.command("passes")(listing.passes_cmd)
app.command("export")(export.export_cmd)
app.command("inspect")(inspect.inspect_cmd)
app.command("devices")(listing.devices_cmd)
app.command("bench")(bench.bench_cmd)
app.command("check")(check.check_cmd)
app.command("sweep")(sweep.sweep_cmd)



def _quiet_third_party() -> None:
    """Keep converters' chatter (C++ logs, tqdm bars, deprecation warnings) out of the user's terminal."""
    # transformers (Hugging Face folders) logs weight-loading notes and bars, and never goes online here
    for var, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("GLOG_minloglevel", "2"), ("TQDM_DISABLE", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("HF_HUB_OFFLINE", "1"),
                       # `import torch` resets the torch logger to WARNING: only its env var keeps it at ERROR
                       # (torchao, imported by transformers, logs pytree deprecations through it)
                       ("TORCH_LOGS", "-all")):
        os.environ.setdefault(var, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for logger in ("torch", "torchao", "transformers"):  # torchao: optional kernels it cannot load, at import
        logging.getLogger(logger).setLevel(logging.ERROR)


def main() -> None:
    """Run the CLI; usage errors (unknown option, missing or bad argument) are one line on stderr, exit 2."""
    try:  # typer >= 0.2x vendors its own click (and its own Abort); older ones use click itself
        from typer import Abort
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exceptions
        from click.exceptions import Abort

    _quiet_third_party()
    install_sigterm_handler()  # SIGTERM unwinds like Ctrl-C: children stopped, staging folders removed
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:  # bare 'edgevit': typer printed the help, as before
        code = exc.exit_code
    except click_exceptions.ClickException as exc:
        where = getattr(getattr(exc, "ctx", None), "command_path", None)
        hint = f" (see '{where} --help')" if isinstance(exc, click_exceptions.UsageError) and where else ""
        message = " ".join(exc.format_message().split())
        sys.stderr.write(f"error: {message}{hint}\n")
        code = 2 if isinstance(exc, click_exceptions.UsageError) else exc.exit_code
    except Abort:  # Ctrl-C at a prompt, or end of input: reported below
        code = 130
    except Terminated as exc:  # SIGTERM: children stopped and staging folders removed on the way here
        sys.stderr.write("error: terminated\n")
        code = exc.code
    if code == 130:  # typer's answer to Ctrl-C (no command exits with 130 itself)
        sys.stderr.write("error: interrupted\n")
    sys.exit(code if isinstance(code, int) else 0)
