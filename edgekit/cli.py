"""The `edgekit` command. Verbs here: build, inspect, debug, targets; the others live in one cli_*.py
module each, listed in VERB_MODULES (adding a verb is adding a module). Every verb takes `--json`.
Exit codes: 0 ok, 1 verification or budget failed, 2 bad input, 3 a tool failed."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import yaml
from rich.table import Table

from edgekit import __version__, backends, cli_compress, cli_devices
from edgekit.cli_args import model_args, model_of
from edgekit.console import emit, emitted, err, is_json, json_mode, out
from edgekit.errors import EXIT_BAD_INPUT, EXIT_TOOL, EdgekitError
from edgekit.verify import Thresholds


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
    b.add_argument("--target", required=True, help="a name from `edgekit targets` or a target YAML file")
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
    b.add_argument("--min-snr-db", type=float, default=d.min_snr_db)
    b.add_argument("--min-top1-agreement", type=float, default=d.min_top1_agreement)
    b.add_argument("--max-accuracy-drop", type=float, default=d.max_accuracy_drop, help="percentage points")
    b.add_argument("--profile-seconds", type=float, default=3.0, help="timed seconds per artifact, at least")
    b.add_argument("--min-runs", type=int, default=50)
    b.add_argument("--threads", type=int, help="runtime threads (default: the target's cores)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--out", help="package folder (default: build/MODEL-TARGET)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--plan", help="plan.yaml from `edgekit plan`: build exactly what it says")
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
    g.add_argument("--out", help="folder for layers.json and debug.md (default build/debug-MODEL-BACKEND-PRECISION)")
    cli_compress.add_compress_options(b, build=True)
    for name in VERB_MODULES:
        importlib.import_module(name).add_parsers(sub, model_args)
    _add_json_flag(sub)
    return p


# Each module provides add_parsers(sub, model_args) and VERBS = {verb: cmd(args) -> exit code}.
VERB_MODULES = ("edgekit.cli_devices", "edgekit.cli_compress", "edgekit.cli_plan")


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
    code, message = _run(args)
    if is_json() and not emitted():  # errors (and verbs with nothing more to say) still answer in JSON
        emit({"ok": code == 0, "exit_code": code, **({"error": message} if message else {})})
    return code


def _run(args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        return _verbs()[args.verb](args), None
    except EdgekitError as e:
        err.print(f"edgekit: error: {e}", markup=False, soft_wrap=True)
        return e.exit_code, str(e)
    except KeyboardInterrupt:
        err.print("edgekit: interrupted; nothing was written")
        return 130, "interrupted"
    except Exception as e:  # an internal error still gets one line; -v shows where
        if args.verbose or os.environ.get("EDGEKIT_DEBUG"):
            traceback.print_exc()
        message = f"internal error: {type(e).__name__}: {e}"
        err.print(f"edgekit: {message} (rerun with -v for the traceback)", markup=False, soft_wrap=True)
        return EXIT_TOOL, message


def _first_precision(precision: str) -> str:
    first = precision.split(",")[0]
    return first if first in ("fp32", "fp16", "int8") else "int8"  # auto/all: align for the lowest


# ---------------------------------------------------------------- targets


def cmd_targets(args: argparse.Namespace) -> int:
    from edgekit.targets import load_all, load_target

    if args.action == "show" or args.name:
        if not args.name:
            raise EdgekitError("usage: edgekit targets show NAME")
        t = load_target(args.name)
        out.print(yaml.safe_dump(t.to_dict(), sort_keys=False), end="", markup=False)
        return 0
    table = Table(title="edgekit targets")
    for col in ("name", "kind", "backends", "precisions", "peak TOPS (fp32/fp16/int8)", "memory", "bandwidth"):
        table.add_column(col)
    for t in load_all():
        peaks = "/".join(f"{t.peak_tops[p]:g}" if p in t.peak_tops else "–" for p in ("fp32", "fp16", "int8"))
        table.add_row(t.name, t.kind, ", ".join(t.backends), ", ".join(t.precisions), peaks,
                      f"{t.memory['size_gb']:g} GB", f"{t.memory['bandwidth_gbps']:g} GB/s")
    out.print(table)
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
        out.print(_op_support_table(spec, target.backends if target else backends.names(),
                                    target.name if target else None))
    return 0


def _op_support_table(spec: Any, backend_names: list[str], target: str | None) -> Table:
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
    return table


# ---------------------------------------------------------------- build


def cmd_build(args: argparse.Namespace) -> int:
    from edgekit.package import artifact_rows
    from edgekit.pipeline import BuildOptions, build
    from edgekit.profile import ProfileSettings

    precisions = None if args.precision == "auto" else [p.strip() for p in args.precision.split(",") if p.strip()]
    opts = BuildOptions(
        model=model_of(args),
        target=args.target,
        out=args.out,
        backend=args.backend,
        precisions=precisions,
        calib=args.calib,
        val=args.val,
        preprocess=args.preprocess,
        input_shapes=args.input_shape,
        weights=args.weights,
        calib_method=args.calib_method,
        calib_samples=args.calib_samples,
        val_samples=args.val_samples,
        exclude_nodes=args.exclude_node,
        thresholds=Thresholds(args.min_cosine, args.min_snr_db, args.min_top1_agreement, args.max_accuracy_drop),
        profile=ProfileSettings(seconds=args.profile_seconds, min_runs=args.min_runs),
        threads=args.threads,
        memory=not args.no_memory,
        force=args.force,
        dla_core=args.dla_core,
        plan=args.plan,
        compress=cli_compress.compress_options(args, args.distill, _first_precision(args.precision))
        if args.prune or args.distill or args.low_rank else None,
    )
    device = cli_devices.resolve_build_device(args)  # --device: an unknown name fails before the build
    result = build(opts)
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
    for f in m.get("failed_artifacts", []):
        err.print(f"[red]not built[/red] {f['key']}: {f['error']}", soft_wrap=True)
    for a in m["artifacts"]:
        if not a["verification"]["passed"]:
            err.print(f"[red]rejected[/red] {a['backend']} {a['precision']}: "
                      + "; ".join(a["verification"]["failures"]))
    out.print(f"{'package' if m['passed'] else 'REJECTED build (not a package)'}: {result.path}")
    # Hook (devices over SSH): with --device, measure the committed package there -> device_latency_ms.
    if device is not None:
        return cli_devices.profile_built_package(args, device, result)
    return result.exit_code


def cmd_debug(args: argparse.Namespace) -> int:
    from edgekit.debug import run_debug

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
    return 1 if loc.first_divergence else 0


if __name__ == "__main__":
    sys.exit(main())
