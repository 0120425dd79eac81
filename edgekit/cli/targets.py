"""`edgekit targets [list|show NAME]`: the targets edgekit knows, as a table, or one as YAML."""

from __future__ import annotations

import argparse

import yaml
from rich.table import Table

from edgekit.console import emit, out
from edgekit.errors import EdgekitError

VERB = "targets"
ORDER = 10


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("targets", help="list targets, or show one")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")


def run(args: argparse.Namespace) -> int:
    from edgekit.targets import load_all, load_target

    if args.action == "show" or args.name:
        if not args.name:
            raise EdgekitError("usage: edgekit targets show NAME")
        t = load_target(args.name)
        out.print(yaml.safe_dump(t.to_dict(), sort_keys=False), end="", markup=False)
        emit(t.to_dict())
        return 0
    table = Table(title="edgekit targets")
    for col in ("name", "kind", "backends", "precisions", "peak TOPS (fp32/fp16/int8)", "memory", "bandwidth"):
        table.add_column(col)
    for t in load_all():
        peaks = "/".join(f"{t.peak_tops[p]:g}" if p in t.peak_tops else "–" for p in ("fp32", "fp16", "int8"))
        table.add_row(t.name, t.kind, ", ".join(t.backends), ", ".join(t.precisions), peaks,
                      f"{t.memory['size_gb']:g} GB", f"{t.memory['bandwidth_gbps']:g} GB/s")
    out.print(table)
    emit({"targets": [t.to_dict() for t in load_all()]})
    return 0
