"""Class-aware greedy non-maximum suppression in numpy, with Ultralytics' defaults for validation."""

from __future__ import annotations

import numpy as np

from edgekit.tasks.types import Boxes

MAX_WH = 7680.0  # Ultralytics' offset: boxes of class c move by c * MAX_WH, so classes never overlap


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of [K, 4] boxes `a` against [M, 4] boxes `b` (x1 y1 x2 y2) -> [K, M]; 0 where the union is empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(candidates: Boxes, iou: float = 0.7, conf: float = 0.001, max_det: int = 300,
        max_nms: int = 30000) -> Boxes:
    """Keep boxes with score > conf, the top max_nms of them by score, then greedily drop every box whose IoU
    with a kept box of its class is > iou (torchvision's rule); at most max_det, by score descending.

    Boxes or scores that are not finite are dropped first (a broken output must not crash the metric)."""
    if candidates.scores is None:
        raise ValueError("nms needs scored boxes (detections), got ground truth")
    scores = candidates.scores
    ok = (scores > conf) & np.isfinite(scores) & np.all(np.isfinite(candidates.xyxy), axis=1)
    idx = np.flatnonzero(ok)
    # Stable sort: equal scores keep their anchor order, so the result does not depend on the sort algorithm.
    idx = idx[np.argsort(-scores[idx], kind="stable")][:max_nms]
    if len(idx) == 0 or max_det <= 0:
        return Boxes.empty()
    boxes = candidates.xyxy[idx] + candidates.classes[idx, None] * MAX_WH
    x1, y1, x2, y2 = boxes.T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    order = np.arange(len(idx))
    # One kept box per pass, each pass vectorised over the boxes still alive; stops at max_det kept, since
    # later keeps would be cut anyway.
    while order.size and len(keep) < max_det:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[ious <= iou]
    return candidates.take(idx[np.asarray(keep, dtype=np.int64)])


def batched_nms(candidates: list[Boxes], iou: float = 0.7, conf: float = 0.001, max_det: int = 300,
                max_nms: int = 30000) -> list[Boxes]:
    """nms() for each image."""
    return [nms(c, iou, conf, max_det, max_nms) for c in candidates]
