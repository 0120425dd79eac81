"""Verify: run an artifact in its runtime on held-out samples and compare with the FP32 reference.

Figures per output, over all validation samples together: cosine similarity, SNR (dB), max and mean
absolute error; the same cosine and SNR mean-centred (each output element's mean over the samples
subtracted, so a large constant part of an output cannot hide that the input-dependent part is
wrong); top-1 agreement for classifier outputs; accuracy when the data has labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgekit.backends.base import Session

SNR_CAP_DB = 200.0
CENTRED_COSINE_SLACK = 0.01
CONSTANT_OUTPUT_POWER = 1e-10


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
    synthetic-noise inputs pooled outputs barely vary and it would reject healthy INT8."""
    agreements = [_agreement(n, r, o) for n, r, o in zip(names, reference, outputs)]
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
    v.passed = not v.failures
    return v


def _min_or_none(values: Any) -> float | None:
    present = [x for x in values if x is not None]
    return min(present) if present else None


def _argmax(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).argmax(axis=1)


def _agreement(name: str, ref: np.ndarray, out: np.ndarray) -> OutputAgreement:
    if ref.shape != out.shape:
        return OutputAgreement(name, -1.0, -1.0, -SNR_CAP_DB, 1e30, 1e30, None, -1.0, -SNR_CAP_DB)  # fails all
    bad = int((~np.isfinite(out)).sum())
    if bad:  # NaN compares false with every threshold: it must fail explicitly
        return OutputAgreement(name, -1.0, -1.0, -SNR_CAP_DB, 1e30, 1e30, 0.0 if is_classifier_output(ref.shape)
                               else None, -1.0, -SNR_CAP_DB, bad)
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    err = r - o
    signal, noise = float((r**2).sum()), float((err**2).sum())
    snr = _snr_db(signal, noise)
    centred_cos = centred_snr = None
    mean = r.mean(axis=0)  # per output element, over the samples
    varying = float(((r - mean) ** 2).sum())
    # An output that does not depend on the input (anchors, constants) has no centred figures; float
    # rounding alone leaves a relative power near 1e-14, far below this.
    if len(r) > 1 and varying > CONSTANT_OUTPUT_POWER * signal:
        centred_cos = _cosine((r - mean).ravel(), (o - mean).ravel())
        centred_snr = _snr_db(varying, noise)
    return OutputAgreement(
        name=name,
        cosine=_cosine(r.ravel(), o.ravel()),
        cosine_worst_sample=min(_cosine(a, b) for a, b in zip(r, o)),
        snr_db=float(snr),
        max_abs_error=float(np.abs(err).max()) if err.size else 0.0,
        mean_abs_error=float(np.abs(err).mean()) if err.size else 0.0,
        top1_agreement=float((_argmax(ref) == _argmax(out)).mean()) if is_classifier_output(ref.shape) else None,
        centred_cosine=centred_cos,
        centred_snr_db=centred_snr,
    )


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
