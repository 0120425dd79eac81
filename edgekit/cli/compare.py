"""`edgekit compare PKG_A PKG_B`: what differs between two packages (size, latency, accuracy, settings,
plan, source model, toolchain). Its latency note is also printed by `edgekit check`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from edgekit.cli.args import side_by_side_args
from edgekit.cli.options import compare_options
from edgekit.console import emit, out
from edgekit.errors import EXIT_OK, BadInput
from edgekit.packaging.compare import ESTIMATE, compare
from edgekit.packaging.model import load_package

VERB = "compare"
ORDER = 120


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare", help="the differences between two packages: size, latency, accuracy, settings, plan",
        description="Compare package B with package A (ratios are B / A). Latency is re-measured here, both "
        "packages' artifacts side by side in one interleaved run, where their backends run on this host; "
        "otherwise (or with --recorded) the manifests' figures are used and labelled recorded or estimate.")
    c.add_argument("package_a", metavar="PKG_A", help="a package folder (the reference side: A)")
    c.add_argument("package_b", metavar="PKG_B", help="a package folder (compared with A: B)")
    side_by_side_args(c)


def run(args: argparse.Namespace) -> int:
    a, b = load_package(args.package_a), load_package(args.package_b)
    opts = compare_options(args, matched_only=False)
    if opts.keys:
        unknown = [k for k in opts.keys if k not in a.artifacts and k not in b.artifacts]
        if unknown:
            raise BadInput(f"no artifact {', '.join(unknown)} in either package; A has {', '.join(a.artifacts)}, "
                           f"B has {', '.join(b.artifacts)}")
    c = compare(a, b, opts)
    _print_header(c)
    _print_artifacts(c)
    _print_settings(c)
    _print_plan(c)
    emit(c)
    return EXIT_OK


def _v(x: Any) -> str:
    """A setting's value for a table cell (rich markup escaped: lists print as [..])."""
    if x is None:
        return "–"
    return escape(x if isinstance(x, str) else json.dumps(x, default=str))


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "–" if x is None else format(x, spec) + suffix


def _print_header(c: dict[str, Any]) -> None:
    for side in ("a", "b"):
        s = c[side]
        out.print(f"{side.upper()}: {s['path']}  ({s['target']}, built {s['created']}, edgekit {s['edgekit']}, "
                  f"{len(s['artifacts'])} artifacts, {'passed' if s['passed'] else 'REJECTED build'})",
                  markup=False, soft_wrap=True)
    src = c["source"]
    if src["same"]:
        out.print(f"source model: same (sha256 {src['a']['sha256'][:12]})", markup=False)
    else:
        out.print(f"source model: DIFFERENT: A {src['a']['path']} sha256 {str(src['a']['sha256'])[:12]} "
                  f"({_millions(src['a']['macs'])} MACs, {src['a']['params']} params); B {src['b']['path']} sha256 "
                  f"{str(src['b']['sha256'])[:12]} ({_millions(src['b']['macs'])} MACs, {src['b']['params']} params)",
                  markup=False, soft_wrap=True)
    t = c["target"]
    out.print(f"target: {t['a']}" + (" (same)" if t["same"] else f" vs {t['b']} (DIFFERENT targets)"), markup=False)
    for what in ("toolchain", "inputs", "data", "thresholds"):
        if c[what]:
            diffs = "; ".join(f"{k} {_v(v['a'])} -> {_v(v['b'])}" for k, v in c[what].items())
            out.print(f"{what} (A -> B): {diffs}", soft_wrap=True)
        elif what == "toolchain":
            out.print("toolchain: same versions")
    print_latency_note(c)


def print_latency_note(c: dict[str, Any]) -> None:
    out.print(f"latency: {c['latency']['note']}", markup=False, soft_wrap=True)
    for k, why in (c["latency"].get("not_timed_here") or {}).items():
        out.print(f"  {k}: not timed here ({why}); the manifests' figures are used", markup=False, soft_wrap=True)


def _millions(x: Any) -> str:
    return f"{x / 1e6:.1f}M" if isinstance(x, (int, float)) else "?"


def _latency_label(lat: dict[str, Any]) -> str:
    if lat.get("a") is None or lat.get("b") is None:
        return lat.get("source") or "–"
    if lat.get("comparable"):
        return lat["source"] if lat["source"] != ESTIMATE else "estimate (cost model)"
    return "NOT COMPARABLE: " + lat["note"]


def _print_artifacts(c: dict[str, Any]) -> None:
    where = {"both": "both", "a": "only A", "b": "only B"}
    t = Table(title="size and latency (ratios B / A)")
    for col in ("artifact", "in", "bytes A", "bytes B", "B/A", "p50 A ms", "p50 B ms", "B/A", "paired B/A [95%]",
                "p99 A ms", "p99 B ms", "B/A", "latency"):
        t.add_column(col, justify="left" if col in ("artifact", "in", "latency") else "right")
    for r in c["artifacts"]:
        by, lat = r["bytes"], r["latency"]
        la, lb = lat.get("a") or {}, lat.get("b") or {}
        t.add_row(r["key"], where[r["in"]], _fmt(by["a"], ","), _fmt(by["b"], ","), _fmt(by["ratio"], ".3f", "x"),
                  _fmt(la.get("p50"), ".3f"), _fmt(lb.get("p50"), ".3f"), _fmt(lat.get("p50_ratio"), ".3f", "x"),
                  _paired(lat.get("paired")), _fmt(la.get("p99"), ".3f"), _fmt(lb.get("p99"), ".3f"),
                  _fmt(lat.get("p99_ratio"), ".3f", "x"),
                  escape(_latency_label(lat) + (", identical files" if r["identical_files"] else "")))
    out.print(t)
    q = Table(title="accuracy and verification")
    for col in ("artifact", "accuracy A", "accuracy B", "change (points)", "cosine A", "cosine B", "verdict A",
                "verdict B"):
        q.add_column(col, justify="left" if col in ("artifact", "verdict A", "verdict B") else "right")
    for r in c["artifacts"]:
        acc, cos, v = r["accuracy"], r["cosine"], r["verdict"]
        worse = v["a"] == "passed" and v["b"] == "rejected"
        q.add_row(r["key"], _fmt(None if acc["a"] is None else 100 * acc["a"], ".2f", "%"),
                  _fmt(None if acc["b"] is None else 100 * acc["b"], ".2f", "%"),
                  _fmt(acc.get("change_points"), "+.2f"), _fmt(cos["a"], ".5f"), _fmt(cos["b"], ".5f"),
                  v["a"] or "–", v["b"] or "–", style="red" if worse else "")
    out.print(q)


def _paired(p: dict[str, Any] | None) -> str:
    if not p:
        return "–"
    return f"{p['ratio']:.3f}x" + (f" [{p['low']:.2f}-{p['high']:.2f}]" if p["low"] is not None else "")


def _print_settings(c: dict[str, Any]) -> None:
    rows = [(r["key"], name, d) for r in c["artifacts"] for name, d in r["settings"].items()]
    same = [r["key"] for r in c["artifacts"] if r["same_files"]]
    if same:  # settings that differ on byte-identical files were not applied, or made no difference
        out.print(f"byte-identical files in both packages: {', '.join(same)}", markup=False, soft_wrap=True)
    if not rows:
        out.print("artifact settings (details): no differences in the artifacts both have")
        return
    t = Table(title="artifact settings that differ (manifest details)")
    for col in ("artifact", "setting", "A", "B"):
        t.add_column(col)
    for key, name, d in rows:
        t.add_row(key, escape(name), _v(d["a"]), _v(d["b"]))
    out.print(t)


def _print_plan(c: dict[str, Any]) -> None:
    p = c["plan"]
    rows: list[tuple[str, str, str]] = []
    if p["chosen"]["a"] != p["chosen"]["b"]:
        rows.append(("candidate chosen", _v(p["chosen"]["a"]), _v(p["chosen"]["b"])))
    rows += [(f"reason (only in {side.upper()})", _v(r) if side == "a" else "", _v(r) if side == "b" else "")
             for side in ("a", "b") for r in p["reasons"][f"only_{side}"]]
    rows += [(f"{key}: {escape(name)}", _v(d["a"]), _v(d["b"])) for key, ds in p["artifacts"].items()
             for name, d in ds.items()]
    rows += [(f"{what}: {escape(name)}", _v(d["a"]), _v(d["b"])) for what in ("budgets", "compress")
             for name, d in p[what].items()]
    if not rows:
        out.print("plan: no differences (reasons, per-artifact settings, candidate chosen, budgets)")
        return
    t = Table(title="plan differences (plan.yaml and plan_reasons)")
    for col in ("", "A", "B"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    out.print(t)
