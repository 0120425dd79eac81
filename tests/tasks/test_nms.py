"""nms() against a brute-force, per-class, one-box-at-a-time reference on random clustered boxes."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.tasks.nms import box_iou, nms
from edgekit.tasks.types import Boxes


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference(c: Boxes, iou: float, conf: float, max_det: int, max_nms: int) -> list[int]:
    """Indices kept: filter, top max_nms, then for each class separately keep a box when no kept box of that
    class overlaps it by more than `iou`; merge, best first, cut at max_det."""
    order = sorted((i for i in range(len(c)) if c.scores[i] > conf), key=lambda i: -c.scores[i])[:max_nms]
    kept: list[int] = []
    for i in order:
        if all(c.classes[j] != c.classes[i] or _iou(c.xyxy[i].tolist(), c.xyxy[j].tolist()) <= iou for j in kept):
            kept.append(i)
    return sorted(kept, key=lambda i: -c.scores[i])[:max_det]


def _clustered(rng: np.random.Generator, n: int, classes: int) -> Boxes:
    """Boxes around a few centres, so that many overlap (and NMS has work to do)."""
    centres = rng.uniform(50, 600, (8, 2))
    pick = centres[rng.integers(0, 8, n)] + rng.normal(0, 15, (n, 2))
    wh = rng.uniform(20, 120, (n, 2))
    xyxy = np.concatenate([pick - wh / 2, pick + wh / 2], axis=1)
    return Boxes(xyxy, rng.integers(0, classes, n), rng.random(n))


@pytest.mark.parametrize(("seed", "iou", "conf", "max_det", "max_nms"), [
    (0, 0.7, 0.001, 300, 30000), (1, 0.5, 0.25, 300, 30000), (2, 0.3, 0.001, 20, 30000),
    (3, 0.6, 0.001, 300, 150), (4, 0.45, 0.1, 7, 90)])
def test_nms_keeps_what_brute_force_keeps(seed: int, iou: float, conf: float, max_det: int, max_nms: int) -> None:
    rng = np.random.default_rng(seed)
    c = _clustered(rng, 400, classes=3)
    got = nms(c, iou=iou, conf=conf, max_det=max_det, max_nms=max_nms)
    ref = c.take(_reference(c, iou, conf, max_det, max_nms))
    assert 5 <= len(ref) < 0.9 * np.sum(c.scores > conf) or len(ref) == max_det  # something was suppressed
    assert len(got) == len(ref)
    np.testing.assert_array_equal(got.scores, ref.scores)  # same boxes (scores are unique), same order
    np.testing.assert_array_equal(got.xyxy, ref.xyxy)
    np.testing.assert_array_equal(got.classes, ref.classes)
    assert np.all(np.diff(got.scores) <= 0)


def test_nms_is_class_aware_and_drops_broken_boxes() -> None:
    xyxy = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [0, 0, np.nan, 5], [0, 0, 10, 10]], float)
    c = Boxes(xyxy, np.array([0, 0, 1, 0, 0]), np.array([0.9, 0.8, 0.7, 0.95, np.nan]))
    got = nms(c, iou=0.5)
    # Box 1 overlaps box 0 (IoU 0.81) in its class; box 2 is the same square in another class: kept.
    assert got.scores.tolist() == [0.9, 0.7] and got.classes.tolist() == [0, 1]
    assert len(nms(c, conf=0.95)) == 0 and len(nms(Boxes.empty())) == 0


def test_box_iou_matrix() -> None:
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], float)
    b = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [3, 3, 3, 3]], float)
    np.testing.assert_allclose(box_iou(a, b), [[1, 0, 0], [25 / 175, 25 / 175, 0]])
