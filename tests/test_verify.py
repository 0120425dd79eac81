from __future__ import annotations

import numpy as np
import pytest

from edgekit.verify import Thresholds, compare, is_classifier_output


def test_metrics_on_known_errors() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((100, 10))
    noise = rng.standard_normal((100, 10)) * 0.1  # SNR = 20 dB by construction (power ratio 100)
    v = compare([ref], [ref + noise], ["y"], None, Thresholds())
    assert v.snr_db_min == pytest.approx(10 * np.log10((ref**2).sum() / (noise**2).sum()))
    assert 19 < v.snr_db_min < 21
    assert v.cosine_min == pytest.approx(float((ref * (ref + noise)).sum()
                                               / np.linalg.norm(ref) / np.linalg.norm(ref + noise)))
    assert v.max_abs_error == pytest.approx(np.abs(noise).max())
    # cosine and SNR pass; 20 dB noise on near-tied random scores flips some top-1s, and that is caught
    assert v.top1_agreement is not None and v.top1_agreement < 0.95
    assert v.failures == [f"top-1 agreement {v.top1_agreement:.1%} < 95%"]


def test_top1_accuracy_and_rejection_reasons() -> None:
    ref = np.eye(4)[np.arange(100) % 4] * 5.0
    labels = np.arange(100) % 4
    wrong = ref.copy()
    wrong[:10] = np.roll(wrong[:10], 1, axis=1)  # 10 samples change their top-1
    v = compare([ref], [wrong], ["logits"], labels, Thresholds())
    assert v.top1_agreement == pytest.approx(0.9)
    assert v.reference_accuracy == 1.0 and v.accuracy == pytest.approx(0.9)
    assert not v.passed
    assert any("top-1 agreement 90.0%" in f for f in v.failures)
    assert any("10.0 points below FP32" in f for f in v.failures)


def test_classifier_detection() -> None:
    assert is_classifier_output((1, 1000)) and is_classifier_output((8, 4, 1, 1))
    assert not is_classifier_output((1, 84, 8400)) and not is_classifier_output((1, 1))


def test_identical_outputs_are_finite() -> None:
    x = np.ones((3, 5))
    v = compare([x], [x], ["y"], None, Thresholds())
    assert v.cosine_min == pytest.approx(1.0) and v.snr_db_min == 200.0 and v.passed
