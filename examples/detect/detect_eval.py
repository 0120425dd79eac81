"""COCO mAP of YOLOv8-format outputs ([N, 4 + nc, A]: cx, cy, w, h in pixels, then class scores), numpy only.

Shared by train.py and int8_check.py: per-class NMS as Ultralytics' validator does it (every class over
the confidence floor is a candidate, IoU 0.7, at most 300 boxes), then pycocotools on COCO dicts built in memory.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # xyxy [K, 4], scores [K], classes [K]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = iw * ih
        order = rest[inter / (areas[i] + areas[rest] - inter + 1e-9) <= iou]
    return np.asarray(keep, np.int64)


def detections(out: np.ndarray, conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> Detections:
    """One image's output [4 + nc, A] -> boxes after per-class NMS."""
    xywh, scores = out[:4].T, out[4:].T  # [A, 4], [A, nc]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    anchor, cls = np.nonzero(scores > conf)
    b, s = xyxy[anchor], scores[anchor, cls]
    keep = np.concatenate([np.nonzero(cls == c)[0][nms(b[cls == c], s[cls == c], iou)] for c in np.unique(cls)] or
                          [np.zeros(0, np.int64)])
    keep = keep[np.argsort(-s[keep], kind="stable")][:max_det]
    return b[keep], s[keep], cls[keep]


def run_model(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 1) -> list[Detections]:
    """Detections of every image in x [N, 3, H, W] through fn (a batch -> [n, 4 + nc, A])."""
    dets: list[Detections] = []
    for i in range(0, len(x), batch):
        dets.extend(detections(o) for o in fn(x[i : i + batch]))
    return dets


def coco_map(dets: list[Detections], gts: list[np.ndarray], size: tuple[int, int], nc: int) -> tuple[float, float]:
    """(mAP50-95, mAP50) of detections against ground truth [k, 5] (cls, x1, y1, x2, y2 pixels) per image."""
    h, w = size
    images = [{"id": i, "height": h, "width": w} for i in range(len(gts))]
    boxes = [(i, row) for i, g in enumerate(gts) for row in g.tolist()]
    anns = [  # COCO wants unique annotation ids, from 1
        {"id": k + 1, "image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
         "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
        for k, (i, (c, x1, y1, x2, y2)) in enumerate(boxes)
    ]
    results = [
        {"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
        for i, (b, sc, cl) in enumerate(dets) for (x1, y1, x2, y2), s, c in zip(b.tolist(), sc, cl)
    ]
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary table
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(nc)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])
