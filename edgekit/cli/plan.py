"""`edgekit plan`: the planner's candidates table and plan.yaml; `edgekit build --plan` applies it."""

from __future__ import annotations

import argparse

from rich.table import Table

from edgekit.cli.args import (
    IMPORTANCE_CHOICES,
    data_args,
    model_args,
    model_of,
    recovery_args,
    sample_args,
    task_args,
    threshold_args,
    threshold_values,
    timing_args,
)
from edgekit.cli.options import build_options, task_values
from edgekit.console import emit, out

VERB = "plan"
ORDER = 90


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="build, verify and time every candidate; write the best under budgets to plan.yaml")
    model_args(p)
    p.add_argument("--target", required=True)
    p.add_argument("--backend", help="limit the candidates to these backends (default: all the target lists)")
    p.add_argument("--precision", help="limit the precisions (default: all the target supports)")
    data_args(p, preprocess=None)
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="points of the task metric (accuracy, "
                   "mAP50-95, mIoU) vs FP32 (default 1.0; --max-metric-drop is the same budget)")
    p.add_argument("--max-latency-ms", type=float)
    p.add_argument("--max-size-mb", type=float)
    p.add_argument("--objective", default="latency", choices=["latency", "size"])
    sample_args(p)
    timing_args(p)
    threshold_args(p)  # each candidate is verified as `edgekit build` verifies it
    p.add_argument("--out", default="plan.yaml", help="where to write the plan (default ./plan.yaml)")
    p.add_argument("--prune", metavar="R[,R..]", help="also consider pruning these fractions of channels "
                   "(per-group ratios by measured sensitivity, then distilled from the original)")
    p.add_argument("--train", help="training data for the pruned candidates' distillation "
                   "(default: the calibration images, unlabelled)")
    p.add_argument("--epochs", type=int, default=10, help="distillation epochs per pruned candidate (default 10)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="distillation time per pruned candidate")
    p.add_argument("--importance", default="l1", choices=IMPORTANCE_CHOICES)
    p.add_argument("--augment", default="hflip", choices=["none", "hflip", "dihedral"],
                   help="distillation augmentation of the pruned candidates (dihedral: flips and 90-degree turns, "
                   "where orientation carries no meaning)")
    p.add_argument("--device", help="measure the candidates on this device over SSH (`edgekit devices`)")
    task_args(p)
    recovery_args(p)


def run(args: argparse.Namespace) -> int:
    from edgekit.errors import BadInput
    from edgekit.planning.search import Budgets, PruneSearch, candidate_rows, plan_model

    opts = build_options(
        model_of(args), args.target, args.precision, backend=args.backend,
        calib=args.calib, val=args.val, preprocess=args.preprocess, input_shapes=args.input_shape,
        weights=args.weights, calib_samples=args.calib_samples, val_samples=args.val_samples,
        profile_seconds=args.profile_seconds, min_runs=args.min_runs, threads=args.threads, memory=False,
        max_accuracy_drop=args.max_accuracy_drop, **threshold_values(args), **task_values(args))
    drop = args.max_metric_drop if args.max_metric_drop is not None else args.max_accuracy_drop  # the newer name
    budgets = Budgets(drop, args.max_latency_ms, args.max_size_mb, args.objective)
    prune = None
    if args.prune:
        try:
            ratios = [float(r) for r in args.prune.split(",") if r.strip()]
        except ValueError:
            raise BadInput(f"--prune {args.prune}: give fractions of channels, e.g. 0.25,0.5") from None
        prune = PruneSearch(ratios, train=args.train, epochs=args.epochs, time_budget_s=args.time_budget,
                            importance=args.importance, augment=args.augment)
    plan, candidates = plan_model(opts, budgets, args.out, prune=prune, device=args.device)
    chosen_key = next(c["key"] for c in plan.candidates if c.get("chosen"))
    emit({"plan": str(args.out), "chosen": chosen_key, "reasons": plan.reasons, "cost_model": plan.cost_model,
          "candidates": plan.candidates})
    table = Table(title=f"candidates for {plan.target} (objective: {budgets.objective})")
    rows = candidate_rows(candidates)
    for col in rows[0]:
        table.add_column(col, overflow="fold")
    for c, row in zip(candidates, rows):
        chosen = any(x.get("chosen") and x["key"] == c.key for x in plan.candidates)
        table.add_row(*row.values(), style="bold green" if chosen else ("" if c.verdict == "ok" else "dim"))
    out.print(table)
    fit = plan.cost_model.get("fit") or {}
    if fit.get("points"):
        out.print(f"cost model fitted to {fit['points']} measurements of {plan.target} "
                  f"({', '.join(fit['sources'][:3])}{'…' if len(fit['sources']) > 3 else ''}); "
                  f"it reproduces them within {fit['fit_mape_percent']}% on average")
    mape = plan.cost_model.get("mape_percent")
    out.print(f"cost model: mean absolute percentage error {mape}% over {plan.cost_model['compared']} measured "
              "candidates" if mape is not None else "cost model: nothing measurable here, latencies are estimates")
    out.print(f"chosen: {plan.reasons[-1]}")
    out.print(f"wrote {args.out}: apply it with `edgekit build MODEL --target {plan.target} --plan {args.out} ...`")
    return 0

