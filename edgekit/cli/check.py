"""`edgekit check PKG --baseline OLD`: the regression gate for CI (edgekit.packaging.compare.check).
Exit codes: 0 no regression, 1 worse than the baseline, 2 bad input."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from edgekit.cli.args import side_by_side_args
from edgekit.cli.compare import print_latency_note
from edgekit.cli.options import compare_options
from edgekit.console import emit, out
from edgekit.errors import EXIT_FAILED, EXIT_OK, BadInput
from edgekit.packaging.compare import DEFAULT_MAX_COSINE_DROP, RegressionLimits, check, parse_percent

VERB = "check"
ORDER = 130

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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    side_by_side_args(k)


def run(args: argparse.Namespace) -> int:
    opts = compare_options(args, matched_only=True)
    limits = RegressionLimits(latency=args.max_latency_regression, accuracy_points=args.max_accuracy_drop,
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
    print_latency_note(c)
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

