"""Knowledge distillation: the original model (teacher) trains the pruned one (student).

Losses, combined with weights:
- response: KL divergence between temperature-softened outputs, scaled by T^2 (Hinton et al.), mixed
  with the hard-label cross-entropy (weight 1 - alpha) when labels exist. Without labels (what most
  factory users have) it is pure distillation from the teacher's outputs. A dense output (a detector's
  [N, 4+nc, anchors], a segmenter's maps) is matched instead by MSE with each channel scaled by the teacher's
  spread of it, and judged by that fit: softmax and top-1 over its channels are a classifier's figures.
- feature hints: MSE between chosen intermediate layers, the student's mapped to the teacher's width by
  a trained adapter (FitNets): a 1x1 conv for feature maps, a Linear for vectors.
- relation (RKD): pairwise distances and angles between the samples' embeddings (the classifier's
  input; without a Linear layer the last global pool's output, else the model's outputs), so the
  student keeps the teacher's geometry, not only its answers.

The loop has an epoch and a time budget, early stopping on the validation metric (accuracy with
labels, else top-1 agreement with the teacher, or the teacher fit of a dense output), a seed for
determinism, and a checkpoint to resume.
`labels_only=True` fine-tunes with hard labels alone: the baseline that shows what distillation adds.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.compress.detect_distill import DETECT_LAYOUTS, detection_kd_loss, scores_are_logits
from edgekit.console import note, progress
from edgekit.errors import BadInput

AUGMENTATIONS = ("none", "hflip", "dihedral")
Metric = Callable[[nn.Module], tuple[str, float]]  # model -> (metric name, value; higher is better)


@dataclass
class DistillSettings:
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the teacher's soft targets; 1 - alpha on hard labels when they exist
    hint_layers: list[list[str]] = field(default_factory=list)  # [student module, teacher module] pairs
    hint_weight: float = 1.0
    relation_weight: float = 0.0  # RKD distance + angle on embeddings
    epochs: int = 20
    time_budget_s: float | None = None
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    patience: int = 6  # epochs without a better validation metric before stopping
    seed: int = 0
    augment: str = "hflip"  # none | hflip | dihedral (only where orientation carries no meaning)
    labels_only: bool = False  # hard-label fine-tuning alone (the baseline distillation is compared with)
    # A detector's decoded output layout (detect_distill.DETECT_LAYOUTS): its boxes and scores are distilled
    # by detection_kd_loss instead of the dense MSE.
    output_layout: str | None = None
    # Exponential moving average of the weights (as Ultralytics trains detectors), judged and kept instead of
    # the raw weights; None: off. Measured on the bundled detector pruned by 15 %: +3 to +7 mAP50-95 points
    # mid-run over the raw weights, whose mAP swings by points from epoch to epoch.
    ema_decay: float | None = None

    def check(self) -> None:
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise BadInput("distillation needs temperature > 0 and 0 <= alpha <= 1")
        if self.augment not in AUGMENTATIONS:
            raise BadInput(f"unknown augmentation '{self.augment}': use one of {', '.join(AUGMENTATIONS)}")


@dataclass
class DistillReport:
    settings: dict[str, Any]
    epochs_run: int
    seconds: float
    best_epoch: int
    metric: str  # accuracy | teacher_agreement
    best_metric: float
    history: list[dict[str, float]]
    stopped: str  # why the loop ended

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) on softened distributions, times T^2 so gradients keep their scale."""
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                    reduction="batchmean") * t * t


def is_dense(output: torch.Tensor) -> bool:
    """An output that is not one [N, C] row of class logits per sample (a detector's [N, 4+nc, anchors], a
    segmenter's maps): softmax over its axis 1 and top-1 of it are a classifier's figures and mean nothing there."""
    return output.dim() != 2


def dense_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Response distillation of a dense output: MSE with every channel (axis 1) divided by the teacher's spread
    of it, so a detector's pixel box rows do not drown its 0-1 score rows."""
    return F.mse_loss(student_out / scale, teacher_out / scale)


def channel_scale(teacher_out: torch.Tensor) -> torch.Tensor:
    """Per-channel (axis 1) standard deviation of the teacher's outputs, shaped to broadcast; never 0."""
    dims = [d for d in range(teacher_out.dim()) if d != 1]
    shape = [1, teacher_out.shape[1], *[1] * (teacher_out.dim() - 2)]
    return teacher_out.std(dim=dims).clamp_min(1e-6).reshape(shape)


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Relational KD (Park et al. 2019): distance-wise plus angle-wise, on a batch of embeddings."""
    def distances(e: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(e, e)
        return d / d[d > 0].mean().clamp_min(1e-8)

    def angles(e: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)

    s, t = student_emb.flatten(1), teacher_emb.flatten(1)
    return F.smooth_l1_loss(distances(s), distances(t)) + 2 * F.smooth_l1_loss(angles(s), angles(t))


class WeightAverage:
    """An exponential moving average of a model's weights (Ultralytics' ModelEMA): the decay ramps up over the
    first hundred or so steps, when the weights are still far from where they settle; buffers that are not
    floating point (BatchNorm's counters) are copied."""

    def __init__(self, model: nn.Module, decay: float, ramp: float = 50.0) -> None:
        import copy

        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        current = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(current[k].detach(), alpha=1 - d)
            else:
                v.copy_(current[k])


class _Capture:
    """Forward hooks keeping named modules' outputs (hints) and the embedding RKD compares: the input
    of a classifier Linear, or the output of a pool (`embed_of` = (module name, "input" | "output"))."""

    def __init__(self, model: nn.Module, names: list[str], embed_of: tuple[str, str] | None) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise BadInput(f"no layer named {missing[0]} (names as in model.named_modules())")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]
        if embed_of and embed_of[1] == "input":
            self.handles.append(modules[embed_of[0]].register_forward_pre_hook(
                lambda m, args: self.out.__setitem__("__embedding__", args[0])))
        elif embed_of:
            self.handles.append(modules[embed_of[0]].register_forward_hook(self._keep("__embedding__")))

    def _keep(self, name: str) -> Any:
        return lambda m, args, output: self.out.__setitem__(name, output)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _embedding_of(model: nn.Module) -> tuple[str, str] | None:
    """Where RKD reads a sample's embedding: the last Linear's input (the classifier's features), else
    the last global pool's output (a fully convolutional classifier), else None: the model's outputs."""
    modules = list(model.named_modules())
    linear = [n for n, m in modules if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1], "input"
    pools = [n for n, m in modules if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    return (pools[-1], "output") if pools else None


def _adapter(student_out: torch.Tensor, teacher_out: torch.Tensor, where: str) -> nn.Module:
    """Maps a student feature to the teacher's width: 1x1 conv for feature maps, Linear for vectors."""
    cs, ct = student_out.shape[1], teacher_out.shape[1]
    if student_out.shape[2:] != teacher_out.shape[2:]:
        raise BadInput(f"--hint {where}: the student's {list(student_out.shape[1:])} and the teacher's "
                       f"{list(teacher_out.shape[1:])} differ beyond the channels; pick layers at the same resolution")
    if student_out.dim() == 2:
        return nn.Linear(cs, ct, bias=False)
    if student_out.dim() == 4:
        return nn.Conv2d(cs, ct, 1, bias=False)
    raise BadInput(f"--hint {where}: rank-{student_out.dim()} features are not supported (use a conv or Linear layer)")


def _augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return x
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if kind == "dihedral" and x.shape[2] == x.shape[3]:
        k = int(torch.randint(0, 4, (1,), generator=gen))
        x = torch.rot90(x, k, dims=(2, 3))
    return x


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, teacher: nn.Module | None,
             batch: int = 256) -> tuple[str, float]:
    """Accuracy with labels, else top-1 agreement with the teacher; a dense output (is_dense): the teacher fit, one
    minus the per-channel-standardised squared error over the teacher's variance (1 = the teacher's outputs)."""
    model.eval()
    outs = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    if is_dense(outs):
        if teacher is None:
            raise BadInput("a dense output (not [N, classes]) is judged against the teacher, which is missing")
        teacher.eval()
        ref = torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)])
        scale = channel_scale(ref)
        dims = [d for d in range(ref.dim()) if d != 1]
        centred = (ref - ref.mean(dim=dims, keepdim=True)) / scale
        return "teacher_fit", float(1 - ((outs - ref) / scale).pow(2).mean() / centred.pow(2).mean().clamp_min(1e-12))
    pred = outs.argmax(1)
    if y is not None:
        return "accuracy", float((pred == y).float().mean())
    if teacher is None:
        raise BadInput("without labels, the validation metric is agreement with a teacher")
    teacher.eval()
    ref = torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)]).argmax(1)
    return "teacher_agreement", float((pred == ref).float().mean())


def train_student(student: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor | None,
                  xv: torch.Tensor, yv: torch.Tensor | None, settings: DistillSettings,
                  checkpoint: Path | None = None, metric: Metric | None = None) -> DistillReport:
    """Train `student` in place (its best validation state is kept). `teacher` may be None only with
    labels_only. A checkpoint file, if given, is resumed from when present and updated every epoch. `metric`
    (the task's own figure, e.g. mAP50-95 against the labels) picks the best epoch instead of evaluate()."""
    settings.check()
    judge = metric or (lambda model: evaluate(model, xv, yv, teacher))
    if settings.labels_only and y is None:
        raise BadInput("fine-tuning with hard labels needs labelled training data")
    if not settings.labels_only and teacher is None:
        raise BadInput("distillation needs the teacher (the original model)")
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    adapters = nn.ModuleDict()
    s_cap = t_cap = None
    use_hints = bool(settings.hint_layers) and not settings.labels_only
    use_rkd = settings.relation_weight > 0 and not settings.labels_only
    if use_hints or use_rkd:
        s_names = [p[0] for p in settings.hint_layers] if use_hints else []
        t_names = [p[1] for p in settings.hint_layers] if use_hints else []
        s_cap = _Capture(student, s_names, _embedding_of(student) if use_rkd else None)
        t_cap = _Capture(teacher, t_names, _embedding_of(teacher) if use_rkd else None)
        if use_hints:  # adapters sized on one probe batch
            with torch.no_grad():
                student.eval()
                teacher.eval()
                student(x[:2])
                teacher(x[:2])
            for s_name, t_name in settings.hint_layers:
                adapters[s_name.replace(".", "_")] = _adapter(s_cap.out[s_name], t_cap.out[t_name],
                                                              f"{s_name}:{t_name}")
    scale = None  # a dense output's per-channel spread on the training data, for dense_loss
    if teacher is not None and not settings.labels_only:
        with torch.no_grad():
            teacher.eval()
            probe = torch.cat([teacher(x[i:i + 256]) for i in range(0, min(len(x), 1024), 256)])
        scale = channel_scale(probe) if is_dense(probe) else None
    detect = scale is not None and settings.output_layout in DETECT_LAYOUTS
    score_logits = detect and scores_are_logits(probe, str(settings.output_layout))
    params = list(student.parameters()) + list(adapters.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = (len(x) + settings.batch - 1) // settings.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch,
                                                pct_start=0.15)
    start_epoch, history = 0, []
    ema = WeightAverage(student, settings.ema_decay) if settings.ema_decay else None
    judged = ema.model if ema else student  # the weights evaluated, kept and returned
    metric_name, best = judge(judged)
    best_epoch, best_state = 0, {k: v.clone() for k, v in student.state_dict().items()}
    if checkpoint is not None and Path(checkpoint).exists():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        student.load_state_dict(ck["student"])
        if ema is not None and "ema" in ck:
            ema.model.load_state_dict(ck["ema"])
            ema.updates = ck["ema_updates"]
        adapters.load_state_dict(ck["adapters"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, history, best, best_epoch = ck["epoch"], ck["history"], ck["best"], ck["best_epoch"]
        if ck.get("epochs") == settings.epochs:
            sched.load_state_dict(ck["scheduler"])
        else:  # a longer budget: the schedule is re-planned and fast-forwarded to where training is
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(start_epoch * steps_per_epoch):
                    sched.step()
        best_state = ck["best_state"]
        gen.set_state(ck["generator"])
        note(f"resumed from {checkpoint} at epoch {start_epoch}")
    t0, stopped = time.perf_counter(), "epoch budget"
    with progress() as bar:
        task = bar.add_task("fine-tuning" if settings.labels_only else "distilling",
                            total=settings.epochs, completed=start_epoch)
        for epoch in range(start_epoch, settings.epochs):
            student.train()
            if teacher is not None:
                teacher.eval()
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), settings.batch):
                idx = order[i:i + settings.batch]
                xb = _augment(x[idx], settings.augment, gen)
                out = student(xb)
                if settings.labels_only:
                    loss = F.cross_entropy(out, y[idx])
                else:
                    with torch.no_grad():
                        t_out = teacher(xb)
                    # a dense output has no hard labels to mix with here: the teacher's outputs are all it learns
                    if detect:
                        loss = detection_kd_loss(out, t_out, str(settings.output_layout), score_logits)
                    elif scale is not None:
                        loss = dense_loss(out, t_out, scale)
                    else:
                        loss = settings.alpha * kd_loss(out, t_out, settings.temperature)
                    if y is not None and scale is None:
                        loss = loss + (1 - settings.alpha) * F.cross_entropy(out, y[idx])
                    if use_hints:
                        for s_name, t_name in settings.hint_layers:
                            mapped = adapters[s_name.replace(".", "_")](s_cap.out[s_name])
                            loss = loss + settings.hint_weight * F.mse_loss(mapped, t_cap.out[t_name])
                    if use_rkd:  # no embedding layer found: the outputs themselves
                        loss = loss + settings.relation_weight * rkd_loss(s_cap.out.get("__embedding__", out),
                                                                          t_cap.out.get("__embedding__", t_out))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(student)
                total += float(loss.detach()) * len(idx)
            metric_name, value = judge(judged)
            history.append({"epoch": epoch + 1, "loss": round(total / len(x), 5), metric_name: round(value, 5)})
            if value > best:
                best, best_epoch = value, epoch + 1
                best_state = {k: v.clone() for k, v in judged.state_dict().items()}
            bar.update(task, advance=1, description=f"{'fine-tuning' if settings.labels_only else 'distilling'} "
                                                    f"{metric_name} {value:.4f} (best {best:.4f})")
            if checkpoint is not None:
                torch.save({"student": student.state_dict(), "adapters": adapters.state_dict(),
                            **({"ema": ema.model.state_dict(), "ema_updates": ema.updates} if ema else {}),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                            "epochs": settings.epochs,
                            "history": history, "best": best, "best_epoch": best_epoch, "best_state": best_state,
                            "generator": gen.get_state()}, checkpoint)
            # Counted from the start too: a run that never beats the starting model stops (and keeps it).
            if epoch + 1 - best_epoch >= settings.patience:
                stopped = f"no better {metric_name} for {settings.patience} epochs"
                break
            if settings.time_budget_s is not None and time.perf_counter() - t0 > settings.time_budget_s:
                stopped = f"time budget {settings.time_budget_s:g} s"
                break
    for cap in (s_cap, t_cap):
        if cap is not None:
            cap.close()
    student.load_state_dict(best_state)
    student.eval()
    return DistillReport(asdict(settings), len(history), round(time.perf_counter() - t0, 1), best_epoch, metric_name,
                         round(best, 5), history, stopped)
