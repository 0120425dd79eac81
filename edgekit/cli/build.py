"""`edgekit build MODEL --target T`: ingest, quantize, export, verify, profile and package a model (one
target, or a comma list of targets with one table across them); `--device` also measures the package there."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from edgekit import backends
from edgekit.cli.args import (
    compress_args,
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
from edgekit.cli.options import build_options, compress_options, rounding_precisions, task_values
from edgekit.console import emit, err, out
from edgekit.errors import BadInput, EdgekitError
from edgekit.packaging.model import load_package
from edgekit.verify.verifier import Thresholds

VERB = "build"
ORDER = 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="ingest, quantize, export, verify, profile and package a model")
    model_args(b)
    b.add_argument("--target", required=True, help="a name from `edgekit targets` or a target YAML file; "
                   "a comma list builds each (DIR/TARGET with --out) and prints one table across them")
    b.add_argument("--backend", help="a backend, a comma list, or 'all' (every backend of the target usable here); "
                   "default: the target's first usable backend")
    b.add_argument("--precision", default="auto",
                   help="fp32|fp16|int8, comma-separated list, 'all', or 'auto' (default: lowest the target runs)")
    data_args(b)
    b.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    sample_args(b)
    b.add_argument("--exclude-node", action="append", default=[], metavar="NODE",
                   help="keep this node in float when quantizing (repeatable)")
    threshold_args(b)
    b.add_argument("--no-detector-head", action="store_true", help="INT8 of a detector-like model: quantize its "
                   "head too (default: the head, found from the graph, stays in float)")
    b.add_argument("--max-accuracy-drop", type=float, help="percentage points (default: the plan's budget with "
                   f"--plan, else {Thresholds().max_accuracy_drop})")
    timing_args(b, seconds="timed seconds per artifact on average: the interleaved rounds stop after artifacts x "
                "seconds, each artifact with --min-runs at least",
                threads="runtime threads (default: the target's cores)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--out", help="package folder (default: build/MODEL-TARGET)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--no-cache", action="store_true", help="rebuild every stage (default: reuse the stages "
                   "whose inputs are unchanged, from $EDGEKIT_HOME/cache/build)")
    b.add_argument("--remeasure", action="store_true", help="time the artifacts again even when the cache "
                   "holds a measurement of the very same artifacts on this host")
    b.add_argument("--plan", help="plan.yaml from `edgekit plan`: build exactly what it says")
    b.add_argument("--strict", action="store_true", help="with --backend all / --precision all: reject the build "
                   "when any artifact fails (default: ship the verified ones, list the others)")
    b.add_argument("--recover", default="auto", choices=["auto", "none"], help="INT8 that misses the thresholds: "
                   "auto (default) retries (7-bit weights / other calibration, NNCF accuracy control, the fewest "
                   "sensitive layers in float) before rejecting; none rejects it at once")
    recovery_args(b)
    task_args(b)
    b.add_argument("--dla-core", type=int, help="TensorRT targets with a DLA: build for this DLA core "
                   "(FP16/INT8; layers the DLA lacks fall back to the GPU)")
    b.add_argument("--device", help="also measure the package on this device over SSH (`edgekit devices`); "
                   "recorded as device_latency_ms")
    compress_args(b, build=True)


def run(args: argparse.Namespace) -> int:
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    if len(targets) > 1:
        return _build_many(args, targets)
    from edgekit.cli.profile import measure_built_package, resolve_device

    device = resolve_device(args)  # --device: an unknown name fails before the build
    from edgekit.pipeline.build import build

    result = build(_options(args, args.target, args.out))
    _print_build(result)
    code = result.exit_code
    # Hook (devices over SSH): with --device, measure the committed package there -> device_latency_ms.
    if device is not None:
        code = measure_built_package(args, device, result)
        result.manifest = load_package(result.path).manifest
    emit(_build_payload(result, code))
    return code


def _options(args: argparse.Namespace, target: str, out_dir: str | None) -> Any:
    """The BuildOptions of one target's build."""
    return build_options(
        model_of(args), target, args.precision, out=out_dir, backend=args.backend,
        calib=args.calib, val=args.val, preprocess=args.preprocess, input_shapes=args.input_shape,
        weights=args.weights, calib_method=args.calib_method, calib_samples=args.calib_samples,
        val_samples=args.val_samples, exclude_nodes=args.exclude_node,
        max_accuracy_drop=_max_drop(args), **threshold_values(args),
        profile_seconds=args.profile_seconds, min_runs=args.min_runs, threads=args.threads,
        memory=not args.no_memory, force=args.force, dla_core=args.dla_core, plan=args.plan, train=args.train,
        device=args.device, cache=not args.no_cache, remeasure=args.remeasure, strict=args.strict,
        recover=args.recover, **task_values(args),
        detector_head=not args.no_detector_head,
        compress=compress_options(args, args.distill, rounding_precisions(args.precision))
        if args.prune or args.distill or args.low_rank else None,
    )


def _max_drop(args: argparse.Namespace) -> float:
    """--max-accuracy-drop, else the budget the plan was made under, else the default."""
    if args.max_accuracy_drop is not None:
        return args.max_accuracy_drop
    if args.plan:
        from edgekit.planning.types import Plan

        budget = Plan.load(args.plan).budgets.get("max_accuracy_drop")
        if budget is not None:
            return float(budget)
    return Thresholds().max_accuracy_drop


def _build_payload(result: Any, code: int) -> dict[str, Any]:
    return {"ok": code == 0, "exit_code": code, "passed": result.manifest["passed"], "package": str(result.path),
            "manifest": result.manifest}


def _print_build(result: Any) -> None:
    from edgekit.packaging.manifest import artifact_rows

    m = result.manifest
    table = Table(title=f"{m['target']}: {m['source']['path']}")
    rows = artifact_rows(m)
    cols = ["backend", "precision", "bytes", "size", "p50 ms", "p99 ms", "speedup", "accuracy", "cosine", "verdict"]
    if any(a["verification"].get("task") for a in m["artifacts"]):
        cols.insert(cols.index("accuracy"), "task")
        if all(a["verification"].get("accuracy") is None for a in m["artifacts"]):
            cols.remove("accuracy")
    shown = {a["backend"] for a in m["artifacts"]}
    if len(shown) > 1 or any(b != backends.REFERENCE_BACKEND for b in shown):
        cols.insert(cols.index("speedup") + 1, "vs ORT fp32")
    for c in cols:
        table.add_column(c, justify="left" if c in ("backend", "precision", "verdict") else "right")
    for r in rows:
        style = "" if r["verdict"] == "ok" else "red"
        table.add_row(*[r[c] for c in cols], style=style)
    out.print(table)
    ref = m["reference"]["latency_ms"]
    out.print(f"ONNX Runtime FP32 reference p50 {ref['p50']:.3f} ms ({ref['where']}, {ref['threads']} threads, "
              f"{ref['runs']} interleaved runs). Speedup vs the same backend's FP32; size vs its FP32 (else vs "
              "the source); accuracy in %; est. = cost-model estimate for the target, not a measurement.")
    for reason in m["plan_reasons"]:
        if reason.startswith("compression lost"):  # the whole build's verdict: said where errors are
            err.print(f"[red]rejected[/red] {escape(reason)}", soft_wrap=True)
        elif reason.startswith(("no INT8 for", "left out", "the plan prunes")) or "builds no" in reason:
            out.print(f"[dim]·[/dim] {reason}", soft_wrap=True)
    if m.get("cache", {}).get("reused"):
        reused = m["cache"]["reused"]
        out.print(f"[dim]·[/dim] {len(reused)} stages reused from the build cache ({', '.join(reused[:4])}"
                  f"{', …' if len(reused) > 4 else ''}): --no-cache rebuilds everything, --remeasure times again",
                  soft_wrap=True)
    for f in m.get("failed_artifacts", []):
        what = "not built" if f.get("stage", "export") == "export" else "left out (rejected)"
        err.print(f"[red]{what}[/red] {f['key']}: {escape(f['error'])}", soft_wrap=True)
    for a in m["artifacts"]:
        if not a["verification"]["passed"]:
            err.print(f"[red]rejected[/red] {a['backend']} {a['precision']}: "
                      + escape("; ".join(a["verification"]["failures"])), soft_wrap=True)
    out.print(f"{'package' if m['passed'] else 'REJECTED build (not a package)'}: {result.path}")


def _build_many(args: argparse.Namespace, targets: list[str]) -> int:
    """One build per target (DIR/TARGET with --out), then one table across them. A target that cannot be
    built (bad input for it, a tool failure) is reported in the table; the others still build."""
    from edgekit.packaging.manifest import artifact_rows
    from edgekit.pipeline.build import build

    if args.device:
        raise BadInput("--device measures one target's package: build several targets without it, then "
                       "`edgekit profile DIR/TARGET --device NAME`")
    results: list[dict[str, Any]] = []
    for name in targets:
        out_dir = str(Path(args.out) / name) if args.out else None
        out.print(f"[bold]== {name}[/bold]")
        try:
            r = build(_options(args, name, out_dir))
        except EdgekitError as e:
            err.print(f"edgekit: error: {name}: {e}", markup=False, soft_wrap=True)
            results.append({"target": name, "ok": False, "exit_code": e.exit_code, "error": str(e)})
            continue
        _print_build(r)
        results.append({"target": name, **_build_payload(r, r.exit_code), "rows": artifact_rows(r.manifest)})
    table = Table(title=f"{len(targets)} targets: {model_of(args)}")
    cols = ["target", "backend", "precision", "bytes", "p50 ms", "p99 ms", "speedup", "accuracy", "cosine", "verdict"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("target", "backend", "precision", "verdict") else "right")
    for r in results:
        if "rows" not in r:
            table.add_row(r["target"], "–", "–", "–", "–", "–", "–", "–", "–", f"not built: {r['error']}",
                          style="red")
        for row in r.get("rows", []):
            table.add_row(r["target"], *[row[c] for c in cols[1:]], style="" if row["verdict"] == "ok" else "red")
    out.print(table)
    out.print("Latencies marked est. are cost-model estimates for that device; the others were measured on "
              "this host. Measure a package on its device with `edgekit profile DIR --device NAME`.")
    code = max(r["exit_code"] for r in results)
    emit({"ok": code == 0, "exit_code": code, "targets": [{k: v for k, v in r.items() if k != "rows"}
                                                          for r in results]})
    return code
