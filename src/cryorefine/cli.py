"""The `cryorefine` command: one typer sub-command per program in cryorefine.programs.

Each command only parses flags into the program's config model and calls its
`run(config)`; a `CryorefineError` becomes one red line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from cryorefine import __version__
from cryorefine.errors import CryorefineError

app = typer.Typer(
    name="cryorefine",
    help="Template-based cryo-EM particle finding and refinement (PyTorch, CPU or CUDA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
error_console = Console(stderr=True)
ResultT = TypeVar("ResultT")


def run_guarded(job: Callable[[], ResultT]) -> ResultT:
    """Run a program, turning a user-facing error into one line and exit code 2."""
    try:
        return job()
    except CryorefineError as error:
        error_console.print(f"[bold red]error:[/] {error.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryorefine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Template-based cryo-EM particle finding and refinement."""


def main() -> None:
    app(args=sys.argv[1:], prog_name="cryorefine")
