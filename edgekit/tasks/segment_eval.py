"""Segmentation judged by mIoU: per-pixel classes (argmax over the class axis, or a one-channel probability map
above `--mask-threshold`) against class-index masks (`masks/*.png` beside `images/`), or the FP32 model's.

Masks are brought to the output's grid the way the image reached the input (the preprocessing's stretch,
letterbox or center-crop, nearest neighbour), then to the output's size; letterbox padding is ignored (255).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BadInput
from edgekit.tasks.base import Score, TaskEvaluator, TaskSettings

IGNORE = 255
DEFAULT_MASK_THRESHOLD = 0.5


def _class_axis(shape: tuple[int, ...]) -> int | None:
    """The class axis of a [N, C, h, w] (or [N, h, w, C]) map; None for [N, h, w] class indices."""
    if len(shape) == 3:
        return None
    if len(shape) != 4:
        raise BadInput(f"--task segment needs a [N, C, H, W] (or [N, H, W]) output, the model gives {list(shape)}")
    return 3 if shape[3] < shape[1] and shape[3] <= 256 else 1


class SegmentEvaluator(TaskEvaluator):
    task, metric = "segment", "mIoU"

    def __init__(self, output: int, axis: int | None, threshold: float | None, num_classes: int) -> None:
        super().__init__()
        self.output, self.axis, self.threshold, self.num_classes = output, axis, threshold, num_classes
        self.truth: list[np.ndarray] = []

    @classmethod
    def make(cls, spec: Any, dataset: Any, settings: TaskSettings, reference: list[np.ndarray]
             ) -> SegmentEvaluator:
        from edgekit.tasks.segment import mask_file, read_mask

        i = next((i for i, r in enumerate(reference) if r.ndim in (3, 4)), None)
        if i is None:
            raise BadInput("--task segment needs a per-pixel output ([N, C, H, W]); the model has none")
        axis = _class_axis(reference[i].shape)
        channels = reference[i].shape[axis] if axis is not None else 0
        threshold = settings.mask_threshold
        ev = cls(i, axis, None, 0)
        if channels == 1:
            if threshold is None:
                threshold = DEFAULT_MASK_THRESHOLD
                ev.notes.append(f"one-channel output: foreground above {threshold} (set --mask-threshold)")
            ev.threshold = threshold
        ev.num_classes = 2 if channels == 1 else max(channels, int(reference[i].max()) + 1 if axis is None else 0)
        files = dataset.files
        masks = [mask_file(f) for f in files] if files is not None else []
        if files is not None and any(m is not None and m.is_file() for m in masks):
            ev.vs = "labels"
            missing = [(f, m) for f, m in zip(files, masks) if m is None or not m.is_file()]
            if missing:
                raise BadInput(f"no mask {missing[0][1]} for image {missing[0][0]} ({len(missing)} images have "
                               "none): give every validation image its class-index PNG in masks/")
            h, w = ev.predict(reference).shape[1:]
            ev.truth = [_to_grid(read_mask(m), dataset.preprocess, (h, w)) for m in masks if m is not None]
            top = max(int(t[t != IGNORE].max(initial=0)) for t in ev.truth)
            if top >= ev.num_classes:
                raise BadInput(f"masks hold class {top} but the model predicts {ev.num_classes} classes")
        else:
            ev.vs = "fp32"
            where = "the data is an .npz" if files is None else f"no masks/*.png beside {Path(files[0]).parent}"
            ev.notes.append(f"{where}: the FP32 model's per-pixel classes are the reference")
            ev.truth = list(ev.predict(reference))
        ev.class_names = dataset.class_names
        ev.reference = ev.score(reference)
        return ev

    def predict(self, outputs: list[np.ndarray]) -> np.ndarray:
        out = outputs[self.output]
        if self.axis is None:
            return np.rint(out).astype(np.int64)
        if self.threshold is not None:
            return (out.squeeze(self.axis) > self.threshold).astype(np.int64)
        return out.argmax(self.axis)

    def score(self, outputs: list[np.ndarray]) -> Score:
        from edgekit.tasks.segment import confusion, mean_iou

        pred = self.predict(outputs)
        conf = sum(confusion(np.clip(p, 0, self.num_classes - 1), t, self.num_classes, IGNORE)
                   for p, t in zip(pred, self.truth))
        miou, per_class = mean_iou(np.asarray(conf))
        if miou is None:
            raise BadInput("no pixel of any class in the validation masks: mIoU over nothing is no figure")
        return Score(miou * 100, {k: v * 100 for k, v in per_class.items()})


def _to_grid(mask: np.ndarray, pre: Any, hw: tuple[int, int]) -> np.ndarray:
    """The mask as the output grid sees it: the preprocessing's geometry, then the output's size."""
    from PIL import Image

    im = Image.fromarray(mask.astype(np.int32), mode="I")
    if pre is not None:
        h, w = pre.size
        sx, sy, ox, oy = pre.input_frame(im.width, im.height)
        nw, nh = max(1, round(im.width * sx)), max(1, round(im.height * sy))
        resized = im.resize((nw, nh), Image.NEAREST)
        canvas = Image.new("I", (w, h), IGNORE)
        canvas.paste(resized, (int(ox), int(oy)))
        im = canvas
    return np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST), dtype=np.int64)
