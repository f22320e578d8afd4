"""The `graphopt` command line. Each command lives in its own module under ``graphopt.commands``.

SIGTERM and SIGHUP stop a command the way Ctrl-C does: the exception unwinds through every
temporary directory, so nothing is left half written and an old output stays intact.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings

import click

from graphopt import __version__
from graphopt.errors import GraphoptError


class Terminated(BaseException):
    """A termination signal, raised where the process happens to be so that clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_TERMINATION_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


def _raise_terminated(signum, _frame) -> None:
    # A second signal during clean-up must not interrupt the clean-up itself.
    for number in _TERMINATION_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    raise Terminated(signum)


# `graphopt` alone prints the help (click >= 8.2 signals it with this UsageError subclass).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


# Each command's module under graphopt.commands, imported when the command runs (or --help lists
# them): `graphopt generate` then never imports the graph-rewriting stack (onnx_ir imports onnx,
# whose ml_dtypes extension alone costs 0.6 s of start-up here).
COMMANDS = ("convert", "distill", "draft", "eval", "export", "fetch", "fuse", "generate", "inspect", "optimize", "prune",
            "quantize", "serve", "vocabulary")


class GraphoptGroup(click.Group):
    """One line and exit 2 for a GraphoptError or a bad option anywhere below; 128+N for signal N."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx, name: str) -> click.Command | None:
        return importlib.import_module(f"graphopt.commands.{name}").command if name in COMMANDS else None

    def main(self, *args, **kwargs):
        for number in _TERMINATION_SIGNALS:
            signal.signal(number, _raise_terminated)
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as error:
            click.echo(error.ctx.get_help())
            sys.exit(0)
        except click.UsageError as error:
            command = f"graphopt {error.ctx.info_name} --help" if error.ctx and error.ctx.parent else "graphopt --help"
            UserError(f"{error.format_message()} (see {command})").show()
            sys.exit(2)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.exceptions.Exit as error:
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        except Terminated as error:
            click.echo(f"error: stopped by {error}; no output was left half written", err=True)
            sys.exit(128 + error.signum)
        # Without standalone mode click returns a ctx.exit(N) code instead of exiting.
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GraphoptError as error:
            raise UserError(str(error)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None


class _ProgressHandler(logging.Handler):
    """graphopt's log records as progress lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"graphopt: {record.getMessage()}", err=True)


@click.group(cls=GraphoptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graphopt")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step and library does.")
def main(verbose: bool) -> None:
    """Shrink and speed up transformer language models at the ONNX graph level."""
    show_progress(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:
        quiet_libraries()


def show_progress(level: int = logging.INFO) -> None:
    """Show the ``graphopt`` loggers' records as progress lines on stderr (once per process)."""
    logger = logging.getLogger("graphopt")
    logger.setLevel(level)
    if not any(isinstance(handler, _ProgressHandler) for handler in logger.handlers):
        logger.addHandler(_ProgressHandler())
    logger.propagate = False


def quiet_libraries() -> None:
    """Silence library chatter (torch.onnx registration notes, transformers progress bars)."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # Libraries' UserWarnings (torch.onnx axis renames...) are noise here; graphopt's own, such as
    # an execution provider falling back to CPU, are what the user must see.
    for library in ("torch", "transformers", "onnxscript", "onnx_ir", "copyreg"):
        warnings.filterwarnings("ignore", category=UserWarning, module=library)
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Read by transformers when it is first imported, so commands that never load it pay nothing.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

