"""`edgekit prune`, `edgekit distill`, and the pruning/distillation options of `edgekit build`."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgekit.console import emit, out
from edgekit.errors import BadInput

IMPORTANCE_CHOICES = ["l1", "l2", "bn", "taylor", "random"]


def add_compress_options(p: argparse.ArgumentParser, build: bool) -> None:
    g = p.add_argument_group("pruning and distillation (PyTorch path)")
    g.add_argument("--prune", type=float, metavar="RATIO", help="remove this fraction of channels (e.g. 0.5)")
    g.add_argument("--importance", default="l1", choices=IMPORTANCE_CHOICES, help="channel importance criterion")
    g.add_argument("--global-ranking", action="store_true", help="rank channels across layers (default: uniform)")
    g.add_argument("--prune-steps", type=int, default=1, help="iterative pruning steps")
    g.add_argument("--round-to", type=int, help="channel multiple (default: the target's for --precision)")
    g.add_argument("--keep-layer", action="append", default=[], metavar="MODULE",
                   help="a torch module name left unpruned (repeatable; default: the output layers)")
    g.add_argument("--low-rank", type=float, metavar="ENERGY",
                   help="factorise large Linear / 1x1 conv layers by SVD keeping this energy (e.g. 0.95)")
    g.add_argument("--layer-ratio", action="append", default=[], metavar="MODULE=RATIO",
                   help="a torch module's own pruning ratio (repeatable)")
    g.add_argument("--train", help="training data (image folder or .npz; labels optional) for fine-tuning, "
                   "distillation and Taylor importance" + (" (default for --distill and Taylor: the --calib images, "
                                                           "unlabelled)" if build else ""))
    g.add_argument("--epochs", type=int, default=15)
    g.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop training after this long")
    g.add_argument("--temperature", type=float, default=4.0)
    g.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher's soft targets")
    g.add_argument("--relation-weight", type=float, default=0.0, help="RKD (distance+angle) loss weight")
    g.add_argument("--hint", action="append", default=[], metavar="STUDENT_LAYER:TEACHER_LAYER",
                   help="feature hint between two module names, through a 1x1 adapter (repeatable)")
    g.add_argument("--augment", default="hflip", choices=["none", "hflip", "dihedral"])
    g.add_argument("--no-finetune-baseline", action="store_true",
                   help="skip the hard-label fine-tuning run that shows what distillation adds")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint", metavar="FILE", help="distillation checkpoint: resumed when it exists, "
                   "updated every epoch (an interrupted run continues where it stopped)")
    if build:
        g.add_argument("--distill", action="store_true", help="distill from the original model after pruning")


def compress_options(args: argparse.Namespace, distill: bool, precision: str = "fp32") -> Any:
    from edgekit.compress.stage import CompressOptions

    hints = []
    for h in args.hint:
        s, sep, t = h.partition(":")
        if not sep or not s or not t:
            raise BadInput(f"--hint '{h}' is not STUDENT_LAYER:TEACHER_LAYER")
        hints.append([s, t])
    ratios = {}
    for item in args.layer_ratio:
        name, sep, value = item.rpartition("=")
        try:
            ratios[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise BadInput(f"--layer-ratio '{item}' is not MODULE=RATIO")
    train, from_calibration = args.train, False
    if not train and (distill or args.importance == "taylor") and getattr(args, "calib", None):
        # Most factory users have images and no labelled training set: the calibration images serve,
        # unlabelled (the stage leaves out any that are also validation samples).
        train, from_calibration = args.calib, True
    return CompressOptions(
        prune=args.prune, importance=args.importance, global_ranking=args.global_ranking, steps=args.prune_steps,
        precision=precision, round_to=args.round_to, ignored_layers=args.keep_layer, distill=distill,
        low_rank_energy=args.low_rank, layer_ratios=ratios, train_from_calibration=from_calibration,
        finetune=bool(args.train) and not distill, train=train, epochs=args.epochs,
        time_budget_s=args.time_budget, temperature=args.temperature, alpha=args.alpha,
        relation_weight=args.relation_weight, hint_layers=hints, augment=args.augment,
        finetune_baseline=not args.no_finetune_baseline, seed=args.seed, checkpoint=args.checkpoint)


def add_parsers(sub: Any, model_args: Any) -> None:
    p = sub.add_parser("prune", help="remove channels (Torch-Pruning), aligned to the target; writes a model")
    model_args(p)
    p.add_argument("--target", required=True)
    p.add_argument("--precision", default="fp32",
                   help="the precisions you will build (comma list, or 'all'): channels are rounded to a multiple "
                   "all of them like on the target")
    p.add_argument("--val", help="labelled data to report accuracy before/after")
    p.add_argument("--preprocess")
    p.add_argument("--out", required=True, help="folder for model.onnx, pruned.pt, compress.json")
    p.add_argument("--force", action="store_true")
    _timing_args(p)
    add_compress_options(p, build=False)
    d = sub.add_parser("distill", help="train a (pruned) student from the original model; writes a model")
    d.add_argument("student", help="the student ONNX (e.g. OUT/model.onnx of `edgekit prune`)")
    d.add_argument("--teacher", required=True, help="the original model: .onnx or package.module:factory")
    d.add_argument("--weights", help="state_dict for a --teacher factory")
    d.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,..")
    d.add_argument("--target", default="host-cpu")
    d.add_argument("--val", help="validation data (default: 20%% of --train held out)")
    d.add_argument("--preprocess")
    d.add_argument("--out", required=True)
    d.add_argument("--force", action="store_true")
    _timing_args(d)
    add_compress_options(d, build=False)


def _timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile-seconds", type=float, default=3.0,
                   help="timed seconds per model (original and result, ONNX Runtime FP32 on this machine)")
    p.add_argument("--min-runs", type=int, default=50)
    p.add_argument("--threads", type=int, help="runtime threads (default: this machine's cores)")


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


def cmd_prune(args: argparse.Namespace) -> int:
    return _run(args, teacher=None, distill=False)


def cmd_distill(args: argparse.Namespace) -> int:
    return _run(args, teacher=args.teacher, distill=True)


def _run(args: argparse.Namespace, teacher: str | None, distill: bool) -> int:
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
        result = compress(spec, target, opts, train, val, work, student=student)
        result.report |= _host_latency(spec, result.onnx_path, val, Path(tmp) / "timing", args)
        _finish(work, out_dir, args.force)
    _print(result.report, out_dir)
    (out_dir / "compress.json").write_text(json.dumps(result.report, indent=1) + "\n")
    emit({"ok": True, "model": str(out_dir / "model.onnx"), "report": result.report})
    return 0


VERBS = {"prune": cmd_prune, "distill": cmd_distill}


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
    ort = backends.get_installed("onnxruntime")
    artifacts = {}
    for key, spec in (("original", original), ("compressed", compressed)):
        folder = work / f"ort-{key}"
        folder.mkdir(parents=True)
        artifacts[key] = ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, folder)
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
