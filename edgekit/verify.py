"""Verify: run an artifact in its runtime on held-out samples and compare with the FP32 reference.

Figures per output, over all validation samples together: cosine similarity, SNR (dB), max and mean
absolute error; top-1 agreement for classifier outputs; accuracy when the data has labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgekit.backends.base import Session

SNR_CAP_DB = 200.0


@dataclass
class Thresholds:
    """An artifact passes only when every figure that applies meets its threshold."""

    min_cosine: float = 0.99
    min_snr_db: float = 15.0
    min_top1_agreement: float = 0.95
    max_accuracy_drop: float = 1.0  # percentage points

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class OutputAgreement:
    name: str
    cosine: float
    cosine_worst_sample: float
    snr_db: float
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None = None


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
) -> Verification:
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
    )
    t = thresholds
    if v.cosine_min < t.min_cosine:
        v.failures.append(f"cosine {v.cosine_min:.4f} < {t.min_cosine}")
    if v.snr_db_min < t.min_snr_db:
        v.failures.append(f"SNR {v.snr_db_min:.1f} dB < {t.min_snr_db} dB")
    if top1 is not None and top1 < t.min_top1_agreement:
        v.failures.append(f"top-1 agreement {top1:.1%} < {t.min_top1_agreement:.0%}")
    if acc is not None and ref_acc is not None and (ref_acc - acc) * 100 > t.max_accuracy_drop + 1e-9:
        v.failures.append(f"accuracy {acc:.1%} is {(ref_acc - acc) * 100:.1f} points below FP32 {ref_acc:.1%} "
                          f"(max drop {t.max_accuracy_drop})")
    v.passed = not v.failures
    return v


def _argmax(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).argmax(axis=1)


def _agreement(name: str, ref: np.ndarray, out: np.ndarray) -> OutputAgreement:
    if ref.shape != out.shape:
        return OutputAgreement(name, -1.0, -1.0, -SNR_CAP_DB, 1e30, 1e30)  # shapes differ: fails all
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    err = r - o
    signal, noise = float((r**2).sum()), float((err**2).sum())
    # Capped so identical outputs give a finite number (JSON has no infinity).
    snr = min(SNR_CAP_DB, 10 * np.log10(signal / noise)) if noise > 0 else SNR_CAP_DB
    return OutputAgreement(
        name=name,
        cosine=_cosine(r.ravel(), o.ravel()),
        cosine_worst_sample=min(_cosine(a, b) for a, b in zip(r, o)),
        snr_db=float(snr),
        max_abs_error=float(np.abs(err).max()) if err.size else 0.0,
        mean_abs_error=float(np.abs(err).mean()) if err.size else 0.0,
        top1_agreement=float((_argmax(ref) == _argmax(out)).mean()) if is_classifier_output(ref.shape) else None,
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
