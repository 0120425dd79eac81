"""Option groups shared by several verbs (how a model is named, data, timing, thresholds, pruning and
distillation, side-by-side timing, --json). Each verb module adds its own options around these; the help
text of a shared option is the same everywhere unless a verb passes its own."""

from __future__ import annotations

import argparse
import os

from edgekit.errors import BadInput
from edgekit.verify.verifier import Thresholds

IMPORTANCE_CHOICES = ["l1", "l2", "bn", "taylor", "random"]


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="an .onnx file (or package.module:factory)")
    p.add_argument("--model", help="PyTorch factory package.module:factory (or an .onnx path)")
    p.add_argument("--weights", help="state_dict file for --model (loaded with weights_only=True)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,..",
                   help="fix an input's dimensions (repeatable)")


def model_of(args: argparse.Namespace) -> str:
    model = args.model or args.model_path
    if not model:
        raise BadInput("give a model: MODEL.onnx or --model package.module:factory")
    return model


def data_args(p: argparse.ArgumentParser, calib: str | None = "calibration data: image folder or .npz",
              val: str | None = "validation data (default: a held-out part of --calib)",
              preprocess: str | None = "preprocessing spec YAML for image folders") -> None:
    """--calib, --val and --preprocess (build, plan, debug; the help text is each verb's)."""
    p.add_argument("--calib", help=calib)
    p.add_argument("--val", help=val)
    p.add_argument("--preprocess", help=preprocess)


def sample_args(p: argparse.ArgumentParser) -> None:
    """How many calibration and validation samples to use (build, plan)."""
    p.add_argument("--calib-samples", type=int, default=300)
    p.add_argument("--val-samples", type=int, default=500)


def timing_args(p: argparse.ArgumentParser, seconds: str | None = None, threads: str | None = None) -> None:
    """Local timing: --profile-seconds, --min-runs, --threads (build, plan, prune, distill)."""
    p.add_argument("--profile-seconds", type=float, default=3.0, help=seconds)
    p.add_argument("--min-runs", type=int, default=50)
    p.add_argument("--threads", type=int, help=threads)


def threshold_args(p: argparse.ArgumentParser) -> None:
    """The verification thresholds of `edgekit build` (edgekit.verify.verifier.Thresholds), but
    --max-accuracy-drop, whose default depends on --plan."""
    d = Thresholds()
    p.add_argument("--min-cosine", type=float, default=d.min_cosine)
    p.add_argument("--min-cosine-fp16", type=float, default=d.min_cosine_fp16,
                   help="FP16 artifacts: a float conversion must agree more closely (default 0.999)")
    p.add_argument("--min-centred-cosine", type=float, help="cosine after removing each output's mean over the "
                   "samples, which a constant offset cannot fool (default: --min-cosine - 0.01)")
    p.add_argument("--min-snr-db", type=float, default=d.min_snr_db)
    p.add_argument("--min-top1-agreement", type=float, default=d.min_top1_agreement)
    p.add_argument("--min-score-iou", type=float, default=d.min_score_iou, help="score-like output slices (values "
                   "in [0, 1]): IoU of the sets above 0.25 in the artifact and in FP32 (default 0.5)")
    p.add_argument("--min-rank-correlation", type=float, default=d.min_rank_correlation,
                   help="score-like output slices: Spearman rank correlation with FP32 (default 0.9)")


def threshold_values(args: argparse.Namespace) -> dict[str, float | None]:
    """What `threshold_args` read, by Thresholds' field names (for build_options)."""
    return {"min_cosine": args.min_cosine, "min_snr_db": args.min_snr_db, "min_top1_agreement": args.min_top1_agreement,
            "min_cosine_fp16": args.min_cosine_fp16, "min_centred_cosine": args.min_centred_cosine,
            "min_score_iou": args.min_score_iou, "min_rank_correlation": args.min_rank_correlation}


def task_args(p: argparse.ArgumentParser) -> None:
    """What the model is for and how its outputs are judged (edgekit.tasks.evaluator.TaskSettings), and the
    INT8 recovery ladder's budget; read by options.build_options."""
    from edgekit.tasks.evaluator import TASKS, TaskSettings

    d = TaskSettings()
    g = p.add_argument_group("task metric (decides the verdict where there is one)")
    g.add_argument("--task", default=d.task, choices=TASKS, help="classify: accuracy; detect: mAP50-95; segment: "
                   "mIoU; auto (default): a [N, C] output is a classifier, anything else is judged by tensor "
                   "figures only")
    g.add_argument("--decoder", help="detect: how boxes are read from the outputs: yolov8 | yolov5 | yolox | "
                   "module:function (your own, returning xyxy boxes, scores, classes per image)")
    g.add_argument("--iou", type=float, default=d.iou, help=f"detect: NMS IoU threshold (default {d.iou})")
    g.add_argument("--conf", type=float, default=d.conf, help=f"detect: confidence floor for mAP (default {d.conf})")
    g.add_argument("--max-det", type=int, default=d.max_det, help=f"detect: boxes kept per image (default {d.max_det})")
    g.add_argument("--val-annotations", metavar="FILE", help="detect: COCO JSON with the boxes of the --val images "
                   "(default: Ultralytics labels/*.txt beside images/)")
    g.add_argument("--mask-threshold", type=float, help="segment: a one-channel probability map is foreground "
                   "above this (default 0.5)")
    g.add_argument("--max-metric-drop", type=float, metavar="POINTS", help="points of mAP50-95, mIoU or accuracy an "
                   "artifact may lose against FP32 (default: --max-accuracy-drop, 1.0)")
    g.add_argument("--strict-tensors", action="store_true", help="the tensor figures (cosine, SNR, slices) bind too "
                   "(default: with a task metric they are diagnostics)")


def recovery_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recover-budget", default="15m", metavar="TIME", help="time the INT8 recovery ladder may spend "
                   "per artifact, e.g. 900, 90s, 15m, 1h (default 15m)")
    p.add_argument("--qat-epochs", type=int, default=3, help="epochs of the ladder's quantization-aware training "
                   "rung (default 3)")
    p.add_argument("--emulate", default="auto", choices=("auto", "require", "off"), help="ARM targets: verify "
                   "every NCNN/ONNX Runtime artifact again in the target's aarch64 runtime under qemu-user with the "
                   "board's CPU model (auto: where qemu is installed; require: reject what cannot be checked there)")
    p.add_argument("--cluster", default=os.environ.get("EDGEKIT_CLUSTER") or None, metavar="ADDRESS|local",
                   help="evaluate the candidates as tasks on a Ray cluster (pip install 'edgekit[ray]'): ADDRESS of "
                   "its head (host:port), or local; timing stays side by side on this host (default $EDGEKIT_CLUSTER)")
    p.add_argument("--emulate-samples", type=int, default=16, metavar="N", help="validation samples the emulated "
                   "run computes (default 16; qemu runs a small model in 0.1-1.3 s per inference)")


def compress_args(p: argparse.ArgumentParser, build: bool) -> None:
    """Pruning and distillation (prune, distill, and build with --distill); read by options.compress_options."""
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


def side_by_side_args(p: argparse.ArgumentParser) -> None:
    """compare and check: which artifacts, and how both packages are timed side by side here."""
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


def add_json_flag(sub: argparse._SubParsersAction) -> None:
    """--json on every verb (and on each action of a verb with actions), added after the verb's own options."""
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for n in nested:
                add_json_flag(n)
        else:
            parser.add_argument("--json", action="store_true",
                                help="print only one machine-readable JSON document on stdout")
