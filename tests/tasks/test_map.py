"""evaluate_detections against pycocotools and faster-coco-eval run by hand on files, and on known answers."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import BadInput
from edgekit.tasks.coco import evaluate_detections
from edgekit.tasks.types import Boxes

NUM_CLASSES = 3


def _random_set(seed: int, images: int = 20) -> tuple[list[Boxes], list[Boxes], list[tuple[int, int]]]:
    """Ground truth, and predictions a fair detector would make: jittered true boxes (some missed, some with the
    wrong class), plus false positives; scores continuous, so no two tie."""
    rng = np.random.default_rng(seed)
    truth, preds, sizes = [], [], []
    for _ in range(images):
        w, h = int(rng.integers(200, 800)), int(rng.integers(200, 800))
        k = int(rng.integers(0, 8))
        x1 = rng.uniform(0, w * 0.7, k)
        y1 = rng.uniform(0, h * 0.7, k)
        bw = rng.uniform(8, w * 0.3, k)
        bh = rng.uniform(8, h * 0.3, k)
        gt = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)
        cls = rng.integers(0, NUM_CLASSES, k)
        truth.append(Boxes(gt, cls))
        found = rng.random(k) > 0.2
        jitter = rng.normal(0, 0.08, (k, 4)) * np.stack([bw, bh, bw, bh], axis=1)
        p_cls = np.where(rng.random(k) < 0.1, (cls + 1) % NUM_CLASSES, cls)
        n_fp = int(rng.integers(0, 4))
        fx, fy = rng.uniform(0, w * 0.8, n_fp), rng.uniform(0, h * 0.8, n_fp)
        fp = np.stack([fx, fy, fx + rng.uniform(10, 100, n_fp), fy + rng.uniform(10, 100, n_fp)], axis=1)
        xyxy = np.concatenate([(gt + jitter)[found], fp])
        classes = np.concatenate([p_cls[found], rng.integers(0, NUM_CLASSES, n_fp)])
        preds.append(Boxes(xyxy, classes, rng.uniform(0.01, 1.0, len(xyxy))))
        sizes.append((w, h))
    return truth, preds, sizes


def _write_coco_files(tmp: Path, truth: list[Boxes], preds: list[Boxes], sizes: list[tuple[int, int]]
                      ) -> tuple[Path, Path]:
    """The same data as COCO files, written independently of edgekit's own conversion (ids 10 + i, cat 100 + c)."""
    images = [{"id": 10 + i, "file_name": f"im{i}.jpg", "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    anns, dets = [], []
    for i, t in enumerate(truth):
        for (x1, y1, x2, y2), c in zip(t.xyxy.tolist(), t.classes.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": 100 + c,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    for i, p in enumerate(preds):
        for (x1, y1, x2, y2), c, s in zip(p.xyxy.tolist(), p.classes.tolist(), p.scores.tolist()):
            dets.append({"image_id": 10 + i, "category_id": 100 + c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    gt_file, dt_file = tmp / "gt.json", tmp / "dt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": anns,
                                   "categories": [{"id": 100 + c, "name": f"c{c}"} for c in range(NUM_CLASSES)]}))
    dt_file.write_text(json.dumps(dets))
    return gt_file, dt_file


def _per_class(precision: np.ndarray) -> dict[int, tuple[float, float]]:
    out = {}
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            out[k] = (float(p[p > -1].mean()), float(p[0][p[0] > -1].mean()))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_map_equals_pycocotools_and_faster_coco_eval(tmp_path: Path, seed: int) -> None:
    from faster_coco_eval import COCO as FCOCO
    from faster_coco_eval import COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth, preds, sizes = _random_set(seed)
    score = evaluate_detections(truth, preds, sizes, NUM_CLASSES)
    gt_file, dt_file = _write_coco_files(tmp_path, truth, preds, sizes)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(dt_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        fgt = FCOCO(str(gt_file))
        fev = COCOeval_faster(fgt, fgt.loadRes(str(dt_file)), "bbox")
        fev.evaluate()
        fev.accumulate()
        fev.summarize()

    assert score is not None
    assert 0.2 < score.map50_95 < 0.9 and score.map50 > score.map50_95  # a real, middling figure
    assert score.map50_95 == pytest.approx(ev.stats[0], abs=1e-6)
    assert score.map50 == pytest.approx(ev.stats[1], abs=1e-6)
    # No score ties in this data, so faster-coco-eval's matching agrees with pycocotools' to rounding.
    assert score.map50_95 == pytest.approx(fev.stats[0], abs=1e-6)
    assert score.map50 == pytest.approx(fev.stats[1], abs=1e-6)
    ref = _per_class(ev.eval["precision"])
    assert sorted(score.per_class) == sorted(ref) == [0, 1, 2]
    for c, (ap, ap50) in ref.items():
        assert score.per_class[c] == pytest.approx(ap, abs=1e-6)
        assert score.per_class_map50[c] == pytest.approx(ap50, abs=1e-6)
    assert np.mean(list(score.per_class.values())) == pytest.approx(score.map50_95, abs=1e-9)
    assert score.images == 20
    assert score.truth_boxes == sum(len(t) for t in truth)
    assert score.detections == sum(len(p) for p in preds)


def _grid_truth() -> tuple[list[Boxes], list[tuple[int, int]]]:
    boxes = np.array([[10, 20, 110, 70], [200, 200, 260, 300], [300, 50, 400, 150]], dtype=np.float64)
    return [Boxes(boxes, np.array([0, 1, 2])), Boxes(boxes[:2] + 5, np.array([1, 1]))], [(640, 480), (500, 400)]


def _as_predictions(truth: list[Boxes], dx_fraction: float) -> list[Boxes]:
    out = []
    for t in truth:
        w = t.xyxy[:, 2] - t.xyxy[:, 0]
        shift = np.stack([w, 0 * w, w, 0 * w], axis=1) * dx_fraction
        out.append(Boxes(t.xyxy + shift, t.classes, np.linspace(0.9, 0.5, len(t))))
    return out


def test_perfect_shifted_and_empty_cases() -> None:
    truth, sizes = _grid_truth()
    perfect = evaluate_detections(truth, _as_predictions(truth, 0.0), sizes, NUM_CLASSES)
    assert perfect is not None
    assert perfect.map50_95 == pytest.approx(1.0, abs=1e-9) and perfect.map50 == pytest.approx(1.0, abs=1e-9)
    assert perfect.per_class == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0})
    # Shifted by a fifth of the width: IoU 0.8 / 1.2 = 0.667, a match at thresholds 0.50-0.65 (4 of 10).
    fifth = evaluate_detections(truth, _as_predictions(truth, 0.2), sizes, NUM_CLASSES)
    assert fifth.map50 == pytest.approx(1.0, abs=1e-9)
    assert fifth.map50_95 == pytest.approx(0.4, abs=1e-9)
    # By half a box: IoU 1/3, below every threshold.
    half = evaluate_detections(truth, _as_predictions(truth, 0.5), sizes, NUM_CLASSES)
    assert half.map50_95 == 0.0 and half.map50 == 0.0
    # Nothing detected: AP 0 for every class with ground truth (pycocotools cannot load an empty result).
    none = evaluate_detections(truth, [Boxes.empty(), Boxes.empty()], sizes, NUM_CLASSES)
    assert none.map50_95 == 0.0 and none.per_class == {0: 0.0, 1: 0.0, 2: 0.0} and none.detections == 0
    # No ground truth at all: no figure.
    empty_truth = [Boxes.empty(with_scores=False)] * 2
    assert evaluate_detections(empty_truth, _as_predictions(truth, 0.0), sizes, NUM_CLASSES) is None


def test_classes_without_truth_are_left_out_and_wrong_classes_refused() -> None:
    truth, sizes = _grid_truth()
    preds = _as_predictions(truth, 0.0)
    # A false positive of class 3, which has no ground truth: COCO leaves the class out, the mean stays 1.
    preds[0] = Boxes(np.vstack([preds[0].xyxy, [[0, 0, 50, 50]]]), np.append(preds[0].classes, 3),
                     np.append(preds[0].scores, 0.95))
    score = evaluate_detections(truth, preds, sizes, num_classes=4)
    assert sorted(score.per_class) == [0, 1, 2] and score.map50_95 == pytest.approx(1.0)
    # A false positive of class 0 with the top score does cost: class 0's precision drops at the first rank.
    preds[1] = Boxes(np.vstack([preds[1].xyxy, [[0, 0, 50, 50]]]), np.append(preds[1].classes, 0),
                     np.append(preds[1].scores, 0.99))
    worse = evaluate_detections(truth, preds, sizes, num_classes=4)
    assert worse.per_class[0] < 1.0 and worse.per_class[1] == pytest.approx(1.0)
    with pytest.raises(BadInput, match="class 3 but the model has 3 classes"):
        evaluate_detections(truth, preds, sizes, num_classes=3)
