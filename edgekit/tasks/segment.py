"""Semantic segmentation ground truth (class-index PNG masks), the confusion matrix and mIoU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import BadInput
from edgekit.tasks.labels import swap_folder

INDEX_MODES = {"P", "L", "1", "I", "I;16", "I;16L", "I;16B"}  # modes whose pixel values are class indices


def mask_file(image: Path) -> Path | None:
    """dataset/images/val/a.jpg -> dataset/masks/val/a.png (the last 'images' folder becomes 'masks'). None
    without an 'images' folder: a PNG beside a PNG image would be the image itself."""
    image = Path(image)
    if "images" not in image.parts[:-1]:
        return None
    return swap_folder(image, "images", "masks", ".png")


def read_mask(path: Path) -> np.ndarray:
    """A class-index mask as a 2-D integer array. A palette PNG gives its indices (PIL's 'P' mode keeps them),
    never the colours; an RGB(A) mask has no index to read and is refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in INDEX_MODES:
                raise BadInput(f"mask {path} is a {im.mode} image: a class-index PNG is needed (one channel, or a "
                               "palette PNG, each pixel value the class index); convert colour masks first")
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"cannot read mask {path}: {e}") from None
    if a.dtype == bool:
        a = a.astype(np.uint8)
    return a


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int = 255) -> np.ndarray:
    """[C, C] pixel counts, rows = truth class, columns = predicted class; truth pixels equal to `ignore`
    are not counted."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise BadInput(f"prediction {list(pred.shape)} and mask {list(truth.shape)} differ in size: resize the "
                       "prediction to the mask (nearest) before comparing")
    valid = truth != ignore
    t = truth[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    for what, v in (("mask", t), ("prediction", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            bad = int(v.max() if v.max() >= num_classes else v.min())
            raise BadInput(f"{what} holds class {bad}, outside 0..{num_classes - 1} (ignore value {ignore}): the "
                           "class count and the masks do not match")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: np.ndarray) -> tuple[float | None, dict[int, float]]:
    """IoU = TP / (TP + FP + FN) for every class present in truth or prediction (union > 0), and their mean;
    (None, {}) when no class is present."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    per_class = {int(c): float(tp[c] / union[c]) for c in np.flatnonzero(union > 0)}
    if not per_class:
        return None, {}
    return float(np.mean(list(per_class.values()))), per_class
