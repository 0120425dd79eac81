"""The `edgekit` command: the top parser, the verbs found in this package, dispatch, errors and exit codes.

A verb is one module in edgekit/cli/ that defines VERB (its name), ORDER (its place in `edgekit --help`),
add_parser(sub) and run(args) -> exit code; modules without VERB (main, args, options, helpers) are not
verbs. Adding a verb is adding such a module. Every verb takes `--json`.
Exit codes: 0 ok, 1 verification or budget failed, 2 bad input, 3 a tool failed."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import NoReturn

from edgekit.cli.args import add_json_flag
from edgekit.console import emit, emitted, err, is_json, json_mode
from edgekit.errors import EXIT_BAD_INPUT, EXIT_TOOL, EdgekitError
from edgekit.version import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not a usage dump
        self.exit(EXIT_BAD_INPUT, f"edgekit: error: {message} (see '{self.prog} --help')\n")


def verb_modules() -> list[ModuleType]:
    """Every module of edgekit.cli that defines VERB, in ORDER (the order of `edgekit --help`)."""
    package = importlib.import_module("edgekit.cli")
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name == "main":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        verb = getattr(module, "VERB", None)
        if verb is None:
            continue
        if verb in found:
            raise RuntimeError(f"verb {verb} is defined by {found[verb].__name__} and {module.__name__}")
        found[verb] = module
    return sorted(found.values(), key=lambda m: (m.ORDER, m.VERB))


def _parser(modules: list[ModuleType]) -> argparse.ArgumentParser:
    p = _Parser(prog="edgekit", description="Trained model in, verified and measured device package out.")
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    for module in modules:
        module.add_parser(sub)
    add_json_flag(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    modules = verb_modules()
    args = _parser(modules).parse_args(argv)
    if getattr(args, "json", False):
        json_mode()
    from edgekit.workspace import cli_run

    verbs = {m.VERB: m.run for m in modules}
    with cli_run():  # SIGTERM unwinds like Ctrl-C; a private TMPDIR; leftovers of killed runs swept
        code, message = _run(verbs[args.verb], args)
    if is_json() and not emitted():  # errors (and verbs with nothing more to say) still answer in JSON
        emit({"ok": code == 0, "exit_code": code, **({"error": message} if message else {})})
    if code > 128:  # stopped by a signal, everything cleaned: leave now, before runtimes' static
        sys.stdout.flush()  # destructors run on half-unwound state (ncnn's allocator aborts then)
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        return command(args), None
    except EdgekitError as e:
        err.print(f"edgekit: error: {e}", markup=False, soft_wrap=True)
        return e.exit_code, str(e)
    except KeyboardInterrupt as e:
        from edgekit.workspace import Terminated

        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        why = f"stopped by {signal.Signals(signum).name}"
        err.print(f"edgekit: {why}; nothing was written")
        return 128 + signum, why
    except Exception as e:  # an internal error still gets one line; -v shows where
        if args.verbose or os.environ.get("EDGEKIT_DEBUG"):
            traceback.print_exc()
        message = f"internal error: {type(e).__name__}: {e}"
        err.print(f"edgekit: {message} (rerun with -v for the traceback)", markup=False, soft_wrap=True)
        return EXIT_TOOL, message


if __name__ == "__main__":
    sys.exit(main())
