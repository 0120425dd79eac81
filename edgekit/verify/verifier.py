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

SNR_CAP_DB = 200.0
CENTRED_COSINE_SLACK = 0.01
CONSTANT_OUTPUT_POWER = 1e-10
SCORE_THRESHOLD = 0.25  # a detector's usual confidence cut: the sets of scores above it are compared
MAX_SLICE_AXIS = 128  # a channel-like axis: at most this long ...
SLICE_AXIS_RATIO = 4  # ... and at least this many times shorter than the longest non-batch axis
RANK_SAMPLES = 1 << 18  # Spearman on at most this many values per slice (an even stride through them)
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
    # Spearman rank correlation. Measured on a YOLO-style test model: healthy INT8 (head in float)
    # 0.87-0.94 and >= 0.99 (ONNX Runtime, OpenVINO, NCNN); INT8 whose shared output scale wiped the scores
    # out 0.00 and 0.00. Synthetic INT8-sized noise on score maps: >= 0.9 and >= 0.95.
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
class SliceAgreement:
    """The figures of one slice of an output (index `index` along `axis`), over all samples. None where
    a figure cannot be computed (a constant reference slice has no cosine worth the name) or does not
    apply (score IoU and rank correlation: score-like slices only); None is never judged."""

    axis: int
    index: int
    cosine: float | None
    centred_cosine: float | None
    snr_db: float | None
    max_abs_error: float
    score_like: bool = False  # the reference slice lies in [0, 1] and varies: sigmoid / softmax scores
    score_iou: float | None = None  # IoU of (ref > SCORE_THRESHOLD) and (out > SCORE_THRESHOLD)
    rank_correlation: float | None = None  # Spearman, over the slice's values
    constant: bool = False  # the reference slice does not vary at all: flagged, not judged
    failed: list[str] = field(default_factory=list)  # the figures that missed their thresholds
    note: str | None = None


@dataclass
class OutputAgreement:
    name: str
    cosine: float
    cosine_worst_sample: float
    snr_db: float
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None = None
    # Mean-centred over the samples; None where the reference output does not vary (or one sample).
    centred_cosine: float | None = None
    centred_snr_db: float | None = None
    non_finite: int = 0  # NaN/inf values in the artifact's output (FP16 overflow): fails every figure
    slice_axis: int | None = None  # the channel-like axis the output was also judged along (None: not sliced)
    slices: list[SliceAgreement] = field(default_factory=list)
    # The FP32 reference is the same for every validation sample (all zeros, a constant): nothing an
    # artifact computes from the input can be checked against it.
    constant_reference: bool = False


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_all(session: Session, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Outputs over all batches, concatenated along the sample axis, one array per model output."""
    per_batch = [session.run(feeds) for feeds in batches]
    return [np.concatenate([np.asarray(b[i], np.float64) for b in per_batch]) for i in range(len(per_batch[0]))]


def is_classifier_output(shape: tuple[int, ...]) -> bool:
    """[N, C] with C >= 2 (or [N, C, 1, 1]): one score per class."""
    inner = [d for d in shape[1:] if d != 1]
    return len(inner) == 1 and inner[0] >= 2 and len(shape) >= 2 and shape[1] == inner[0]


def slice_axis(shape: tuple[int, ...] | list[int]) -> int | None:
    """The channel-like axis of an output whose parts may live on different scales: for rank >= 3, the one
    non-batch axis of 2..MAX_SLICE_AXIS that is at least SLICE_AXIS_RATIO times shorter than the longest
    non-batch axis (the 8 of [1, 8, 2100], the 6 of [1, 3549, 6], the 3 of [1, 3, 12, 12]). None when
    there is no such axis or more than one: [N, C] classifiers, [1, 64, 8, 8] feature maps."""
    dims = [d if isinstance(d, int) else 0 for d in list(shape)[1:]]
    if len(dims) < 2 or min(dims) < 1:
        return None
    longest = max(dims)
    found = [i + 1 for i, d in enumerate(dims) if 2 <= d <= MAX_SLICE_AXIS and d * SLICE_AXIS_RATIO <= longest]
    return found[0] if len(found) == 1 else None


def compare(
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
    masks, mask_notes = foreground_masks(reference)
    agreements = [_agreement(n, r, o, m) for n, r, o, m in zip(names, reference, outputs, masks)]
    cls = next((i for i, r in enumerate(reference) if is_classifier_output(r.shape)), None)
    top1 = agreements[cls].top1_agreement if cls is not None else None
    acc = ref_acc = None
    if labels is not None and cls is not None and len(labels) == len(reference[cls]):
        ref_acc = float((_argmax(reference[cls]) == labels).mean())
        acc = float((_argmax(outputs[cls]) == labels).mean())
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
    v.failures += [f"output {a.name} has {a.non_finite} NaN/inf values" for a in agreements if a.non_finite]
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
        v.failures.append(f"the FP32 reference gives {'all zeros' if zeros else 'the same output'} for every one of "
                          f"the {len(reference[0])} validation samples: the model (untrained? a constant head?) or "
                          "the data (identical samples?) is degenerate, and no figure can tell a right artifact "
                          "from a wrong one")
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
    return v


def describe_slice(d: dict[str, Any]) -> str:
    """'output0 slice 4 (axis 1): cosine 0.9970, SNR 21.8 dB, score IoU 0.89, rank correlation 0.996' from a
    worst_slice(s) record (a dict, as in the manifest)."""
    figures = [f"{label} {format(d[k] + 0.0, fmt)}{' dB' if k == 'snr_db' else ''}"
               for k, (label, fmt) in _SLICE_FIGURES.items() if d.get(k) is not None]
    what = ", ".join(figures) or "constant: not judged"
    return f"{d['output']} slice {d['index']} (axis {d['axis']}): {what}" + (
        f" (missed: {', '.join(d['failed'])})" if d.get("failed") else "")


# figure -> (label, format); judged per slice with the same thresholds as whole outputs
_SLICE_FIGURES = {"cosine": ("cosine", ".4f"), "centred_cosine": ("mean-centred cosine", ".4f"),
                  "snr_db": ("SNR", ".1f"), "score_iou": ("score IoU", ".2f"),
                  "rank_correlation": ("rank correlation", ".3f")}


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
    for figure, (label, fmt) in _SLICE_FIGURES.items():
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
    for figure in _SLICE_FIGURES:
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


def _argmax(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).argmax(axis=1)


def is_constant(ref: np.ndarray) -> bool:
    """The output is the same for every sample (all zeros included): it does not depend on the input. Float
    rounding alone leaves a relative variation power near 1e-14, far below CONSTANT_OUTPUT_POWER."""
    r = np.asarray(ref, np.float64).reshape(len(ref), -1)
    signal = float((r**2).sum())
    return signal == 0 or (len(r) > 1 and float(((r - r.mean(axis=0)) ** 2).sum()) <= CONSTANT_OUTPUT_POWER * signal)


def _agreement(name: str, ref: np.ndarray, out: np.ndarray, judged: np.ndarray | None = None) -> OutputAgreement:
    """`judged`: a boolean array of ref's shape, the elements the figures are computed on (None: all)."""
    if ref.shape != out.shape:
        return OutputAgreement(name, -1.0, -1.0, -SNR_CAP_DB, 1e30, 1e30, None, -1.0, -SNR_CAP_DB)  # fails all
    bad = int((~np.isfinite(out)).sum())
    if bad:  # NaN compares false with every threshold: it must fail explicitly
        return OutputAgreement(name, -1.0, -1.0, -SNR_CAP_DB, 1e30, 1e30, 0.0 if is_classifier_output(ref.shape)
                               else None, -1.0, -SNR_CAP_DB, bad)
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    m = np.ones(r.shape, bool) if judged is None else judged.reshape(r.shape)
    err = (r - o) * m
    signal, noise = float((r[m] ** 2).sum()), float((err**2).sum())
    snr = _snr_db(signal, noise)
    centred_cos = centred_snr = None
    mean = r.mean(axis=0)  # per output element, over the samples
    varying = float((((r - mean) ** 2) * m).sum())
    # An output that does not depend on the input (anchors, constants) has no centred figures; float
    # rounding alone leaves a relative power near 1e-14, far below this.
    constant = is_constant(ref)
    if len(r) > 1 and not constant:
        centred_cos = _cosine((r - mean)[m], (o - mean)[m])
        centred_snr = _snr_db(varying, noise)
    axis = slice_axis(ref.shape)
    mean_power = float((r**2).mean())  # the whole output's, unmasked: each slice's rounding scale
    return OutputAgreement(
        name=name,
        cosine=_cosine(r[m], o[m]),
        # samples with nothing judged (no foreground in a box output) have no cosine, not a cosine of nothing
        cosine_worst_sample=min((_cosine(a[k], b[k]) for a, b, k in zip(r, o, m) if k.any()), default=-1.0),
        snr_db=float(snr),
        max_abs_error=float(np.abs(err).max()) if err.size else 0.0,
        mean_abs_error=float(np.abs(err).sum() / max(int(m.sum()), 1)),
        top1_agreement=float((_argmax(ref) == _argmax(out)).mean()) if is_classifier_output(ref.shape) else None,
        centred_cosine=centred_cos,
        centred_snr_db=centred_snr,
        slice_axis=axis,
        slices=[] if axis is None else [
            _slice(ref, out, axis, i, mean_power, None if judged is None else np.take(judged, i, axis=axis))
            for i in range(ref.shape[axis])],
        constant_reference=constant,
    )


def _in_unit_range(r: np.ndarray) -> bool:
    """The reference lies in [0, 1]: sigmoid / softmax scores (what makes a slice score-like)."""
    return float(r.min()) >= 0.0 and float(r.max()) <= 1.0


def _score_slices(ref: np.ndarray, axis: int) -> list[int]:
    """The slices along `axis` whose reference is score-like and varies."""
    return [i for i in range(ref.shape[axis])
            if _in_unit_range(r := np.take(ref, i, axis=axis)) and float(r.max()) > float(r.min())]


def foreground_masks(reference: list[np.ndarray]) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
    """Per output, the elements to judge (None: all), and a note per output judged on fewer.

    A detector's box values at positions (anchors) no class scores for are discarded by its score cut: no
    loss trains them (YOLOv8's DFL boxes there reach 3x the image), and under any INT8 noise they swing by
    tens of pixels while every detection stays the same. Judged there, they reject a healthy artifact;
    left out, a wrong box where something is detected still fails, and a background anchor whose score
    rises past the cut fails the score IoU. So the box-like values are judged at the positions where the
    reference's best score reaches SCORE_THRESHOLD in that sample:
    - one output holding both (YOLOv5/v8/X [N, 4+C, A] or [N, A, 5+C]): its channel-like axis has a
      contiguous block of score-like slices (reference in [0, 1] and varying) at one end, and box-like
      slices before or after it;
    - separate outputs (SSD, PicoDet: scores [N, A, C], boxes [N, A, 4]): an output whose slices are all
      score-like marks the positions for every output without score-like slices of the same positional
      shape (the shape without the channel-like axis).
    Where no position reaches the cut, everything is judged (the stricter side)."""
    masks: list[np.ndarray | None] = [None] * len(reference)
    notes: list[tuple[int, str]] = []
    layout: dict[int, tuple[int, list[int]]] = {}
    for i, ref in enumerate(reference):
        axis = slice_axis(ref.shape)
        if axis is not None and ref.shape[0] > 0:
            layout[i] = (axis, _score_slices(ref, axis))
    sources: dict[tuple[int, ...], np.ndarray] = {}
    for i, (axis, scores) in layout.items():
        n = reference[i].shape[axis]
        if len(scores) == n:
            best = reference[i].max(axis=axis) >= SCORE_THRESHOLD
            sources.setdefault(best.shape, best)

    def apply(i: int, best: np.ndarray, boxes: list[int], what: str) -> None:
        axis = layout[i][0]
        ref = reference[i]
        if not best.any():
            notes.append((i, f"{what} judged at every position: no reference score reaches {SCORE_THRESHOLD}"))
            return
        if best.all():
            return
        mask = np.ones(ref.shape, bool)
        index: list[Any] = [slice(None)] * ref.ndim
        index[axis] = boxes
        mask[tuple(index)] = np.expand_dims(best, axis)
        masks[i] = mask
        notes.append((i, f"{what} judged only at the {int(best.sum())} of {best.size} positions (over all samples) "
                         f"where a reference score reaches {SCORE_THRESHOLD}: a detector discards the rest"))

    for i, (axis, scores) in layout.items():
        n = reference[i].shape[axis]
        boxes = [k for k in range(n) if k not in scores]
        if scores and boxes and scores == list(range(scores[0], scores[-1] + 1)) and (
                scores[0] == 0 or scores[-1] == n - 1) and not _constant_slices_only(reference[i], axis, boxes):
            best = np.take(reference[i], scores, axis=axis).max(axis=axis) >= SCORE_THRESHOLD
            apply(i, best, boxes, f"slices {_span(boxes)} (axis {axis}, not score-like)")
        elif not scores:
            positions = np.take(reference[i], 0, axis=axis).shape
            if positions in sources:
                apply(i, sources[positions], list(range(n)), "its values (box-like, beside a score output)")
    return masks, notes


def _constant_slices_only(ref: np.ndarray, axis: int, index: list[int]) -> bool:
    return all(float(np.ptp(np.take(ref, k, axis=axis))) == 0.0 for k in index)


def _span(index: list[int]) -> str:
    return f"{index[0]}-{index[-1]}" if len(index) > 1 and index == list(range(index[0], index[-1] + 1)) else (
        ", ".join(map(str, index)))


def _slice(ref: np.ndarray, out: np.ndarray, axis: int, index: int, mean_power: float,
           judged: np.ndarray | None = None) -> SliceAgreement:
    """One slice's figures. `mean_power`: the whole output's mean square, the scale below which a slice's
    variation is float rounding (constant: flagged and not judged, never passed on a cosine of zeros).
    `judged`: the slice's elements the cosine, centred cosine, SNR and error are computed on (None: all)."""
    r = np.take(ref, index, axis=axis).reshape(len(ref), -1)
    o = np.take(out, index, axis=axis).reshape(len(out), -1)
    m = np.ones(r.shape, bool) if judged is None else judged.reshape(r.shape)
    err = (r - o) * m
    max_err = float(np.abs(err).max()) if err.size else 0.0
    spread = float(((r - r.mean()) ** 2).sum())
    if not r.size or spread <= CONSTANT_OUTPUT_POWER * mean_power * r.size:
        value = float(r.flat[0]) if r.size else 0.0
        return SliceAgreement(axis, index, None, None, None, max_err, constant=True,
                              note=f"constant in the reference ({value:.4g}): not judged")
    mean = r.mean(axis=0)
    varying = float((((r - mean) ** 2) * m).sum())
    centred = (_cosine((r - mean)[m], (o - mean)[m])
               if len(r) > 1 and varying > CONSTANT_OUTPUT_POWER * mean_power * m.sum() else None)
    s = SliceAgreement(axis, index, _cosine(r[m], o[m]), centred,
                       _snr_db(float((r[m] ** 2).sum()), float((err**2).sum())), max_err)
    if _in_unit_range(r):
        s.score_like = True
        above, hits = r > SCORE_THRESHOLD, o > SCORE_THRESHOLD
        if above.any():
            s.score_iou = float((above & hits).sum() / (above | hits).sum())
        else:
            s.note = f"no reference score above {SCORE_THRESHOLD}: score IoU not judged (an empty set is no pass)"
        s.rank_correlation = _spearman(r.ravel(), o.ravel())
    return s


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, tied values sharing their mean rank (an INT8 output has only 256
    levels; an output that collapsed to one value has no order left: 0), on an even stride through at
    most RANK_SAMPLES values."""
    step = max(1, -(-len(a) // RANK_SAMPLES))
    return _cosine(_ranks(a[::step]), _ranks(b[::step]))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Mean ranks (ties share theirs), centred."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    r = (first + (counts - 1) / 2.0)[inverse.ravel()]
    return r - r.mean()


def _snr_db(signal: float, noise: float) -> float:
    """Capped so identical outputs give a finite number (JSON has no infinity)."""
    if noise <= 0:
        return SNR_CAP_DB
    if signal <= 0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10 * np.log10(signal / noise)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
