from __future__ import annotations

import numpy as np
import pytest

from edgekit.verify.metrics import is_classifier_output
from edgekit.verify.verifier import Thresholds
from edgekit.verify.verifier import verify_outputs as compare


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
    x = np.random.default_rng(0).standard_normal((3, 5))
    v = compare([x], [x], ["y"], None, Thresholds())
    assert v.cosine_min == pytest.approx(1.0) and v.snr_db_min == 200.0 and v.passed
    ones = np.ones((3, 5))  # the same figures, but a reference that never varies verifies nothing
    v = compare([ones], [ones], ["y"], None, Thresholds())
    assert v.snr_db_min == 200.0 and not v.passed and "degenerate" in v.failures[-1]


def test_mean_centred_cosine_is_not_fooled_by_a_constant_offset() -> None:
    """Detector-style scores: ~0.5 everywhere, the input-dependent part small. Plain cosine and SNR are
    dominated by the constant; the mean-centred cosine sees what is left of the part that matters."""
    rng = np.random.default_rng(0)
    varying = rng.standard_normal((64, 3, 12, 12)) * 0.02
    ref = 0.5 + varying
    noisy = ref + rng.standard_normal(ref.shape) * 0.02  # error as large as the input-dependent part
    constant = np.broadcast_to(ref.mean(axis=0), ref.shape)  # ignores its input entirely
    for out, centred in ((noisy, 0.71), (constant, 0.0)):
        v = compare([ref], [out], ["scores"], None, Thresholds())
        assert v.cosine_min > 0.998 and v.snr_db_min > 25  # what plain figures say: fine
        assert v.centred_cosine_min == pytest.approx(centred, abs=0.03)
        assert v.centred_snr_db_min < 1 and not v.passed
        assert v.failures[0] == f"mean-centred cosine {v.centred_cosine_min:.4f} < 0.98"
        # and where: the slices that miss (the output is [N, 3, 12, 12], sliced per channel)
        assert v.failures[1:] and all(f.startswith("output scores slice ") for f in v.failures[1:])
    good = ref + rng.standard_normal(ref.shape) * 0.001
    v = compare([ref], [good], ["scores"], None, Thresholds())
    assert v.passed and v.centred_cosine_min > 0.998 and v.centred_snr_db_min == pytest.approx(26, abs=0.5)


def test_fp16_artifacts_are_held_to_their_own_cosine() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 64))
    out = ref + rng.standard_normal(ref.shape) * 0.07  # cosine ~0.9976
    assert compare([ref], [out], ["y"], None, Thresholds(), "int8").passed
    v = compare([ref], [out], ["y"], None, Thresholds(), "fp16")
    assert not v.passed and v.precision == "fp16"
    assert v.failures == [f"cosine {v.cosine_min:.4f} < 0.999",
                          f"mean-centred cosine {v.centred_cosine_min:.4f} < 0.999"]
    assert compare([ref], [out], ["y"], None, Thresholds(min_cosine_fp16=0.99), "fp16").passed


def test_input_independent_output_has_no_centred_figures() -> None:
    anchors = np.tile(np.linspace(0, 1, 40), (10, 1))  # the same for every sample
    scores = np.random.default_rng(0).standard_normal((10, 40))  # beside an output that depends on the input
    v = compare([anchors, scores], [anchors + 1e-4, scores], ["anchors", "scores"], None, Thresholds())
    assert v.outputs[0].centred_cosine is None and v.outputs[1].centred_cosine is not None and v.passed


def test_nan_outputs_fail() -> None:
    ref = np.random.default_rng(0).standard_normal((8, 3, 4, 4))
    out = ref.copy()
    out[0, 0, 0, 0] = np.nan
    v = compare([ref], [out], ["boxes"], None, Thresholds())
    assert not v.passed and v.cosine_min == -1.0 and "output boxes has 1 NaN/inf values" in v.failures


def test_centred_threshold_follows_min_cosine_unless_set() -> None:
    rng = np.random.default_rng(0)
    ref = 5.0 + rng.standard_normal((40, 4, 4)) * 0.1
    out = ref + rng.standard_normal(ref.shape) * 0.03  # centred cosine ~0.96, plain ~0.99998
    assert Thresholds().to_dict()["min_centred_cosine"] == 0.98
    assert not compare([ref], [out], ["y"], None, Thresholds()).passed
    assert compare([ref], [out], ["y"], None, Thresholds(min_cosine=0.9)).passed  # loosened by hand: 0.89
    assert not compare([ref], [out], ["y"], None, Thresholds(min_cosine=0.9, min_centred_cosine=0.97)).passed


def test_a_reference_that_ignores_its_input_verifies_nothing() -> None:
    """An untrained model whose logits are exactly 0 (or the same for every sample): any artifact would
    score cosine 1.0 and SNR 200 dB against it, so it must be rejected as unverifiable, not passed."""
    zeros = np.zeros((20, 10))
    v = compare([zeros], [zeros.copy()], ["logits"], None, Thresholds())
    assert not v.passed and "all zeros" in v.failures[-1] and "degenerate" in v.failures[-1]
    same = np.tile(np.arange(10.0), (20, 1))
    v = compare([same], [same.copy()], ["logits"], None, Thresholds())
    assert not v.passed and "the same output" in v.failures[-1]
    # One input-independent output beside one that varies (anchors next to scores) is fine.
    rng = np.random.default_rng(0)
    varying = rng.standard_normal((20, 10))
    v = compare([same, varying], [same.copy(), varying + 1e-4], ["anchors", "scores"], None, Thresholds())
    assert v.passed, v.failures
