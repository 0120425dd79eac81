"""COCO mAP50-95 with pycocotools' COCOeval, the reference implementation, on datasets built in memory."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

from edgekit.errors import BadInput
from edgekit.tasks.types import Boxes


@dataclass
class DetectionScore:
    map50_95: float  # 0..1, COCO's AP at IoU 0.50:0.95, all areas, 100 detections per image
    map50: float
    per_class: dict[int, float]  # AP50-95 per class index that has ground truth
    per_class_map50: dict[int, float]
    images: int
    truth_boxes: int
    detections: int


def _xywh(xyxy: np.ndarray) -> np.ndarray:
    return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)


def coco_datasets(truth: list[Boxes], predictions: list[Boxes], sizes: list[tuple[int, int]]
                  ) -> tuple[dict, list[dict]]:
    """(ground-truth dataset dict, detection list) in COCO's format: image i has id i + 1, class c is category
    c + 1 (ids from 1, as COCO's own files number them)."""
    images, anns = [], []
    for i, (t, (w, h)) in enumerate(zip(truth, sizes)):
        images.append({"id": i + 1, "width": int(w), "height": int(h), "file_name": f"{i + 1}.jpg"})
        for box, c in zip(_xywh(t.xyxy).tolist(), t.classes.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    dets = []
    for i, p in enumerate(predictions):
        scores = p.scores if p.scores is not None else np.ones(len(p))
        for box, c, s in zip(_xywh(p.xyxy).tolist(), p.classes.tolist(), scores.tolist()):
            dets.append({"image_id": i + 1, "category_id": c + 1, "bbox": box, "score": s})
    return {"images": images, "annotations": anns}, dets


def evaluate_detections(truth: list[Boxes], predictions: list[Boxes], sizes: list[tuple[int, int]],
                        num_classes: int) -> DetectionScore | None:
    """COCO bbox mAP of `predictions` against `truth` (both per image, in the same pixel frame; sizes are each
    image's (width, height)). None when there is no ground-truth box at all: a metric on nothing is no figure.
    Classes without ground truth are left out of the mean and of per_class (COCO's rule)."""
    if not len(truth) == len(predictions) == len(sizes):
        raise ValueError(f"{len(truth)} truths, {len(predictions)} predictions, {len(sizes)} sizes")
    n_truth = sum(len(t) for t in truth)
    n_dets = sum(len(p) for p in predictions)
    score = DetectionScore(0.0, 0.0, {}, {}, len(truth), n_truth, n_dets)
    if n_truth == 0:
        return None
    for what, boxes in (("ground truth", truth), ("prediction", predictions)):
        for i, b in enumerate(boxes):
            if len(b) and (b.classes.min() < 0 or b.classes.max() >= num_classes):
                raise BadInput(f"{what} of image {i} has class {int(b.classes.max())} but the model has "
                               f"{num_classes} classes: the class count, labels or decoder do not match")
    gt_dict, dets = coco_datasets(truth, predictions, sizes)
    gt_classes = sorted({int(c) for t in truth for c in t.classes})
    if not dets:  # loadRes cannot take an empty list; nothing found is AP 0 for every class with ground truth
        score.per_class = dict.fromkeys(gt_classes, 0.0)
        score.per_class_map50 = dict.fromkeys(gt_classes, 0.0)
        return score

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict["categories"] = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its table
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = [im["id"] for im in gt_dict["images"]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: [IoU thresholds T, recall points R, classes K, area ranges A, maxDets M]; area 0 = 'all',
    # the last maxDets = 100; -1 marks a class without ground truth.
    precision = ev.eval["precision"][:, :, :, 0, -1]
    cat_ids = [int(c) for c in ev.params.catIds]
    for k, cat in enumerate(cat_ids):
        p = precision[:, :, k]
        if np.all(p <= -1):
            continue
        score.per_class[cat - 1] = float(np.mean(p[p > -1]))
        p50 = p[0]
        score.per_class_map50[cat - 1] = float(np.mean(p50[p50 > -1]))
    score.map50_95 = float(ev.stats[0])
    score.map50 = float(ev.stats[1])
    return score
