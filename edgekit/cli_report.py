"""`edgekit report PACKAGE [--out FILE]`: (re)write a package's report.html from its manifest.json,
e.g. for packages built before edgekit wrote one, or after `edgekit profile` added device figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgekit.console import emit, out
from edgekit.errors import BadInput


def add_parsers(sub: Any, model_args: Any) -> None:
    p = sub.add_parser("report", help="write a package's report.html from its manifest.json")
    p.add_argument("package", metavar="PACKAGE", help="a package folder (with manifest.json)")
    p.add_argument("--out", help="where to write the page (default PACKAGE/report.html)")


def cmd_report(args: argparse.Namespace) -> int:
    from edgekit.report_html import render_html

    package = Path(args.package)
    manifest_path = package / "manifest.json"
    if not manifest_path.is_file():
        raise BadInput(f"{package} has no manifest.json: give a package folder written by `edgekit build`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise BadInput(f"{manifest_path} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise BadInput(f"{manifest_path} is not an edgekit manifest (no artifacts list)")
    target = Path(args.out) if args.out else package / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(manifest, package), encoding="utf-8")
    out.print(f"wrote {target}", markup=False)
    emit({"ok": True, "path": str(target)})
    return 0


VERBS = {"report": cmd_report}
