"""Agreement figures between an artifact's outputs and the FP32 reference's, per output and per slice:
cosine, SNR (dB), errors, the same mean-centred, top-1 agreement, and for score-like slices the overlap of
the above-threshold sets and the rank order. Pure numpy: the verifier (verifier.py) judges them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SNR_CAP_DB = 200.0

CONSTANT_OUTPUT_POWER = 1e-10

SCORE_THRESHOLD = 0.25  # a detector's usual confidence cut: the sets of scores above it are compared

MAX_SLICE_AXIS = 128  # a channel-like axis: at most this long ...

SLICE_AXIS_RATIO = 4  # ... and at least this many times shorter than the longest non-batch axis

RANK_SAMPLES = 1 << 18  # Spearman on at most this many values per slice (an even stride through them)
# Scores below this are not ranked: their order is rounding, not what the model decided. A softmax's 1e-7 tails
# in FP16 reorder among themselves (PP-OCRv4 rec FP16, cosine 0.9999: all-values rank correlation 0.72), and
# INT8 reorders a detector's faint scores at the far end of its PR curve (YOLOv8n, healthy OpenVINO INT8: 0.92
# from 1e-3 up, >= 0.95 from 1e-2 up on all three backends; a destroyed score slice: 0 either way). Fewer
# such values than RANK_MIN_VALUES in a slice: no rank figure (an empty set is no pass).
RANK_FLOOR = 1e-2
RANK_MIN_VALUES = 8


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


def describe_slice(d: dict[str, Any]) -> str:
    """'output0 slice 4 (axis 1): cosine 0.9970, SNR 21.8 dB, score IoU 0.89, rank correlation 0.996' from a
    worst_slice(s) record (a dict, as in the manifest)."""
    figures = [f"{label} {format(d[k] + 0.0, fmt)}{' dB' if k == 'snr_db' else ''}"
               for k, (label, fmt) in SLICE_FIGURES.items() if d.get(k) is not None]
    what = ", ".join(figures) or "constant: not judged"
    return f"{d['output']} slice {d['index']} (axis {d['axis']}): {what}" + (
        f" (missed: {', '.join(d['failed'])})" if d.get("failed") else "")


SLICE_FIGURES = {"cosine": ("cosine", ".4f"), "centred_cosine": ("mean-centred cosine", ".4f"),
                  "snr_db": ("SNR", ".1f"), "score_iou": ("score IoU", ".2f"),
                  "rank_correlation": ("rank correlation", ".3f")}


def argmax(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).argmax(axis=1)


def is_constant(ref: np.ndarray) -> bool:
    """The output is the same for every sample (all zeros included): it does not depend on the input. Float
    rounding alone leaves a relative variation power near 1e-14, far below CONSTANT_OUTPUT_POWER."""
    r = np.asarray(ref, np.float64).reshape(len(ref), -1)
    signal = float((r**2).sum())
    return signal == 0 or (len(r) > 1 and float(((r - r.mean(axis=0)) ** 2).sum()) <= CONSTANT_OUTPUT_POWER * signal)


def agreement(name: str, ref: np.ndarray, out: np.ndarray, judged: np.ndarray | None = None) -> OutputAgreement:
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
        top1_agreement=float((argmax(ref) == argmax(out)).mean()) if is_classifier_output(ref.shape) else None,
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
        # Ranked: the values either side puts at or above RANK_FLOOR (see there).
        live = (r >= RANK_FLOOR) | (o >= RANK_FLOOR)
        why = (f"fewer than {RANK_MIN_VALUES} scores at or above {RANK_FLOOR:g}" if int(live.sum()) < RANK_MIN_VALUES
               else "the reference's scores there are all equal (no order)" if np.ptp(r[live]) == 0 else None)
        if why is None:
            s.rank_correlation = _spearman(r[live], o[live])
        else:
            s.note = ((s.note + "; ") if s.note else "") + f"{why}: rank correlation not judged"
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
