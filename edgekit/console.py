"""One rich console for the whole tool: progress on stderr, tables on stdout.

With `--json` a command prints exactly one JSON document on stdout and nothing else: `json_mode()`
silences the tables and notes, and `emit()` writes the document.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgekit.jsonable import jsonable as _jsonable

# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
_width = None if sys.stdout.isatty() else 160
out = Console(highlight=False, width=_width)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
_json = False
_real_stdout: int | None = None
_emitted = False


def json_mode() -> None:
    """Machine-readable output only: tables, notes and progress bars go nowhere, and whatever a
    library prints on stdout (NNCF's bars, pnnx's log, C++ code included) is sent to stderr, so stdout
    carries nothing but the one JSON document."""
    global _json, _real_stdout
    _json = True
    out.file = io.StringIO()
    err.file = io.StringIO()
    sys.stdout.flush()
    _real_stdout = os.dup(1)
    os.dup2(2, 1)


def is_json() -> bool:
    return _json


def emit(payload: Any) -> None:
    """The command's result as one JSON document on the real stdout (only in JSON mode)."""
    global _emitted
    if _json and _real_stdout is not None:
        sys.stdout.flush()
        data = (json.dumps(payload, indent=2, default=_jsonable) + "\n").encode()
        while data:
            data = data[os.write(_real_stdout, data):]
        _emitted = True


def emitted() -> bool:
    return _emitted




def progress() -> Progress:
    """A progress bar on stderr; it disappears when done so logs stay readable."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=_json or not sys.stderr.isatty(),
    )


def note(message: str) -> None:
    """One line however long (soft_wrap): a note in a log stays greppable as one line."""
    err.print(f"[dim]·[/dim] {message}", soft_wrap=True)
