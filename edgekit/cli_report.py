"""`edgekit report PACKAGE [--out FILE]`: (re)write a package's report.html from its manifest.json,
e.g. for packages built before edgekit wrote one, or after `edgekit profile` added device figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgekit.console import emit, out


def add_parsers(sub: Any, model_args: Any) -> None:
    p = sub.add_parser("report", help="write a package's report.html from its manifest.json")
    p.add_argument("package", metavar="PACKAGE", help="a package folder (with manifest.json)")
    p.add_argument("--out", help="where to write the page (default PACKAGE/report.html)")


def cmd_report(args: argparse.Namespace) -> int:
    from edgekit.comparison import load_package
    from edgekit.report_html import render_html

    package = Path(args.package)
    manifest = load_package(package).manifest  # BadInput when it is not a package
    target = Path(args.out) if args.out else package / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(manifest, package), encoding="utf-8")
    out.print(f"wrote {target}", markup=False)
    emit({"ok": True, "path": str(target)})
    return 0


VERBS = {"report": cmd_report}
