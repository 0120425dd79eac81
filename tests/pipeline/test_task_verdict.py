"""The task metric decides the verdict; tensor figures become diagnostics (binding with --strict-tensors); the
preprocessing's geometry maps boxes between the original image and the model input exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.data import Preprocess
from edgekit.tasks.evaluator import TaskSettings, resolve_task
from edgekit.verify.verifier import Thresholds, apply_task, verify_outputs


class _Data:
    def __init__(self, labels: np.ndarray | None = None) -> None:
        self.labels, self.class_names, self.files, self.preprocess = labels, ["a", "b", "c"], None, None


def _logits(rng: np.random.Generator, n: int = 200) -> np.ndarray:
    return rng.normal(size=(n, 3)) * 3


def test_accuracy_decides_and_tensor_misses_are_diagnostics() -> None:
    rng = np.random.default_rng(0)
    ref = _logits(rng)
    labels = ref.argmax(1).copy()
    labels[:20] = (labels[:20] + 1) % 3  # FP32 at 90%
    # Same argmax everywhere, logits scaled and shifted: cosine far below 0.99, accuracy identical.
    out = ref * 0.3 + 2.0
    ev, _ = resolve_task(None, _Data(labels), TaskSettings(), [ref])
    assert ev is not None and ev.task == "classify" and ev.vs == "labels"
    v = verify_outputs([ref], [out], ["logits"], labels, Thresholds())
    assert not v.passed and v.tensor_failures
    apply_task(v, ev.result([out], [ref], 1.0, len(ref)), strict_tensors=False)
    assert v.passed and v.task is not None and v.task.value == pytest.approx(90.0) and v.task.drop_points == 0
    assert v.tensor_failures and not v.failures
    strict = verify_outputs([ref], [out], ["logits"], labels, Thresholds())
    apply_task(strict, ev.result([out], [ref], 1.0, len(ref)), strict_tensors=True)
    assert not strict.passed and strict.failures == strict.tensor_failures


def test_a_lost_point_of_accuracy_fails_and_says_so() -> None:
    rng = np.random.default_rng(1)
    ref = _logits(rng)
    out = ref.copy()
    out[:3] = -out[:3]  # 3 of 200 samples change class: 1.5 points
    labels = ref.argmax(1)
    ev, _ = resolve_task(None, _Data(labels), TaskSettings(), [ref])
    assert ev is not None and ev.vs == "labels" and ev.reference is not None and ev.reference.value == 100.0
    v = verify_outputs([ref], [out], ["logits"], labels, Thresholds())
    apply_task(v, ev.result([out], [ref], 1.0, len(ref)), strict_tensors=False)
    changed = int((out.argmax(1) != ref.argmax(1)).sum())
    assert changed >= 2 and v.task is not None and v.task.drop_points == pytest.approx(changed / 2)
    assert not v.passed and "accuracy" in v.failures[0] and "max drop 1" in v.failures[0]


def test_nan_outputs_fail_whatever_the_metric_says() -> None:
    rng = np.random.default_rng(2)
    ref = _logits(rng)
    out = ref.copy()
    out[0, 0] = np.nan  # argmax of the row still defined: the metric alone would pass it
    ev, _ = resolve_task(None, _Data(None), TaskSettings(), [ref])
    assert ev is not None
    v = verify_outputs([ref], [out], ["logits"], None, Thresholds())
    apply_task(v, ev.result([out], [ref], 100.0, len(ref)), strict_tensors=False)
    assert not v.passed and any("NaN" in f for f in v.failures)


def test_auto_leaves_a_non_classifier_to_the_tensor_figures() -> None:
    ref = np.random.default_rng(3).normal(size=(8, 16, 10, 10))
    assert resolve_task(None, _Data(None), TaskSettings(), [ref]) == (None, [])


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "center-crop"])
def test_input_frame_matches_the_resize(tmp_path: Path, resize: str) -> None:
    """A white rectangle drawn on a 300x200 image lands in the 96x128 input where input_frame says."""
    w0, h0 = 300, 200
    box = (120, 50, 210, 140)  # x1 y1 x2 y2 in the original
    a = np.zeros((h0, w0, 3), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(a).save(tmp_path / "im.png")
    pre = Preprocess(size=[96, 128], resize=resize, scale=1.0, pad_value=0)
    x = pre.apply(tmp_path / "im.png")[0]  # [H, W], the red channel
    ys, xs = np.nonzero(x > 127)
    sx, sy, ox, oy = pre.input_frame(w0, h0)
    want = np.array([box[0] * sx + ox, box[1] * sy + oy, box[2] * sx + ox, box[3] * sy + oy])
    got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
    assert np.abs(got - want).max() <= 1.0, (got, want)


def test_a_metric_that_cannot_fail_decides_nothing() -> None:
    """FP32 at 0.5% accuracy on the labels (data that does not match the model): no artifact could lose more
    than 1 point, so no task verdict: the tensor figures decide, and the note says why."""
    rng = np.random.default_rng(4)
    ref = _logits(rng)
    labels = (ref.argmax(1) + 1) % 3  # every FP32 answer wrong...
    labels[0] = ref[0].argmax()  # ...but one
    ev, notes = resolve_task(None, _Data(labels), TaskSettings(), [ref])
    assert ev is None and any("could fail" in n for n in notes)
