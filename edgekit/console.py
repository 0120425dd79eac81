"""One rich console for the whole tool: progress on stderr, tables on stdout."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
_width = None if sys.stdout.isatty() else 160
out = Console(highlight=False, width=_width)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def progress() -> Progress:
    """A progress bar on stderr; it disappears when done so logs stay readable."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not sys.stderr.isatty(),
    )


def note(message: str) -> None:
    err.print(f"[dim]·[/dim] {message}")
