"""The compress stage: prune -> (fine-tune) -> distill, from a ModelSpec to a smaller ONNX.

The torch module comes from the user's factory and weights, or, for an ONNX-only model, from
`onnx_to_torch`. The result is exported back to ONNX and re-ingested, so quantize/export/verify/profile
take it like any model; `edgekit prune` and `edgekit distill` run the halves alone and write a folder
the next one reads (model.onnx, student.pt, source.json, report JSON).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekit.console import note
from edgekit.errors import BadInput
from edgekit.ingest import ModelSpec, load_torch_module
from edgekit.targets import Target


@dataclass
class CompressOptions:
    prune: float | None = None  # fraction of channels to remove
    importance: str = "l1"
    global_ranking: bool = False
    steps: int = 1
    # The precisions that will be built ("fp16,int8"; "all"/"auto": every one the target runs): channels
    # are rounded to a multiple all of them like.
    precision: str = "fp32"
    round_to: int | None = None  # overrides the target's multiple
    ignored_layers: list[str] = field(default_factory=list)
    layer_ratios: dict[str, float] = field(default_factory=dict)  # module name -> its own pruning ratio
    low_rank_energy: float | None = None  # SVD-factorise large Linear / 1x1 convs keeping this energy
    distill: bool = False
    finetune: bool = False  # hard-label fine-tuning after pruning (when not distilling)
    train: str | None = None  # training images/npz for fine-tuning and distillation
    train_from_calibration: bool = False  # no --train: `train` is the calibration data, used unlabelled
    epochs: int = 15
    time_budget_s: float | None = None
    temperature: float = 4.0
    alpha: float = 0.7
    relation_weight: float = 0.0
    hint_layers: list[list[str]] = field(default_factory=list)
    augment: str = "hflip"
    checkpoint: str | None = None  # distillation checkpoint: resumed when present, updated every epoch
    finetune_baseline: bool = True  # also fine-tune with hard labels only, to show what distillation adds
    seed: int = 0
    step_finetune_share: float = 0.25  # of the epoch (and time) budget, spent fine-tuning between pruning steps
    taylor_samples: int = 128  # training samples whose loss gradients rank channels (Taylor importance)


# Given the teacher's validation outputs, a scorer of a student's (None: the task gives no figure here); a
# scorer returns (metric name, value as a fraction, higher is better).
Scorer = Callable[[list[np.ndarray]], tuple[str, float]]


DETECTOR_EMA = 0.99  # a detector is trained and kept as a weight average (distill.WeightAverage)


@dataclass
class TaskGuide:
    """What the task tells compression (the pipeline builds it from --task; `edgekit prune/distill` run without):
    the decoded detector layout whose boxes and scores distillation matches (detect_distill), and the task's
    own figure (mAP50-95, mIoU) that judges every stage and picks the best epoch, where a dense output's
    teacher fit said 96 % of a detector that had lost 20 points of mAP."""

    layout: str | None = None
    scorer_for: Callable[[list[np.ndarray]], Scorer | None] | None = None
    key: str = ""  # what the cache key holds of it (task settings, layout)


@dataclass
class CompressResult:
    onnx_path: str
    report: dict[str, Any]


def source_module(spec: ModelSpec) -> Any:
    """The model as a torch module: the user's factory, else the ONNX converted to torch.fx."""
    if spec.torch_factory:
        return load_torch_module(spec.torch_factory, spec.torch_weights).eval()
    from edgekit.compress.onnx_to_torch import onnx_to_torch

    return onnx_to_torch(spec.load()).eval()


def _tensors(dataset: Any) -> tuple[Any, Any]:
    import torch

    (x,) = dataset.inputs.values()
    y = torch.from_numpy(dataset.labels.astype(np.int64)) if dataset.labels is not None else None
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)), y


PRECISION_WORDS = ("fp32", "fp16", "int8", "all", "auto")


def channel_multiple(target: Target, precision: str, override: int | None = None) -> tuple[int | None, str]:
    """The channel count to round to, and why. Every precision that will be built must like it, so the
    least common multiple of their multiples (Jetson INT8 tensor cores want 16 where FP16 wants 8:
    rounding to 8 would leave the INT8 engine padding every layer)."""
    if override:
        return override, f"set to {override} (--round-to, or the plan)"
    wanted = [p.strip() for p in precision.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PRECISION_WORDS]
    if unknown:
        raise BadInput(f"unknown precision '{unknown[0]}': use fp32, fp16, int8 (comma-separated), all or auto")
    if not wanted or {"all", "auto"} & set(wanted):
        wanted = list(target.precisions)
    known = {p: target.channel_multiple[p] for p in wanted if p in target.channel_multiple}
    missing = [p for p in wanted if p not in known]
    gap = f"{target.name} gives no channel multiple for {', '.join(missing)}" if missing else ""
    if not known:
        return None, f"channels not rounded: {gap}"
    listed = ", ".join(f"{p} {m}" for p, m in known.items())
    if len(known) == 1:
        reason = f"{target.name} channel multiple for {listed}"
    else:
        reason = f"{target.name}: least common multiple of the channel multiples for {listed}"
    return math.lcm(*known.values()), reason + (f"; {gap}" if gap else "")


def importance_sample(labels: Any, count: int, n: int, seed: int) -> Any:
    """Indices of up to `n` of `count` training samples for Taylor importance. Class-balanced when
    there are labels (image folders load sorted by class: the first n would all be one class), else
    a seeded shuffle; the classes alternate, so every batch of the sample holds all of them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        return torch.randperm(count, generator=gen)[:n]
    classes = torch.unique(labels)
    rank = torch.empty(count, dtype=torch.long)  # a sample's place within its class, shuffled
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        rank[members] = torch.randperm(len(members), generator=gen)
    class_index = torch.searchsorted(classes, labels)
    return torch.argsort(rank * len(classes) + class_index)[:n]


def _sample_keys(x: Any) -> list[bytes]:
    return [hashlib.blake2b(np.ascontiguousarray(s).tobytes(), digest_size=16).digest() for s in x.numpy()]


def without_validation(x: Any, y: Any, xv: Any) -> tuple[Any, Any, int]:
    """Training samples that are not also validation samples. The same folder given as --train and
    --calib (the validation set then held out of --calib), or the calibration images standing in for
    training data, would otherwise train on the samples that pick the best epoch and report accuracy."""
    seen = set(_sample_keys(xv))
    keep = [i for i, k in enumerate(_sample_keys(x)) if k not in seen]
    if len(keep) == len(x):
        return x, y, 0
    return x[keep], (y[keep] if y is not None else None), len(x) - len(keep)


def compress(spec: ModelSpec, target: Target, opts: CompressOptions, train: Any, validation: Any,
             workdir: Path, student: ModelSpec | None = None, guide: TaskGuide | None = None) -> CompressResult:
    """Prune and/or distill `spec`'s model (or train the given `student` from it); `train` and
    `validation` are Datasets (labels optional); `guide`, the task's loss layout and metric."""
    import torch

    from edgekit.compress.distill import DistillSettings, evaluate, train_student
    from edgekit.compress.prune import PruneSettings, prune, save_pruned

    if len(spec.inputs) != 1:
        raise BadInput("pruning and distillation support single-input models")
    torch.manual_seed(opts.seed)
    teacher = source_module(spec)
    given_student = student is not None
    if student is not None:
        from edgekit.compress.onnx_to_torch import onnx_to_torch

        student = onnx_to_torch(student.load()).eval()
    else:
        student = copy.deepcopy(teacher)
    example = torch.zeros(*spec.inputs[0].shape)
    xv, yv = _tensors(validation)
    report: dict[str, Any] = {"accuracy": {}, "metric": "accuracy" if yv is not None else "teacher_agreement"}
    metric = _task_metric(teacher, xv, guide)
    layout = guide.layout if guide else None

    def measure(label: str, model: Any) -> None:
        # the task's figure where there is one, else accuracy / agreement, or teacher_fit for a dense output
        report["metric"], value = metric(model) if metric else evaluate(model, xv, yv, teacher)
        report["accuracy"][label] = round(value, 5)
        note(f"{label}: {report['metric']} {value:.2%}")

    measure("original", teacher)
    if given_student:
        measure("student", student)
    x = y = None
    if train is not None:
        x, y = _tensors(train)
        if opts.train_from_calibration:
            y = None  # what most factory users have: images without labels; the teacher's outputs teach
            note(f"no --train: distilling from the {len(x)} calibration images, unlabelled")
        x, y, dropped = without_validation(x, y, xv)
        if dropped:
            note(f"{dropped} training samples are also validation samples: left out of training")
        if len(x) == 0:
            raise BadInput("every training sample is also a validation sample: give --val data of its own")
        report["training_data"] = {"samples": len(x), "labelled": y is not None, "dropped_as_validation": dropped,
                                   "source": "calibration images (no --train)" if opts.train_from_calibration
                                   else "--train"}
    if opts.prune:
        round_to, reason = channel_multiple(target, opts.precision, opts.round_to)
        settings = PruneSettings(ratio=opts.prune, importance=opts.importance, global_ranking=opts.global_ranking,
                                 steps=opts.steps, round_to=round_to, ignored_layers=list(opts.ignored_layers),
                                 layer_ratios=dict(opts.layer_ratios))
        batches = None
        if opts.importance == "taylor":
            if x is None:
                raise BadInput("Taylor importance needs data with a loss: pass --train")
            pick = importance_sample(y, len(x), opts.taylor_samples, opts.seed)
            batches = [(x[pick[i:i + 32]], y[pick[i:i + 32]] if y is not None else None)
                       for i in range(0, len(pick), 32)]

        def loss_fn(out: Any, target_y: Any) -> Any:
            if target_y is not None:
                return torch.nn.functional.cross_entropy(out, target_y)
            return out.pow(2).mean()  # no labels: the output energy still ranks channels by effect

        between = None
        if opts.steps > 1:
            report["prune_steps"] = []
            between = _step_finetune(student, teacher, example, x, y, xv, yv, opts, report["prune_steps"], metric,
                                     layout)
        pr = prune(student, example, settings, batches, loss_fn, between_steps=between)
        report["prune"] = pr.to_dict() | {"round_to": round_to, "round_to_reason": reason}
        save_pruned(student, str(workdir / "pruned.pt"))
        measure("pruned", student)
    if opts.low_rank_energy:
        from edgekit.compress.lowrank import as_dicts, factorise

        factorised = factorise(student, opts.low_rank_energy, skip=tuple(opts.ignored_layers))
        report["low_rank"] = {"energy": opts.low_rank_energy, "layers": as_dicts(factorised)}
        measure("low-rank", student)
    if opts.distill or opts.finetune:
        if x is None:
            raise BadInput("distillation and fine-tuning need training data: pass --train DIR|FILE.npz "
                           "(in `edgekit build`, --calib images serve when there is no --train)")
        base = DistillSettings(epochs=opts.epochs, time_budget_s=opts.time_budget_s, temperature=opts.temperature,
                               alpha=opts.alpha, relation_weight=opts.relation_weight,
                               hint_layers=opts.hint_layers, augment=opts.augment, seed=opts.seed,
                               output_layout=layout, ema_decay=DETECTOR_EMA if layout else None)
        if y is None and not opts.distill:
            raise BadInput("fine-tuning needs labelled --train data (class folders or 'labels' in the .npz); "
                           "without labels use --distill")
        if y is not None and (opts.finetune_baseline or not opts.distill):
            finetuned = copy.deepcopy(student)
            ft = train_student(finetuned, None, x, y, xv, yv, DistillSettings(**{**asdict(base), "labels_only": True}),
                               metric=metric)
            report["finetune"] = ft.to_dict()
            measure("fine-tuned (hard labels)", finetuned)
            if not opts.distill:
                student = finetuned
        if opts.distill:
            dr = train_student(student, teacher, x, y, xv, yv, base,
                               checkpoint=Path(opts.checkpoint) if opts.checkpoint else None, metric=metric)
            report["distill"] = dr.to_dict()
            measure("distilled", student)
    out = workdir / "model.onnx"
    names_in = [i.name for i in spec.inputs]
    names_out = [o.name for o in spec.outputs]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(student.eval(), (example,), str(out), dynamo=False, opset_version=17,
                          input_names=names_in, output_names=names_out, do_constant_folding=True)
    onnx.checker.check_model(str(out))
    torch.save(student.state_dict(), workdir / "student.pt")
    (workdir / "compress.json").write_text(json.dumps(report, indent=1) + "\n")
    return CompressResult(str(out), report)


def _task_metric(teacher: Any, xv: Any, guide: TaskGuide | None) -> Any:
    """model -> (name, value) by the task's evaluator on the validation samples, against the labels or the
    teacher's outputs; None where the guide gives no scorer (the figure evaluate() computes decides)."""
    import torch

    if guide is None or guide.scorer_for is None:
        return None

    @torch.no_grad()
    def outputs(model: Any) -> list[np.ndarray]:
        model.eval()
        parts = [model(xv[i:i + 64]) for i in range(0, len(xv), 64)]
        parts = [p if isinstance(p, (tuple, list)) else (p,) for p in parts]
        return [torch.cat([p[k] for p in parts]).numpy() for k in range(len(parts[0]))]

    scorer = guide.scorer_for(outputs(teacher))
    return None if scorer is None else (lambda model: scorer(outputs(model)))


def _step_finetune(student: Any, teacher: Any, example: Any, x: Any, y: Any, xv: Any, yv: Any,
                   opts: CompressOptions, log: list[dict[str, Any]], metric: Any = None,
                   layout: str | None = None) -> Any:
    """The callback iterative pruning runs after each step: the accuracy the step left, then (before
    the next step, with training data) a short fine-tune so the next ranking sees a recovered model:
    hard labels where the data has them, else distillation from the teacher. Each between-step run
    gets an equal part of `step_finetune_share` of the epoch and time budgets."""
    import torch_pruning as tp

    from edgekit.compress.distill import DistillSettings, evaluate, train_student

    gaps = opts.steps - 1
    epochs = max(1, round(opts.epochs * opts.step_finetune_share / gaps))
    seconds = opts.time_budget_s * opts.step_finetune_share / gaps if opts.time_budget_s else None

    def between(step: int) -> None:
        macs, _ = tp.utils.count_ops_and_params(student, example)
        judge = metric or (lambda model: evaluate(model, xv, yv, teacher))
        pruned = judge(student)[1]
        entry: dict[str, Any] = {"step": step + 1, "macs": int(macs), "pruned": round(pruned, 5)}
        if step + 1 < opts.steps and x is not None:  # after the last step the main fine-tune/distillation runs
            labels = y is not None
            settings = DistillSettings(epochs=epochs, time_budget_s=seconds, temperature=opts.temperature,
                                       alpha=opts.alpha, augment=opts.augment, seed=opts.seed + step + 1,
                                       labels_only=labels, patience=epochs + 1, output_layout=layout,
                                       ema_decay=DETECTOR_EMA if layout else None)
            run = train_student(student, None if labels else teacher, x, y, xv, yv, settings, metric=metric)
            entry |= {"finetune": "hard labels" if labels else "distillation", "epochs": run.epochs_run,
                      "finetuned": round(judge(student)[1], 5)}
        log.append(entry)
        note(f"pruning step {step + 1}/{opts.steps}: {report_line(entry)}")

    return between


def report_line(entry: dict[str, Any]) -> str:
    line = f"{entry['macs'] / 1e6:.1f}M MACs, {entry['pruned']:.2%} after pruning"
    if "finetuned" in entry:
        line += f", {entry['finetuned']:.2%} after {entry['epochs']} epochs of {entry['finetune']}"
    return line
