"""Quantization-aware training: a short fine-tune with fake quantization, exported as a Q/DQ ONNX.

The library is NNCF's PyTorch QAT (`nncf.quantize` on a torch module gives a model with trainable
FakeQuantize hooks initialised by post-training calibration; fine-tuning it is NNCF's documented QAT
flow). Chosen because it is the path that works end to end with the pinned torch 2.13 here:
- PT2E (`prepare_qat_pt2e` / `convert_pt2e`) left torch itself: torch 2.13 has no
  torch.ao.quantization.quantize_pt2e and no torch.ao.quantization.quantizer (X86Inductor / XNNPACK);
  they live in torchao now, which is not installed and whose compiled parts are built per torch release.
- NNCF needs nothing new. Its quantizers export themselves as ONNX QuantizeLinear/DequantizeLinear pairs
  (`QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS`, each quantizer's own `set_export_mode`) through
  the TorchScript exporter, with the learned scales. The float weights it writes are replaced by NNCF's own
  int8 codes, and ONNX Runtime, running the file, must compute what the fake-quantized torch model does
  (edgekit.quantize.qat_export says why and how closely). `nncf.strip(..., NATIVE)` would go through torch's
  FakeQuantize but imports torchao, so it is not used.
NNCF compiles its CPU fake-quantize kernels (a C++ extension) on first use, once per machine (62 s on 2
busy cores, cached under ~/.cache/torch_extensions); its 60 s load timeout is raised to 300 s for that.

Teacher: the FP32 model. Loss: with hard labels and a classifier output, cross-entropy plus distillation
(edgekit.compress.distill.kd_loss); otherwise distillation on the raw outputs, an MSE per output with each
channel-like slice (verify.metrics.slice_axis: box rows, score rows) divided by the teacher's std over
the training set, so boxes in pixels do not drown 0-1 scores. Quantizer scales are trained with a step
relative to their size (an outlier-stretched scale must move by orders of magnitude in a few epochs).
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.console import progress
from edgekit.errors import BadInput, EdgekitError
from edgekit.quantize.qat_export import export, library, quantizers

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec

BATCH = 32
LR = 1e-5  # weights (Adam): NNCF's QAT guidance; 1e-4 already undid the calibration on a small ResNet (loss x5)
SCALE_LR = 0.05  # activation quantizer scales: Adam's step as a fraction of the scale's current size
WEIGHT_SCALE_LR = 0.005  # weight quantizers' (per-channel) scales: a scale clipping its weights freezes them
ALPHA = 0.7  # weight of distillation when hard labels exist (as DistillSettings.alpha)
TEMPERATURE = 4.0


@dataclass
class QATResult:
    qdq_onnx: Path
    epochs: int
    steps: int
    seconds: float
    library: str
    loss_first: float
    loss_last: float


def quantization_aware_training(spec: ModelSpec, train: Dataset, calibration: Dataset, epochs: int, out: Path,
                                *, seed: int = 0, budget_s: float | None = None,
                                labels: np.ndarray | None = None, threads: int | None = None) -> QATResult:
    """Fine-tune `spec`'s model with NNCF fake quantization on `train` and write the Q/DQ ONNX to `out`
    (same input/output names and shapes as spec). Quantizer ranges start from `calibration`; hard labels are
    `labels`, else train.labels. `threads`: torch's intra-op threads meanwhile (the build's --threads; on a
    busy machine fewer run faster: 22 s with 1 against 90 s with 2 on 2 shared cores, measured)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(spec, train, calibration, epochs, out, seed, budget_s, labels)
    finally:
        torch.set_num_threads(previous)


def _train(spec: ModelSpec, train: Dataset, calibration: Dataset, epochs: int, out: Path, seed: int,
           budget_s: float | None, labels: np.ndarray | None) -> QATResult:
    if epochs < 1:
        raise BadInput(f"--qat-epochs must be at least 1, got {epochs}")
    if len(train) == 0 or len(calibration) == 0:
        raise BadInput("quantization-aware training needs training and calibration samples")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    teacher = _wrap(_fold_batchnorm(_source_module(spec)), spec).eval()  # only ever run under no_grad
    x = _tensors(train, spec)
    batch = _batch_size(teacher, spec, x)
    if batch == _spec_batch(spec):  # fixed batch: whole batches only
        x = [a[: len(a) - len(a) % batch] for a in x]
        if not len(x[0]):
            raise BadInput(f"quantization-aware training needs at least {batch} samples (the model's batch)")
    classifier = _classifier_output(spec)
    y = labels if labels is not None else train.labels
    hard = None
    if y is not None and classifier is not None:
        hard = torch.from_numpy(np.asarray(y, np.int64)[: len(x[0])])
        if len(hard) != len(x[0]):
            raise BadInput(f"{len(y)} training labels for {len(train)} training samples")
    xc = _tensors(calibration, spec)
    with torch.no_grad():  # the loss's per-slice scales, from the teacher's outputs on the calibration samples
        weights = [_slice_weights(t, o.shape) for t, o in zip(_chunked(teacher, xc, batch), spec.outputs)]
    student = _quantize(teacher, xc, batch)
    opt = torch.optim.Adam(_param_groups(student))
    total = epochs * ((len(x[0]) + batch - 1) // batch)
    history: list[float] = []  # mean loss per epoch
    steps = 0
    with progress() as bar:
        task = bar.add_task("quantization-aware training", total=epochs)
        for _ in range(epochs):
            _train_mode(student)
            order = torch.randperm(len(x[0]), generator=gen)
            seen, summed, over = 0, 0.0, False
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                xb = [a[idx] for a in x]
                with torch.no_grad():  # the teacher's outputs batch by batch: a detector's for 2000 images are GBs
                    targets = teacher(*xb)
                loss = _loss(student(*xb), targets, weights, hard[idx] if hard is not None else None, classifier)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _set_rates(opt, 0.5 * (1 + np.cos(np.pi * steps / total)))  # cosine decay over the planned steps
                opt.step()
                steps, seen, summed = steps + 1, seen + len(idx), summed + float(loss.detach()) * len(idx)
                over = budget_s is not None and time.perf_counter() - t0 > budget_s
                if over:
                    break
            history.append(summed / seen)
            bar.update(task, advance=1, description=f"quantization-aware training loss {history[-1]:.4g}")
            if over:
                break
    student.eval()
    export(student, teacher, spec, xc, out)
    return QATResult(out, len(history), steps, round(time.perf_counter() - t0, 2), library(), history[0], history[-1])


def _tensors(data: Dataset, spec: ModelSpec) -> list[torch.Tensor]:
    missing = [i.name for i in spec.inputs if i.name not in data.inputs]
    if missing:
        raise BadInput(f"the training data has no array for input(s) {', '.join(missing)}")
    return [torch.from_numpy(np.ascontiguousarray(data.inputs[i.name])) for i in spec.inputs]


# ---------------------------------------------------------------- the model


class _Outputs(nn.Module):
    """The model with its outputs as a flat tuple in spec order. Also gives NNCF a module of its own to hang
    its hooks on: a top-level nn.Sequential would run NNCF's hook storage as one of its layers."""

    def __init__(self, net: nn.Module, count: int) -> None:
        super().__init__()
        self.net, self.count = net, count

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = _flatten(self.net(*inputs))
        if len(flat) != self.count:
            raise BadInput(f"the PyTorch model returns {len(flat)} tensors but its ONNX has {self.count} outputs")
        return tuple(flat)


def _wrap(net: nn.Module, spec: ModelSpec) -> _Outputs:
    """_Outputs whose forward names one parameter per model input: NNCF quantizes named tensor arguments only
    (a *inputs tuple would leave the first layer's input unquantized, and that layer in float)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ["self", *[f"input{i}" for i in range(len(spec.inputs))]]]

    def forward(self: _Outputs, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _Outputs.forward(self, *inputs)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cls = type("QATModel", (_Outputs,), {"forward": forward})
    return cls(net, len(spec.outputs))


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return [out]


def _source_module(spec: ModelSpec) -> nn.Module:
    """The user's factory and weights when the model came from PyTorch, else the ONNX converted to torch."""
    from edgekit.compress.stage import source_module

    return source_module(spec).float().eval()


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """Conv+BatchNorm folded (what the canonical ONNX holds): a BatchNorm after a fake-quantized weight
    would keep ONNX Runtime from fusing it, and the Conv from running in INT8. Untraceable: as it is
    (BatchNorm frozen in eval mode while training)."""
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model.eval())
    except Exception:
        return model


def _spec_batch(spec: ModelSpec) -> int:
    return max(1, spec.inputs[0].shape[0])


def _batch_size(model: nn.Module, spec: ModelSpec, x: list[Any]) -> int:
    """BATCH samples per step when the model computes each sample on its own at that batch (a Reshape the
    ONNX baked to batch 1 would mix them), else the model's own batch."""
    b0, n = _spec_batch(spec), min(BATCH, len(x[0]))
    if n <= b0:
        return b0
    with torch.no_grad():
        try:
            many = model(*[a[:n] for a in x])
            one = model(*[a[:b0] for a in x])
        except Exception:
            return b0
    ok = all(m.shape[0] == n and m.shape[1:] == o.shape[1:] and torch.allclose(m[:b0], o, rtol=1e-4, atol=1e-5)
             for m, o in zip(many, one))
    return n if ok else b0


def _chunked(model: nn.Module, x: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """The model's outputs over the samples, whole batches only (a fixed-batch model takes nothing else)."""
    n = max(batch, len(x[0]) - len(x[0]) % batch)
    parts = [model(*[a[i:i + batch] for a in x]) for i in range(0, n, batch)]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def _classifier_output(spec: ModelSpec) -> int | None:
    from edgekit.verify.metrics import is_classifier_output

    return next((i for i, o in enumerate(spec.outputs) if is_classifier_output(tuple(o.shape))), None)


def _slice_weights(t: Any, shape: list[int]) -> Any:
    """1 / (the teacher's std) per channel-like slice of an output (one std for the whole output when it has
    no such axis), broadcastable against a batch of it."""
    from edgekit.verify.metrics import slice_axis

    axis = slice_axis(shape)
    if axis is None:
        std = t.std().reshape([1] * t.dim())
    else:
        dims = [d for d in range(t.dim()) if d != axis]
        std = t.std(dim=dims, keepdim=True)
    floor = torch.clamp(t.std(), min=1e-8) * 1e-3  # a constant slice is not blown up
    return 1.0 / torch.clamp(std, min=float(floor))


def _quantize(teacher: nn.Module, xc: list[Any], batch: int) -> nn.Module:
    """NNCF's post-training quantization as the QAT starting point: FakeQuantize hooks on weights and
    activations with calibrated ranges (NNCF's CPU scheme: per-channel symmetric weights, per-tensor
    activations), all trainable."""
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "300")  # the first use compiles NNCF's kernels (~60 s)
    from edgekit.quantize import import_nncf

    nncf = import_nncf()

    items = [tuple(a[i:i + batch] for a in xc) for i in range(0, len(xc[0]) - batch + 1, batch)] or \
        [tuple(a[:batch] for a in xc)]
    try:
        return nncf.quantize(teacher, nncf.Dataset(items), subset_size=len(items),
                             target_device=nncf.TargetDevice.CPU)
    except BadInput:
        raise
    except Exception as e:
        fix = next((ln.strip() for ln in str(e).splitlines() if "rm -rf" in ln), "")  # a build killed half-way
        raise EdgekitError(f"nncf.quantize (torch) failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                           + (f" (a stale lock of NNCF's kernel build: run `{fix}`)" if fix else "")) from None


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The weights, then one group per quantizer parameter (its scale), marked `relative`."""
    own: set[int] = set()
    groups: list[dict[str, Any]] = []
    for q in quantizers(model):
        rate = WEIGHT_SCALE_LR if q.per_channel else SCALE_LR
        for p in q.parameters():
            if p.requires_grad and id(p) not in own:
                own.add(id(p))
                groups.append({"params": [p], "lr": rate, "relative": rate})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    return [{"params": rest, "lr": LR, "relative": 0.0}, *groups]


def _set_rates(opt: torch.optim.Optimizer, factor: float) -> None:
    """Weights at LR; a quantizer's scale at SCALE_LR times its current size: Adam steps by about the rate
    whatever the gradient, so one rate cannot serve a scale of 0.01 and one of 1000 (an outlier-stretched
    range must shrink by orders of magnitude within a few epochs: steps proportional to it, as in log space)."""
    for g in opt.param_groups:
        if g["relative"]:
            g["lr"] = g["relative"] * factor * max(float(g["params"][0].detach().abs().mean()), 1e-8)
        else:
            g["lr"] = LR * factor


def _train_mode(model: nn.Module) -> None:
    """Train mode for NNCF's quantizers; BatchNorm (its statistics) and Dropout stay as at inference: a short
    fine-tune on few samples must not re-estimate statistics or add noise to the distillation targets."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()


def _loss(outs: tuple[Any, ...], targets: list[Any], weights: list[Any], labels: Any, classifier: int | None) -> Any:
    from edgekit.compress.distill import kd_loss

    loss = sum(F.mse_loss(o * w, t * w) for o, t, w in zip(outs, targets, weights))
    if labels is not None and classifier is not None:
        logits, ref = outs[classifier].flatten(1), targets[classifier].flatten(1)
        loss = loss + ALPHA * kd_loss(logits, ref, TEMPERATURE) + (1 - ALPHA) * F.cross_entropy(logits, labels)
    return loss
