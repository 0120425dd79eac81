"""Option objects made from user input, in one place for the CLI verbs and edgekit.api: BuildOptions
(build, plan), CompressOptions (prune, distill, build --prune/--distill) and CompareOptions (compare,
check). Plain values in; no argparse parser and no output here, so the API can import it cheaply."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from edgekit.errors import BadInput

if TYPE_CHECKING:
    from edgekit.compress.stage import CompressOptions
    from edgekit.packaging.compare import CompareOptions
    from edgekit.pipeline.build import BuildOptions


def precisions_of(precision: str | list[str] | None) -> list[str] | None:
    """The precisions asked for: 'fp32,int8' -> ['fp32', 'int8'] (blanks dropped); 'auto' or None -> None
    (the build decides); a list is taken as it is ('all' stays ['all'])."""
    if isinstance(precision, str):
        return None if precision == "auto" else [p.strip() for p in precision.split(",") if p.strip()]
    return precision


def rounding_precisions(precision: str) -> str:
    """The precisions pruning aligns channels for: every one that will be built (the stage rounds to the
    least common multiple of the target's multiples for them), not only the first listed; auto/all
    become 'all', every precision the target runs."""
    wanted = precisions_of(precision)
    return "all" if not wanted or {"auto", "all"} & set(wanted) else ",".join(wanted)


def build_options(model: str, target: str, precision: str | list[str] | None = None, **values: Any
                  ) -> BuildOptions:
    """BuildOptions from plain values: BuildOptions' own fields, Thresholds' fields (min_cosine,
    max_accuracy_drop, ...) and profile_seconds / min_runs; TypeError on any other name."""
    from edgekit.pipeline.build import BuildOptions
    from edgekit.profiling.timing import ProfileSettings
    from edgekit.tasks.evaluator import TaskSettings
    from edgekit.verify.verifier import Thresholds

    known = {f.name for f in fields(BuildOptions)}
    thresholds = {f.name: values.pop(f.name) for f in fields(Thresholds) if f.name in values}
    task = {f.name: values.pop(f.name) for f in fields(TaskSettings) if f.name in values}
    if task.get("max_metric_drop") is None:  # the older name's budget, or the default
        task["max_metric_drop"] = thresholds.get("max_accuracy_drop", Thresholds().max_accuracy_drop)
    if "task_settings" not in values:
        values["task_settings"] = TaskSettings(**{k: v for k, v in task.items() if v is not None or k == "decoder"})
    if isinstance(values.get("recover_budget"), str):
        values["recover_budget"] = parse_duration(values["recover_budget"], "--recover-budget")
    profile = {k: values.pop(k) for k in ("profile_seconds", "min_runs") if k in values}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown build option(s): {', '.join(unknown)}")
    return BuildOptions(model=str(model), target=target, precisions=precisions_of(precision),
                        thresholds=Thresholds(**thresholds),
                        profile=ProfileSettings(seconds=profile.get("profile_seconds", 3.0),
                                                min_runs=profile.get("min_runs", 50)), **values)


def parse_duration(text: str | float, what: str) -> float:
    """Seconds from 900, '90s', '15m' or '1h'."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        t = text.strip().lower()
        unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1:])
        try:
            seconds = float(t[:-1] if unit else t) * (unit or 1)
        except ValueError:
            raise BadInput(f"{what} {text!r}: give seconds, or a number with s, m or h (e.g. 15m)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise BadInput(f"{what} {text!r}: give a time >= 0")
    return seconds


def task_values(args: argparse.Namespace) -> dict[str, Any]:
    """The task and recovery options of args.task_args / args.recovery_args, as build_options takes them."""
    return {"task": args.task, "decoder": args.decoder, "iou": args.iou, "conf": args.conf, "max_det": args.max_det,
            "val_annotations": args.val_annotations, "mask_threshold": args.mask_threshold,
            "max_metric_drop": args.max_metric_drop, "strict_tensors": args.strict_tensors,
            "recover_budget": args.recover_budget, "qat_epochs": args.qat_epochs, "emulate": args.emulate,
            "emulate_samples": args.emulate_samples, "cluster": args.cluster}


def compress_options(args: argparse.Namespace, distill: bool, precision: str = "fp32") -> CompressOptions:
    """CompressOptions from the options of args.compress_args."""
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


def compare_options(args: argparse.Namespace, matched_only: bool) -> CompareOptions:
    """CompareOptions from the options of args.side_by_side_args."""
    from edgekit.packaging.compare import CompareOptions
    from edgekit.profiling.timing import ProfileSettings

    keys = [x.strip() for item in args.artifact or [] for x in item.split(",") if x.strip()] or None
    if args.seconds <= 0 or args.min_runs < 1 or (args.threads is not None and args.threads < 1):
        raise BadInput("--seconds must be > 0, --min-runs and --threads >= 1")
    return CompareOptions(recorded=args.recorded, keys=keys, matched_only=matched_only,
                          settings=ProfileSettings(seconds=args.seconds, min_runs=args.min_runs),
                          threads=args.threads)
