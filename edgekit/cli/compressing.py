"""What `edgekit prune` and `edgekit distill` share: the run (ingest, compress, time the original and the
result side by side, write OUT/model.onnx and compress.json) and its table. Not a verb."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgekit.cli.args import timing_args
from edgekit.cli.options import compress_options
from edgekit.console import emit, out
from edgekit.errors import BadInput


def compress_timing_args(p: argparse.ArgumentParser) -> None:
    """prune and distill time the original and the result side by side here."""
    timing_args(p, seconds="timed seconds per model (original and result, ONNX Runtime FP32 on this machine)",
                threads="runtime threads (default: this machine's cores)")


def _load(path: str | None, spec: Any, preprocess: Any, what: str) -> Any:
    from edgekit.data import open_source

    if not path:
        return None
    src = open_source(path, spec, preprocess, what)
    return src.load(np.arange(src.count), spec, what)


def _finish(work: Path, out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        if not force:
            raise BadInput(f"{out_dir} exists: pass --force to replace it")
        shutil.rmtree(out_dir)
    shutil.move(str(work), out_dir)


def _print(report: dict[str, Any], out_dir: Path) -> None:
    table = Table(title="compression")
    for c in ("stage", report["metric"]):
        table.add_column(c)
    for stage, value in report["accuracy"].items():
        table.add_row(stage, f"{value:.2%}")
    out.print(table)
    if "prune" in report:
        pr = report["prune"]
        out.print(f"MACs {pr['macs_before'] / 1e6:.1f}M -> {pr['macs_after'] / 1e6:.1f}M ({pr['macs_ratio']:.0%}), "
                  f"params {pr['params_before']:,} -> {pr['params_after']:,}; channels rounded to "
                  f"{pr['round_to']} ({pr['round_to_reason']})", markup=False)
    for entry in report.get("prune_steps", []):
        from edgekit.compress.stage import report_line

        out.print(f"pruning step {entry['step']}: {report_line(entry)}")
    if "speedup_fp32" in report:
        before, after = report["latency_before_ms"], report["latency_after_ms"]
        out.print(f"ONNX Runtime FP32 on this machine, interleaved, {after['threads']} threads: p50 "
                  f"{before['p50']:.3f} -> {after['p50']:.3f} ms ({report['speedup_fp32']:.2f}x)")
    out.print(f"wrote {out_dir}/model.onnx (report: compress.json)")


def run_compress(args: argparse.Namespace, teacher: str | None, distill: bool) -> int:
    from edgekit.compress.stage import compress
    from edgekit.data import Preprocess
    from edgekit.ingest import ingest, parse_input_shapes
    from edgekit.targets import load_target

    target = load_target(args.target)
    preprocess = Preprocess.from_file(args.preprocess) if args.preprocess else None
    out_dir = Path(args.out)
    if out_dir.exists() and not args.force:
        raise BadInput(f"{out_dir} exists: pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="edgekit-compress-") as tmp:
        shapes = parse_input_shapes(args.input_shape)
        if distill:
            spec = ingest(teacher, Path(tmp) / "teacher", shapes, args.weights)
            student = ingest(args.student, Path(tmp) / "student", shapes)
        else:
            spec = ingest(args.model or args.model_path, Path(tmp) / "model", shapes, args.weights)
            student = None
        opts = compress_options(args, distill, getattr(args, "precision", "fp32"))
        train = _load(args.train, spec, preprocess, "training")
        val = _load(args.val, spec, preprocess, "validation")
        if val is None and train is not None:  # hold out 20% of the training data for early stopping
            from edgekit.data import Dataset

            n = len(train)
            idx = np.random.default_rng(0).permutation(n)
            cut = max(1, n // 5)
            pick = lambda ds, ix: Dataset({k: v[ix] for k, v in ds.inputs.items()},  # noqa: E731
                                          ds.labels[ix] if ds.labels is not None else None, ds.class_names)
            val, train = pick(train, np.sort(idx[:cut])), pick(train, np.sort(idx[cut:]))
        if val is None:
            raise BadInput("give --val (or --train) data to measure the model on")
        work = Path(tmp) / "out"
        work.mkdir()
        result = compress(spec, target, opts, train, val, work, student=student, guide=_guide(args, spec, val))
        result.report |= _host_latency(spec, result.onnx_path, val, Path(tmp) / "timing", args)
        _finish(work, out_dir, args.force)
    _print(result.report, out_dir)
    (out_dir / "compress.json").write_text(json.dumps(result.report, indent=1) + "\n")
    emit({"ok": True, "model": str(out_dir / "model.onnx"), "report": result.report})
    return 0



def _guide(args: argparse.Namespace, spec: Any, val: Any) -> Any:
    """--task detect|segment: the detector's loss and the task metric judge the compression (pipeline.stages)."""
    from dataclasses import fields

    from edgekit.pipeline.stages import task_guide
    from edgekit.tasks.evaluator import TaskSettings

    given = {f.name: getattr(args, f.name, None) for f in fields(TaskSettings)}  # task_args' options
    return task_guide(spec, val, TaskSettings(**{k: v for k, v in given.items() if v is not None}))


def _host_latency(original: Any, compressed_onnx: str, val: Any, work: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    """The original and the compressed model in ONNX Runtime FP32 on this machine, timed side by side
    (interleaved, one fresh process, the same threads), as `edgekit build` times them."""
    from edgekit import backends
    from edgekit.ingest import ingest
    from edgekit.planning.types import ArtifactPlan
    from edgekit.profiling.timing import ProfileSettings, time_artifacts
    from edgekit.targets import detect_host

    compressed = ingest(compressed_onnx, work / "compressed")
    ort = backends.get_installed(backends.REFERENCE_BACKEND)
    artifacts = {}
    for key, spec in (("original", original), ("compressed", compressed)):
        folder = work / f"ort-{key}"
        folder.mkdir(parents=True)
        artifacts[key] = ort.export(spec, ArtifactPlan(backends.REFERENCE_BACKEND, "fp32"), None, folder)
    threads = args.threads or detect_host()["cpu"]["cores"]
    feeds = val.batches(compressed)[:1]
    if not feeds:
        raise BadInput("no validation sample to time the models on")
    settings = ProfileSettings(seconds=args.profile_seconds, min_runs=args.min_runs)
    lat = time_artifacts(artifacts, feeds[0], settings, threads)
    before, after = lat["original"], lat["compressed"]
    return {"latency_before_ms": before.to_dict(), "latency_after_ms": after.to_dict(),
            "speedup_fp32": round(before.p50 / after.p50, 4),
            "latency_method": "ONNX Runtime FP32 on this machine, original and result interleaved in one process"}

