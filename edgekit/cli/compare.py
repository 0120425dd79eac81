"""`edgekit compare PKG_A PKG_B`: what differs between two packages (size, latency, accuracy, settings,
plan, source model, toolchain); `edgekit check PKG --baseline OLD`: the regression gate for CI.
Exit codes of check: 0 no regression, 1 worse than the baseline, 2 bad input."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from edgekit.console import emit, out
from edgekit.errors import EXIT_FAILED, EXIT_OK, BadInput
from edgekit.packaging.compare import (
    DEFAULT_MAX_COSINE_DROP,
    ESTIMATE,
    CompareOptions,
    Limits,
    check,
    compare,
    load_package,
    parse_percent,
)
from edgekit.profiling.timing import ProfileSettings

PERCENT_RULE = "'5%' and '5' both mean five percent; '0.05' means 0.05 percent"
_RULE_HELP = PERCENT_RULE.replace("%", "%%")  # argument help goes through %-formatting, descriptions do not


def _percent(text: str) -> float:
    try:
        return parse_percent(text)
    except BadInput as e:  # argparse turns this into its one-line usage error (exit 2)
        raise argparse.ArgumentTypeError(str(e)) from None


def _points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of accuracy points (e.g. 0.5)") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be >= 0 accuracy points")
    return value


def _timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", action="extend", nargs="+", metavar="KEY",
                   help="only these artifacts (BACKEND-PRECISION, repeatable or comma-separated; default: all)")
    p.add_argument("--recorded", action="store_true",
                   help="use the latencies recorded in the manifests (measured at different times) instead of "
                        "re-timing both packages side by side here")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="side-by-side timing: timed seconds per artifact, at least (default 1)")
    p.add_argument("--min-runs", type=int, default=200,
                   help="side-by-side timing: runs per artifact, at least (default 200)")
    p.add_argument("--threads", type=int, help="runtime threads, the same for both packages (default: the "
                   "threads the packages were timed with at build, at most this host's cores)")


def add_parsers(sub: Any, model_args: Any = None) -> None:
    c = sub.add_parser(
        "compare", help="the differences between two packages: size, latency, accuracy, settings, plan",
        description="Compare package B with package A (ratios are B / A). Latency is re-measured here, both "
        "packages' artifacts side by side in one interleaved run, where their backends run on this host; "
        "otherwise (or with --recorded) the manifests' figures are used and labelled recorded or estimate.")
    c.add_argument("package_a", metavar="PKG_A", help="a package folder (the reference side: A)")
    c.add_argument("package_b", metavar="PKG_B", help="a package folder (compared with A: B)")
    _timing_args(c)

    k = sub.add_parser(
        "check", help="regression gate: exit 1 when PKG is worse than --baseline",
        description="Exit 1 when the new package is worse than the baseline on any artifact both have, or lacks "
        "one the baseline has: latency p50 up more than --max-latency-regression (new / baseline, timed side "
        "by side here unless --recorded; side by side, flagged only when the median over rounds of the paired "
        "ratio is over the limit and its 95% interval lies above 1, so noise alone does not fail a build; "
        "byte-identical artifacts always pass), accuracy down more than --max-accuracy-drop points (from "
        "verification; without labels, the worst-output cosine vs each package's FP32 reference down more "
        "than --max-cosine-drop), bytes up more than --max-size-increase (when given), or verification "
        f"passed -> rejected. Exit 0 when not, 2 on bad input. Percentages: {PERCENT_RULE}.")
    k.add_argument("package", metavar="PKG", help="the new package folder")
    k.add_argument("--baseline", required=True, metavar="OLD_PKG", help="the package to compare against")
    k.add_argument("--max-latency-regression", type=_percent, default=0.05, metavar="PCT",
                   help=f"largest p50 increase accepted (default 5%%; {_RULE_HELP})")
    k.add_argument("--max-accuracy-drop", type=_points, default=0.5, metavar="POINTS",
                   help="largest accuracy drop accepted, in percentage points (default 0.5)")
    k.add_argument("--max-size-increase", type=_percent, metavar="PCT",
                   help=f"largest bytes increase accepted (default: size not checked; {_RULE_HELP})")
    k.add_argument("--max-cosine-drop", type=_points, default=DEFAULT_MAX_COSINE_DROP, metavar="X",
                   help="without labels: largest drop of the worst-output cosine vs the FP32 reference "
                        f"(default {DEFAULT_MAX_COSINE_DROP:g})")
    _timing_args(k)


def _options(args: argparse.Namespace, matched_only: bool) -> CompareOptions:
    keys = [x.strip() for item in args.artifact or [] for x in item.split(",") if x.strip()] or None
    if args.seconds <= 0 or args.min_runs < 1 or (args.threads is not None and args.threads < 1):
        raise BadInput("--seconds must be > 0, --min-runs and --threads >= 1")
    return CompareOptions(recorded=args.recorded, keys=keys, matched_only=matched_only,
                          settings=ProfileSettings(seconds=args.seconds, min_runs=args.min_runs),
                          threads=args.threads)


# ---------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = load_package(args.package_a), load_package(args.package_b)
    opts = _options(args, matched_only=False)
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
    _print_latency_note(c)


def _print_latency_note(c: dict[str, Any]) -> None:
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


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    opts = _options(args, matched_only=True)
    limits = Limits(latency=args.max_latency_regression, accuracy_points=args.max_accuracy_drop,
                    size=args.max_size_increase, cosine=args.max_cosine_drop)
    result = check(args.package, args.baseline, limits, opts)
    new, base, c, checks = result["new"], result["baseline"], result["comparison"], result["checks"]
    failed = [x for x in checks if x["status"] == "FAIL"]
    skipped = [x for x in checks if x["status"] == "n/a"]
    t = Table(title=f"{args.package} vs baseline {args.baseline}")
    for col in ("artifact", "check", "limit", "figure (new vs baseline)", "result"):
        t.add_column(col)
    for x in checks:
        result = {"PASS": "[green]pass[/green]", "FAIL": "[bold red]FAIL[/bold red]", "n/a": "[yellow]n/a[/yellow]"}
        figure = x["figure"] + (f" ({x['note']})" if x.get("note") else "")
        t.add_row(x["artifact"], x["check"], escape(x["limit"]), escape(figure), result[x["status"]])
    out.print(t)
    if not c["source"]["same"]:
        out.print("note: different source models (sha256 "
                  f"{str(c['source']['a']['sha256'])[:12]} -> {str(c['source']['b']['sha256'])[:12]})", markup=False)
    _print_latency_note(c)
    code = EXIT_FAILED if failed else EXIT_OK
    if failed:
        what = ", ".join(f"{x['artifact']} {x['check']}" for x in failed)
        summary = f"check FAILED: {len(failed)} of {len(checks)} checks worse than the baseline ({what})"
    else:
        summary = f"check passed: {len(checks)} checks, none worse than the baseline"
    if skipped:
        summary += f"; {len(skipped)} not comparable (n/a)"
    out.print(summary, markup=False, soft_wrap=True)
    emit({"ok": code == EXIT_OK, "passed": not failed, "exit_code": code, "summary": summary,
          "package": str(new), "baseline": str(base),
          "limits": {"max_latency_regression": limits.latency, "max_accuracy_drop_points": limits.accuracy_points,
                     "max_size_increase": limits.size, "max_cosine_drop": limits.cosine},
          "latency": c["latency"], "checks": checks, "comparison": c})
    return code


VERBS = {"compare": cmd_compare, "check": cmd_check}
