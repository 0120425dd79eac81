"""The `edgekit` command. Verbs here: build, inspect, debug, targets; the others live in one cli_*.py
module each, listed in VERB_MODULES (adding a verb is adding a module). Every verb takes `--json`.
Exit codes: 0 ok, 1 verification or budget failed, 2 bad input, 3 a tool failed."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import yaml
from rich.markup import escape
from rich.table import Table

from edgekit import backends
from edgekit.cli import compress as cli_compress
from edgekit.cli import devices as cli_devices
from edgekit.cli.args import model_args, model_of
from edgekit.console import emit, emitted, err, is_json, json_mode, out
from edgekit.errors import EXIT_BAD_INPUT, EXIT_TOOL, BadInput, EdgekitError
from edgekit.verify.verifier import Thresholds
from edgekit.version import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not a usage dump
        self.exit(EXIT_BAD_INPUT, f"edgekit: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgekit", description="Trained model in, verified and measured device package out.")
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    t = sub.add_parser("targets", help="list targets, or show one")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")

    i = sub.add_parser("inspect", help="inputs, outputs, parameters, MACs per layer, op support")
    model_args(i)
    i.add_argument("--target", help="check op support against this target's backends")
    i.add_argument("--all-layers", action="store_true", help="list every node, not only those with MACs")

    b = sub.add_parser("build", help="ingest, quantize, export, verify, profile and package a model")
    model_args(b)
    b.add_argument("--target", required=True, help="a name from `edgekit targets` or a target YAML file; "
                   "a comma list builds each (DIR/TARGET with --out) and prints one table across them")
    b.add_argument("--backend", help="a backend, a comma list, or 'all' (every backend of the target usable here); "
                   "default: the target's first usable backend")
    b.add_argument("--precision", default="auto",
                   help="fp32|fp16|int8, comma-separated list, 'all', or 'auto' (default: lowest the target runs)")
    b.add_argument("--calib", help="calibration data: image folder or .npz")
    b.add_argument("--val", help="validation data (default: a held-out part of --calib)")
    b.add_argument("--preprocess", help="preprocessing spec YAML for image folders")
    b.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    b.add_argument("--calib-samples", type=int, default=300)
    b.add_argument("--val-samples", type=int, default=500)
    b.add_argument("--exclude-node", action="append", default=[], metavar="NODE",
                   help="keep this node in float when quantizing (repeatable)")
    d = Thresholds()
    b.add_argument("--min-cosine", type=float, default=d.min_cosine)
    b.add_argument("--min-cosine-fp16", type=float, default=d.min_cosine_fp16,
                   help="FP16 artifacts: a float conversion must agree more closely (default 0.999)")
    b.add_argument("--min-centred-cosine", type=float, help="cosine after removing each output's mean over the "
                   "samples, which a constant offset cannot fool (default: --min-cosine - 0.01)")
    b.add_argument("--min-snr-db", type=float, default=d.min_snr_db)
    b.add_argument("--min-top1-agreement", type=float, default=d.min_top1_agreement)
    b.add_argument("--min-score-iou", type=float, default=d.min_score_iou, help="score-like output slices (values "
                   "in [0, 1]): IoU of the sets above 0.25 in the artifact and in FP32 (default 0.5)")
    b.add_argument("--min-rank-correlation", type=float, default=d.min_rank_correlation,
                   help="score-like output slices: Spearman rank correlation with FP32 (default 0.9)")
    b.add_argument("--no-detector-head", action="store_true", help="INT8 of a detector-like model: quantize its "
                   "head too (default: the head, found from the graph, stays in float)")
    b.add_argument("--max-accuracy-drop", type=float, help="percentage points (default: the plan's budget with "
                   f"--plan, else {d.max_accuracy_drop})")
    b.add_argument("--profile-seconds", type=float, default=3.0, help="timed seconds per artifact on average: "
                   "the interleaved rounds stop after artifacts x seconds, each artifact with --min-runs at least")
    b.add_argument("--min-runs", type=int, default=50)
    b.add_argument("--threads", type=int, help="runtime threads (default: the target's cores)")
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
    b.add_argument("--dla-core", type=int, help="TensorRT targets with a DLA: build for this DLA core "
                   "(FP16/INT8; layers the DLA lacks fall back to the GPU)")
    b.add_argument("--device", help="also measure the package on this device over SSH (`edgekit devices`); "
                   "recorded as device_latency_ms")
    g = sub.add_parser("debug", help="name the first layer where an artifact diverges from the FP32 model")
    model_args(g)
    g.add_argument("--target", required=True)
    g.add_argument("--backend", required=True)
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    g.add_argument("--package", help="debug this package's artifact instead of building a new one")
    g.add_argument("--calib", help="calibration data (to build an INT8 artifact)")
    g.add_argument("--val", help="samples to compare on (default: held out of --calib)")
    g.add_argument("--preprocess")
    g.add_argument("--samples", type=int, default=4, help="validation samples to compare (default 4)")
    g.add_argument("--min-cosine", type=float, default=d.min_cosine, help="per-layer agreement threshold")
    g.add_argument("--out", help="folder for layers.json and report.md (default build/debug-MODEL-BACKEND-PRECISION)")
    cli_compress.add_compress_options(b, build=True)
    for name in VERB_MODULES:
        importlib.import_module(name).add_parsers(sub, model_args)
    _add_json_flag(sub)
    return p


# Each module provides add_parsers(sub, model_args) and VERBS = {verb: cmd(args) -> exit code}.
VERB_MODULES = ("edgekit.cli.devices", "edgekit.cli.compress", "edgekit.cli.plan", "edgekit.cli.package",
                "edgekit.cli.report", "edgekit.cli.compare")


def _add_json_flag(sub: argparse._SubParsersAction) -> None:
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for n in nested:
                _add_json_flag(n)
        else:
            parser.add_argument("--json", action="store_true",
                                help="print only one machine-readable JSON document on stdout")


def _verbs() -> dict[str, Callable[[argparse.Namespace], int]]:
    verbs: dict[str, Callable[[argparse.Namespace], int]] = {
        "targets": cmd_targets, "inspect": cmd_inspect, "build": cmd_build, "debug": cmd_debug}
    for name in VERB_MODULES:
        verbs |= importlib.import_module(name).VERBS
    return verbs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "json", False):
        json_mode()
    from edgekit.workspace import cli_run

    with cli_run():  # SIGTERM unwinds like Ctrl-C; a private TMPDIR; leftovers of killed runs swept
        code, message = _run(args)
    if is_json() and not emitted():  # errors (and verbs with nothing more to say) still answer in JSON
        emit({"ok": code == 0, "exit_code": code, **({"error": message} if message else {})})
    if code > 128:  # stopped by a signal, everything cleaned: leave now, before runtimes' static
        sys.stdout.flush()  # destructors run on half-unwound state (ncnn's allocator aborts then)
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        return _verbs()[args.verb](args), None
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


def _rounding_precisions(precision: str) -> str:
    """The precisions pruning aligns channels for: every one that will be built (the stage rounds to the
    least common multiple of the target's multiples for them), not only the first listed; auto/all
    become 'all', every precision the target runs."""
    wanted = [p.strip() for p in precision.split(",") if p.strip()]
    return "all" if not wanted or {"auto", "all"} & set(wanted) else ",".join(wanted)


# ---------------------------------------------------------------- targets


def cmd_targets(args: argparse.Namespace) -> int:
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


# ---------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgekit.ingest import ingest, parse_input_shapes
    from edgekit.targets import load_target

    target = load_target(args.target) if args.target else None
    with tempfile.TemporaryDirectory(prefix="edgekit-inspect-") as work:
        spec = ingest(model_of(args), work, parse_input_shapes(args.input_shape), args.weights)
        out.print(f"[bold]{spec.source}[/bold]  opset {spec.source_opset}"
                  + (f" -> {spec.opset}" if spec.opset != spec.source_opset else "")
                  + f"  ·  {spec.params:,} parameters  ·  {spec.macs / 1e6:,.2f} M MACs  ·  {len(spec.layers)} nodes")
        for n in spec.notes:
            out.print(f"  [dim]{n}[/dim]")
        io = Table(title="inputs and outputs")
        for col in ("", "name", "shape", "dtype"):
            io.add_column(col)
        for kind, tensors in (("input", spec.inputs), ("output", spec.outputs)):
            for t in tensors:
                io.add_row(kind, t.name, str(t.shape), t.dtype)
        out.print(io)
        layers = Table(title="layers" + ("" if args.all_layers else " with MACs"))
        for col in ("node", "op", "output shape", "params", "MACs", "% of MACs"):
            layers.add_column(col, justify="right" if col in ("params", "MACs", "% of MACs") else "left")
        for c in spec.layers:
            if args.all_layers or c.macs:
                layers.add_row(c.name, c.op_type, str(c.output_shape), f"{c.params:,}", f"{c.macs:,}",
                               f"{100 * c.macs / spec.macs:.1f}" if spec.macs else "–")
        layers.add_row("[bold]total", "", "", f"[bold]{spec.params:,}", f"[bold]{spec.macs:,}", "100")
        out.print(layers)
        table, support = _op_support_table(spec, target.backends if target else backends.names(),
                                           target.name if target else None)
        out.print(table)
        emit({**{k: v for k, v in spec.to_dict(layers=True).items() if k != "onnx_path"}, "op_support": support})
    return 0


def _op_support_table(spec: Any, backend_names: list[str], target: str | None
                      ) -> tuple[Table, dict[str, dict[str, str]]]:
    model = spec.load()
    table = Table(title="op support" + (f" on {target}" if target else ""))
    table.add_column("op")
    table.add_column("count", justify="right")
    verdicts: dict[str, dict[str, str]] = {}
    for name in backend_names:
        table.add_column(name)
        if name not in backends.names():
            verdicts[name] = {}
            continue
        backend = backends.get(name)
        missing = backend.missing()
        bad = {i.op_type: i.reason for i in backend.unsupported_nodes(model)} if not missing else {}
        verdicts[name] = {op: ("[red]no: " + bad[op]) if op in bad else "[green]yes" for op in spec.op_counts}
        if missing:
            verdicts[name] = dict.fromkeys(spec.op_counts, "[yellow]not installed")
    for op, count in sorted(spec.op_counts.items()):
        table.add_row(op, str(count), *[verdicts[n].get(op, "[dim]backend not in edgekit yet") for n in backend_names])
    plain = {n: {op: v.split("]", 1)[-1] for op, v in verdicts[n].items()} for n in backend_names}
    return table, plain


# ---------------------------------------------------------------- build


def cmd_build(args: argparse.Namespace) -> int:
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    if len(targets) > 1:
        return _build_many(args, targets)
    device = cli_devices.resolve_build_device(args)  # --device: an unknown name fails before the build
    from edgekit.pipeline.build import build

    result = build(_build_options(args, args.target, args.out))
    _print_build(result)
    code = result.exit_code
    # Hook (devices over SSH): with --device, measure the committed package there -> device_latency_ms.
    if device is not None:
        code = cli_devices.profile_built_package(args, device, result)
        result.manifest = json.loads((result.path / "manifest.json").read_text())
    emit(_build_payload(result, code))
    return code


def _build_options(args: argparse.Namespace, target: str, out_dir: str | None) -> Any:
    from edgekit.pipeline.build import BuildOptions
    from edgekit.profiling.timing import ProfileSettings

    precisions = None if args.precision == "auto" else [p.strip() for p in args.precision.split(",") if p.strip()]
    return BuildOptions(
        model=model_of(args), target=target, out=out_dir, backend=args.backend, precisions=precisions,
        calib=args.calib, val=args.val, preprocess=args.preprocess, input_shapes=args.input_shape,
        weights=args.weights, calib_method=args.calib_method, calib_samples=args.calib_samples,
        val_samples=args.val_samples, exclude_nodes=args.exclude_node,
        thresholds=Thresholds(min_cosine=args.min_cosine, min_snr_db=args.min_snr_db,
                              min_top1_agreement=args.min_top1_agreement, max_accuracy_drop=_max_drop(args),
                              min_cosine_fp16=args.min_cosine_fp16, min_centred_cosine=args.min_centred_cosine,
                              min_score_iou=args.min_score_iou, min_rank_correlation=args.min_rank_correlation),
        profile=ProfileSettings(seconds=args.profile_seconds, min_runs=args.min_runs), threads=args.threads,
        memory=not args.no_memory, force=args.force, dla_core=args.dla_core, plan=args.plan, train=args.train,
        device=args.device, cache=not args.no_cache, remeasure=args.remeasure, strict=args.strict,
        recover=args.recover,
        detector_head=not args.no_detector_head,
        compress=cli_compress.compress_options(args, args.distill, _rounding_precisions(args.precision))
        if args.prune or args.distill or args.low_rank else None,
    )


def _build_payload(result: Any, code: int) -> dict[str, Any]:
    return {"ok": code == 0, "exit_code": code, "passed": result.manifest["passed"], "package": str(result.path),
            "manifest": result.manifest}


def _print_build(result: Any) -> None:
    from edgekit.packaging.manifest import artifact_rows

    m = result.manifest
    table = Table(title=f"{m['target']}: {m['source']['path']}")
    rows = artifact_rows(m)
    cols = ["backend", "precision", "bytes", "size", "p50 ms", "p99 ms", "speedup", "accuracy", "cosine", "verdict"]
    if len({a["backend"] for a in m["artifacts"]}) > 1 or any(a["backend"] != "onnxruntime" for a in m["artifacts"]):
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
        if reason.startswith(("no INT8 for", "left out", "the plan prunes")) or "builds no" in reason:
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
            r = build(_build_options(args, name, out_dir))
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


def cmd_debug(args: argparse.Namespace) -> int:
    from edgekit.verify.localise import run_debug

    loc, out_dir = run_debug(
        model=model_of(args), target=args.target, backend=args.backend, precision=args.precision,
        package=args.package, calib=args.calib, val=args.val, preprocess=args.preprocess,
        input_shapes=args.input_shape, weights=args.weights, samples=args.samples, threshold=args.min_cosine,
        out=args.out,
    )
    table = Table(title=f"{loc.backend} {loc.precision} vs FP32, layer by layer ({loc.compared} matched tensors)")
    for col in ("node", "op", "matched by", "cosine", "SNR dB", "max |err|"):
        table.add_column(col, justify="right" if col in ("cosine", "SNR dB", "max |err|") else "left")
    first = loc.first_divergence["tensor"] if loc.first_divergence else None
    for la in loc.layers:
        style = "bold red" if la.tensor == first else ("red" if la.cosine < loc.threshold else "")
        table.add_row(la.node, la.op_type, la.matched_by, f"{la.cosine:.5f}", f"{la.snr_db:.1f}",
                      f"{la.max_abs_error:.4g}", style=style)
    out.print(table)
    out.print(loc.summary(), markup=False)
    out.print(f"per-layer table: {out_dir / 'layers.json'}")
    code = 1 if loc.first_divergence else 0
    emit({"ok": code == 0, "exit_code": code, "out": str(out_dir), **loc.to_dict()})
    return code


if __name__ == "__main__":
    sys.exit(main())
