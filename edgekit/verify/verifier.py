"""Verify: run an artifact in its runtime on held-out samples and compare with the FP32 reference.

Figures per output, over all validation samples together: cosine similarity, SNR (dB), max and mean
absolute error; the same cosine and SNR mean-centred (each output element's mean over the samples
subtracted, so a large constant part of an output cannot hide that the input-dependent part is
wrong); top-1 agreement for classifier outputs; accuracy when the data has labels.

An output whose parts live on different scales (a detector's box coordinates in pixels concatenated
with its 0-1 class scores) is also judged part by part: per slice along its channel-like axis
(`slice_axis`), each slice gets the same figures and thresholds, so a part too small to move the
whole-output figures cannot be destroyed unnoticed. Score-like slices (the reference in [0, 1]) are
also compared on what decides detections: the overlap of the above-threshold sets and the rank order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgekit.backends.base import Session
from edgekit.tasks.evaluator import TaskResult
from edgekit.verify.metrics import (
    SLICE_FIGURES,
    OutputAgreement,
    SliceAgreement,
    agreement,
    argmax,
    foreground_masks,
    is_classifier_output,
)

CENTRED_COSINE_SLACK = 0.01

WORST_SLICES = 3  # per sliced output, in Verification.worst_slices


@dataclass
class Thresholds:
    """An artifact passes only when every figure that applies meets its threshold."""

    min_cosine: float = 0.99
    min_snr_db: float = 15.0
    min_top1_agreement: float = 0.95
    max_accuracy_drop: float = 1.0  # percentage points
    # Appended, not inserted: callers build Thresholds positionally.
    min_cosine_fp16: float = 0.999  # FP16 artifacts (cosine and mean-centred cosine): a float conversion
    # None: min_cosine - 0.01 (0.98 by default). The centred figure leaves out the mean, the part easiest
    # to get right, so it sits a little below the plain one for healthy INT8; losing the input-dependent
    # part drops it far lower. Derived, so thresholds loosened by hand stay loose.
    min_centred_cosine: float | None = None
    # Score-like slices (reference in [0, 1]): IoU of the (ref > 0.25) and (out > 0.25) sets, and the
    # Spearman rank correlation over the scores >= metrics.RANK_FLOOR. Measured on a YOLO-style test model:
    # healthy INT8 (head in float) IoU 0.87-0.94 (ONNX Runtime, OpenVINO, NCNN); YOLOv8n's healthy INT8 rank
    # correlation >= 0.95; INT8 whose shared output scale wiped the scores out 0.00 and 0.00. Synthetic
    # INT8-sized noise on score maps: >= 0.9 and >= 0.95.
    min_score_iou: float = 0.5
    min_rank_correlation: float = 0.9

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "min_centred_cosine": self.centred_cosine_for(None)}

    def cosine_for(self, precision: str | None) -> float:
        """The cosine an artifact of this precision must reach."""
        return max(self.min_cosine, self.min_cosine_fp16) if precision == "fp16" else self.min_cosine

    def centred_cosine_for(self, precision: str | None) -> float:
        base = (round(self.min_cosine - CENTRED_COSINE_SLACK, 6) if self.min_centred_cosine is None
                else self.min_centred_cosine)
        return max(base, self.min_cosine_fp16) if precision == "fp16" else base


@dataclass
class Verification:
    samples: int
    cosine_min: float
    snr_db_min: float
    max_abs_error: float
    top1_agreement: float | None
    accuracy: float | None  # fraction correct, when labels exist
    reference_accuracy: float | None
    passed: bool
    failures: list[str] = field(default_factory=list)
    outputs: list[OutputAgreement] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    diverging_layer: dict[str, Any] | None = None  # set by the debug stage when rejected
    centred_cosine_min: float | None = None
    centred_snr_db_min: float | None = None
    precision: str | None = None  # which precision's thresholds applied
    # Per-slice figures, over every sliced output (None: no output was sliced, or none has the figure).
    slice_cosine_min: float | None = None
    slice_snr_db_min: float | None = None
    score_iou_min: float | None = None
    rank_correlation_min: float | None = None
    # The worst slices of each sliced output (up to WORST_SLICES, worst first), each with its output.
    worst_slices: list[dict[str, Any]] = field(default_factory=list)
    worst_slice: dict[str, Any] | None = None  # the one closest to (or furthest past) a threshold, of all outputs
    notes: list[str] = field(default_factory=list)  # what was not judged, and why
    # The task metric (accuracy, mAP50-95, mIoU) against FP32 where there is one: it decides the verdict, and the
    # tensor figures' misses move to tensor_failures (diagnostics), binding again with --strict-tensors.
    task: TaskResult | None = None
    tensor_failures: list[str] = field(default_factory=list)
    tensor_passed: bool | None = None
    # Misses no task metric overrides: NaN/inf outputs, a reference that is the same for every sample.
    integrity_failures: list[str] = field(default_factory=list)
    # What computed these figures ("host x86_64 ..."), and the same check on the target's own arithmetic (an ARM
    # board's runtime under qemu: {where, cpu, samples, cosine_min, snr_db_min, task, passed, ...}; None: the host
    # computes as the target does). The artifact passes only if both pass.
    where: str | None = None
    isa: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_all(session: Session, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Outputs over all batches, concatenated along the sample axis, one array per model output. A session that runs
    a sample set in one call (run_batches: a simulator in another process) gets them all at once."""
    run_batches = getattr(session, "run_batches", None)
    per_batch = run_batches(batches) if callable(run_batches) else [session.run(feeds) for feeds in batches]
    return [np.concatenate([np.asarray(b[i], np.float64) for b in per_batch]) for i in range(len(per_batch[0]))]


def verify_outputs(
    reference: list[np.ndarray],
    outputs: list[np.ndarray],
    names: list[str],
    labels: np.ndarray | None,
    thresholds: Thresholds,
    precision: str | None = None,
) -> Verification:
    """Reject when any figure misses its threshold. `precision` picks the cosine thresholds (FP16
    artifacts are held to min_cosine_fp16). The mean-centred SNR is reported, not judged: on
    synthetic-noise inputs pooled outputs barely vary and it would reject healthy INT8.

    Outputs with a channel-like axis are judged per slice too (the same cosine, centred cosine and SNR
    thresholds, plus score IoU and rank correlation on score-like slices); a slice that misses fails the
    artifact, named by output, slice and axis (also when the whole output fails: the slice says where).

    Detector outputs are judged where a detector's output is used (`foreground_masks`): box-like values
    only at the positions some score in the reference reaches SCORE_THRESHOLD, scores everywhere."""
    if len(outputs) != len(reference):  # zip would compare a prefix and pass on what it never saw
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"the artifact gives {len(outputs)} output(s), the model has {len(reference)} "
                           f"({', '.join(names)}): it cannot be verified")
    masks, mask_notes = foreground_masks(reference)
    agreements = [agreement(n, r, o, m) for n, r, o, m in zip(names, reference, outputs, masks)]
    cls = next((i for i, r in enumerate(reference) if is_classifier_output(r.shape)), None)
    top1 = agreements[cls].top1_agreement if cls is not None else None
    acc = ref_acc = None
    if labels is not None and cls is not None and len(labels) == len(reference[cls]):
        ref_acc = float((argmax(reference[cls]) == labels).mean())
        acc = float((argmax(outputs[cls]) == labels).mean())
    v = Verification(
        samples=len(reference[0]),
        cosine_min=min(a.cosine for a in agreements),
        snr_db_min=min(a.snr_db for a in agreements),
        max_abs_error=max(a.max_abs_error for a in agreements),
        top1_agreement=top1,
        accuracy=acc,
        reference_accuracy=ref_acc,
        passed=True,
        outputs=agreements,
        thresholds=thresholds.to_dict(),
        centred_cosine_min=_min_or_none(a.centred_cosine for a in agreements),
        centred_snr_db_min=_min_or_none(a.centred_snr_db for a in agreements),
        precision=precision,
    )
    v.notes += [f"output {names[i]}: {note}" for i, note in mask_notes]
    t = thresholds
    v.integrity_failures += [f"output {a.name} has {a.non_finite} NaN/inf values" for a in agreements if a.non_finite]
    v.failures += v.integrity_failures
    min_cos, min_centred = t.cosine_for(precision), t.centred_cosine_for(precision)
    if v.cosine_min < min_cos:
        v.failures.append(f"cosine {v.cosine_min:.4f} < {min_cos}")
    if v.centred_cosine_min is not None and v.centred_cosine_min < min_centred:
        v.failures.append(f"mean-centred cosine {v.centred_cosine_min:.4f} < {min_centred}")
    if v.snr_db_min < t.min_snr_db:
        v.failures.append(f"SNR {v.snr_db_min:.1f} dB < {t.min_snr_db} dB")
    if top1 is not None and top1 < t.min_top1_agreement:
        v.failures.append(f"top-1 agreement {top1:.1%} < {t.min_top1_agreement:.0%}")
    if acc is not None and ref_acc is not None and (ref_acc - acc) * 100 > t.max_accuracy_drop + 1e-9:
        v.failures.append(f"accuracy {acc:.1%} is {(ref_acc - acc) * 100:.1f} points below FP32 {ref_acc:.1%} "
                          f"(max drop {t.max_accuracy_drop})")
    if all(a.constant_reference for a in agreements):
        # Figures that cannot fail verify nothing: a random-initialised model whose logits are exactly 0, or
        # validation samples that are all the same image, would pass any artifact at cosine 1.0.
        zeros = all(float(np.abs(r).max()) == 0 for r in reference)
        v.integrity_failures.append(
            f"{DEGENERATE_REFERENCE} {'all zeros' if zeros else 'the same output'} for every one of the "
            f"{len(reference[0])} validation samples: the model (untrained? a constant head?) or the data (identical "
            "samples?) is degenerate, and no figure can tell a right artifact from a wrong one")
        v.failures.append(v.integrity_failures[-1])
    limits = _slice_limits(t)
    for a in agreements:
        v.failures += _judge_slices(a, limits)
        v.notes += [f"output {a.name} slice {s.index} (axis {s.axis}): {s.note}" for s in a.slices if s.note]
    sliced = [s for a in agreements for s in a.slices]
    v.slice_cosine_min = _min_or_none(s.cosine for s in sliced)
    v.slice_snr_db_min = _min_or_none(s.snr_db for s in sliced)
    v.score_iou_min = _min_or_none(s.score_iou for s in sliced)
    v.rank_correlation_min = _min_or_none(s.rank_correlation for s in sliced)
    v.worst_slices = [{"output": a.name, **asdict(s)} for a in agreements
                      for s in sorted(a.slices, key=lambda s: _margin(s, limits))[:WORST_SLICES]]
    judged = [(a.name, s) for a in agreements for s in a.slices if not s.constant]
    if judged:
        name, worst = min(judged, key=lambda pair: _margin(pair[1], limits))
        v.worst_slice = {"output": name, **asdict(worst)}
    v.passed = not v.failures
    v.tensor_passed, v.tensor_failures = v.passed, list(v.failures)
    return v


DEGENERATE_REFERENCE = "the FP32 reference gives"  # how the failure that no artifact can mend begins


def apply_task(v: Verification, task: TaskResult, strict_tensors: bool) -> None:
    """The task metric decides: its miss fails the artifact; the tensor figures' misses stay as diagnostics
    (binding with strict_tensors). NaN/inf outputs and a degenerate reference fail whatever the metric says."""
    v.task = task
    binding = v.tensor_failures if strict_tensors else v.integrity_failures
    v.failures = list(binding)
    if not task.passed:
        v.failures.insert(0, f"{task.metric} {task.value:.2f} is {task.drop_points:.2f} points below FP32 "
                             f"{task.reference:.2f} (vs {task.vs}; max drop {task.max_drop:g})")
    v.passed = not v.failures


def headline(v: Verification) -> tuple[str, float]:
    """The figure that decided: the task metric where there is one, else the worst cosine."""
    if v.task is not None:
        return v.task.metric, v.task.value
    return "cosine", v.cosine_min


def _slice_limits(t: Thresholds) -> dict[str, float]:
    """Slices are held to the base thresholds at every precision. They are there to catch a part of an
    output destroyed while the whole looks fine (scores wiped out by a shared INT8 scale: 0.0); FP16's own
    bound (0.999) stays on the whole outputs. Per slice it measures rounding against the slice's sliver of
    input-dependent signal: healthy FP16 of PP-PicoDet gave DFL-bin slices a mean-centred cosine of
    0.9982-0.9988 on all three backends (whole outputs 0.9999+)."""
    return {"cosine": t.cosine_for(None), "centred_cosine": t.centred_cosine_for(None),
            "snr_db": t.min_snr_db, "score_iou": t.min_score_iou, "rank_correlation": t.min_rank_correlation}


def _judge_slices(a: OutputAgreement, limits: dict[str, float]) -> list[str]:
    """Mark each slice's missed figures; one failure line per figure (its worst slice, and how many miss)."""
    failures = []
    for figure, (label, fmt) in SLICE_FIGURES.items():
        missing = [s for s in a.slices if getattr(s, figure) is not None and getattr(s, figure) < limits[figure]]
        for s in missing:
            s.failed.append(figure)
        if not missing:
            continue
        worst = min(missing, key=lambda s: getattr(s, figure))
        unit = " dB" if figure == "snr_db" else ""
        more = f" ({len(missing)} of {len(a.slices)} slices miss it)" if len(missing) > 1 else ""
        failures.append(f"output {a.name} slice {worst.index} (axis {worst.axis}): {label} "
                        f"{format(getattr(worst, figure) + 0.0, fmt)}{unit} < {limits[figure]}{unit}{more}")
    return failures


def _margin(s: SliceAgreement, limits: dict[str, float]) -> float:
    """How far the slice's worst figure is above its threshold, comparable across figures (< 0: missed):
    for the 0-1 figures in units of (1 - threshold), for SNR in units of the threshold."""
    margins = []
    for figure in SLICE_FIGURES:
        value = getattr(s, figure)
        if value is None:
            continue
        limit = limits[figure]
        scale = max(abs(limit), 1.0) if figure == "snr_db" else max(1.0 - limit, 1e-6)
        margins.append((value - limit) / scale)
    return min(margins) if margins else float("inf")


def _min_or_none(values: Any) -> float | None:
    present = [x for x in values if x is not None]
    return min(present) if present else None
