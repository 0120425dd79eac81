"""The compress stage: prune -> (fine-tune) -> distill, from a ModelSpec to a smaller ONNX.

The torch module comes from the user's factory and weights, or, for an ONNX-only model, from
`onnx_to_torch`. The result is exported back to ONNX and re-ingested, so quantize/export/verify/profile
take it like any model; `edgekit prune` and `edgekit distill` run the halves alone and write a folder
the next one reads (model.onnx, student.pt, source.json, report JSON).
"""

from __future__ import annotations

import copy
import json
import warnings
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
    precision: str = "fp32"  # which channel multiple of the target to round to
    round_to: int | None = None  # overrides the target's multiple
    ignored_layers: list[str] = field(default_factory=list)
    layer_ratios: dict[str, float] = field(default_factory=dict)  # module name -> its own pruning ratio
    low_rank_energy: float | None = None  # SVD-factorise large Linear / 1x1 convs keeping this energy
    distill: bool = False
    finetune: bool = False  # hard-label fine-tuning after pruning (when not distilling)
    train: str | None = None  # training images/npz for fine-tuning and distillation
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


def compress(spec: ModelSpec, target: Target, opts: CompressOptions, train: Any, validation: Any,
             workdir: Path, student: ModelSpec | None = None) -> CompressResult:
    """Prune and/or distill `spec`'s model (or train the given `student` from it); `train` and
    `validation` are Datasets (labels optional)."""
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

    def measure(label: str, model: Any) -> None:
        _, value = evaluate(model, xv, yv, teacher)
        report["accuracy"][label] = round(value, 5)
        note(f"{label}: {report['metric']} {value:.2%}")

    measure("original", teacher)
    if given_student:
        measure("student", student)
    if opts.prune:
        round_to = opts.round_to or target.channel_multiple.get(opts.precision)
        settings = PruneSettings(ratio=opts.prune, importance=opts.importance, global_ranking=opts.global_ranking,
                                 steps=opts.steps, round_to=round_to, ignored_layers=list(opts.ignored_layers),
                                 layer_ratios=dict(opts.layer_ratios))
        batches = None
        if opts.importance == "taylor":
            if train is None:
                raise BadInput("Taylor importance needs data with a loss: pass --train")
            x, y = _tensors(train)
            targets = y if y is not None else None
            batches = [(x[i:i + 32], targets[i:i + 32] if targets is not None else None) for i in range(0, 128, 32)]

        def loss_fn(out: Any, y: Any) -> Any:
            if y is not None:
                return torch.nn.functional.cross_entropy(out, y)
            return out.pow(2).mean()  # no labels: the output energy still ranks channels by effect

        pr = prune(student, example, settings, batches, loss_fn)
        report["prune"] = pr.to_dict() | {"round_to": round_to, "round_to_reason":
                                          f"{target.name} channel multiple for {opts.precision}"}
        save_pruned(student, str(workdir / "pruned.pt"))
        measure("pruned", student)
    if opts.low_rank_energy:
        from edgekit.compress.lowrank import as_dicts, factorise

        factorised = factorise(student, opts.low_rank_energy, skip=tuple(opts.ignored_layers))
        report["low_rank"] = {"energy": opts.low_rank_energy, "layers": as_dicts(factorised)}
        measure("low-rank", student)
    if opts.distill or opts.finetune:
        if train is None:
            raise BadInput("distillation and fine-tuning need training data: pass --train DIR|FILE.npz")
        x, y = _tensors(train)
        base = DistillSettings(epochs=opts.epochs, time_budget_s=opts.time_budget_s, temperature=opts.temperature,
                               alpha=opts.alpha, relation_weight=opts.relation_weight,
                               hint_layers=opts.hint_layers, augment=opts.augment, seed=opts.seed)
        if y is None and not opts.distill:
            raise BadInput("fine-tuning needs labelled --train data (class folders or 'labels' in the .npz); "
                           "without labels use --distill")
        if y is not None and (opts.finetune_baseline or not opts.distill):
            finetuned = copy.deepcopy(student)
            ft = train_student(finetuned, None, x, y, xv, yv, DistillSettings(**{**asdict(base), "labels_only": True}))
            report["finetune"] = ft.to_dict()
            measure("fine-tuned (hard labels)", finetuned)
            if not opts.distill:
                student = finetuned
        if opts.distill:
            dr = train_student(student, teacher, x, y, xv, yv, base,
                               checkpoint=Path(opts.checkpoint) if opts.checkpoint else None)
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
