"""Progress on stderr (rich), so stdout stays clean for results and --json."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console

stderr = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress(description: str, total: int | None):
    """Yield ``advance(n)``; draws a bar on a terminal, stays quiet when stderr is not one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextlib.contextmanager
def step(description: str):
    """One long step without a count (a compile, a calibration): a spinner with the elapsed time on a
    terminal; elsewhere the description once, as a log line."""
    if not sys.stderr.isatty():
        log(f"{description}…")
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=stderr,
                  transient=True) as bar:
        bar.add_task(description, total=None)
        yield
    log(f"[dim]✓ {description}[/]")


def log(message: str) -> None:
    stderr.print(message)


DEBUG_ENV = "EDGERES_DEBUG"  # read by the targets (which cannot import edgeres) to let runtime logs through


def set_debug(on: bool) -> None:
    """``--debug``: the runtimes' own log output (TensorFlow, LiteRT's C++ side) is shown, not held back."""
    import os

    if on:
        os.environ[DEBUG_ENV] = "1"
    else:
        os.environ.pop(DEBUG_ENV, None)
