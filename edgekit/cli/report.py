"""`edgekit report PACKAGE [--out FILE]`: (re)write a package's report.html from its manifest.json,
e.g. for packages built before edgekit wrote one, or after `edgekit profile` added device figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgekit.console import emit, out
from edgekit.errors import BadInput

VERB = "report"
ORDER = 110


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a package's report.html from its manifest.json")
    p.add_argument("package", metavar="PACKAGE", help="a package folder (with manifest.json)")
    p.add_argument("--out", help="where to write the page (default PACKAGE/report.html)")


def run(args: argparse.Namespace) -> int:
    from edgekit.packaging.manifest import schema_problem
    from edgekit.packaging.model import load_package
    from edgekit.packaging.report_html import render_html

    package = Path(args.package)
    manifest = load_package(package).manifest  # BadInput when it is not a package
    # load_package refuses wrong types but not missing fields (older packages still compare); the page
    # needs every field the schema requires.
    where = package / "manifest.json"
    problem = schema_problem(manifest, missing_only=True)
    if problem:
        raise _refuse(where, problem)
    target = Path(args.out) if args.out else package / "report.html"
    try:
        page = render_html(manifest, package)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:  # a field of the wrong type
        raise _refuse(where, schema_problem(manifest) or f"{type(e).__name__}: {e}") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as e:
        raise BadInput(f"cannot write the report to {target}: {e.strerror or e}; choose a writable --out") from None
    out.print(f"wrote {target}", markup=False)
    emit({"ok": True, "path": str(target)})
    return 0


def _refuse(where: Path, problem: str) -> BadInput:
    return BadInput(f"{where} does not match the manifest schema ({problem}): the package is damaged or was not "
                    "written by edgekit; rebuild it with `edgekit build`")

