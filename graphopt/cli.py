"""The `graphopt` command line. Each command lives in its own module under ``graphopt.commands``.

User mistakes (bad paths, unsupported models, failed validation) print one line and exit with 2.
"""

from __future__ import annotations

import logging
import os
import warnings

import click

from graphopt import __version__
from graphopt.errors import GraphoptError


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class GraphoptGroup(click.Group):
    """Turns a GraphoptError anywhere below into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GraphoptError as error:
            raise UserError(str(error)) from None


@click.group(cls=GraphoptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graphopt")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def main(verbose: bool) -> None:
    """Shrink and speed up transformer language models at the ONNX graph level."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        quiet_libraries()


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


def progress(message: str) -> None:
    """A progress line on stderr (stdout stays clean for --json)."""
    click.echo(f"graphopt: {message}", err=True)


def _register() -> None:
    from graphopt.commands import convert, distill, draft, export, fetch, fuse, generate, inspect, optimize, prune, quantize
    from graphopt.commands import eval as evaluate

    for module in (fetch, export, fuse, generate, inspect, draft, quantize, prune, distill, evaluate, convert, optimize):
        main.add_command(module.command)


_register()
