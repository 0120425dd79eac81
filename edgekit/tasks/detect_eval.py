"""Detection judged by mAP: decode -> NMS -> COCO evaluation, against labels or the FP32 model's boxes.

With labels (Ultralytics `labels/*.txt` beside `images/`, or `--val-annotations` COCO JSON) predictions are
mapped from the model input back to each original image through the preprocessing's geometry (stretch,
letterbox, center-crop), as Ultralytics' scale_boxes does, so COCO's area ranges and the labels agree.
Without labels, the FP32 model's detections above `reference_conf` are the ground truth, in input pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BadInput
from edgekit.tasks.base import EXAMPLE_CONF, MAX_EXAMPLES, Score, TaskEvaluator, TaskSettings
from edgekit.tasks.types import Boxes


def input_hw(spec: Any, dataset: Any) -> tuple[int, int]:
    if dataset.preprocess is not None:
        h, w = dataset.preprocess.size
        return int(h), int(w)
    shape = spec.inputs[0].shape
    if len(shape) == 4:
        return (int(shape[2]), int(shape[3])) if shape[1] in (1, 3) else (int(shape[1]), int(shape[2]))
    raise BadInput(f"--task detect: the model input {shape} is not an image; the decoders need [N, C, H, W]")


class DetectEvaluator(TaskEvaluator):
    task, metric = "detect", "mAP50-95"

    def __init__(self, settings: TaskSettings, decoder_name: str, hw: tuple[int, int]) -> None:
        from edgekit.tasks.decoders import get_decoder

        super().__init__()
        self.settings, self.decoder_name, self.hw = settings, decoder_name, hw
        self.decoder = get_decoder(decoder_name)
        self.truth: list[Boxes] = []
        self.keep: np.ndarray | None = None  # samples with ground truth (COCO JSON may list only some)
        self.sizes: list[tuple[int, int]] = []  # (width, height) of the frame each image is judged in
        self.frames: list[tuple[float, float, float, float]] | None = None  # input -> image, per sample
        self.files: list[Path] | None = None

    @classmethod
    def make(cls, spec: Any, dataset: Any, settings: TaskSettings, reference: list[np.ndarray]
             ) -> DetectEvaluator:
        from edgekit.tasks.decoders import guess_decoder

        hw = input_hw(spec, dataset)
        name = settings.decoder or guess_decoder([list(r.shape) for r in reference], hw)
        if name is None:
            shapes = ", ".join(str(list(r.shape)) for r in reference)
            raise BadInput(f"--task detect: the outputs ({shapes}) do not say how to read boxes from them; give "
                           "--decoder yolov8|yolov5|yolox or your own as module:function")
        ev = cls(settings, name, hw)
        ev.files = dataset.files
        ev._ground_truth(dataset, reference)
        if sum(len(t) for t in ev.truth) == 0:
            where = "the labels" if ev.vs == "labels" else f"the FP32 model above confidence {settings.reference_conf}"
            ev.notes.append(f"no ground-truth box in {len(ev.truth)} validation images (from {where}): mAP over an "
                            "empty set is no figure, so the tensor figures decide")
            return ev
        ev.reference = ev.score(reference)
        if ev.vs == "labels" and ev.reference.value < 1.0:
            ev.notes.append(f"the FP32 model itself scores mAP50-95 {ev.reference.value:.2f} on the labels: check "
                            "--preprocess, --decoder and the class order of the labels")
        return ev

    def _ground_truth(self, dataset: Any, reference: list[np.ndarray]) -> None:
        from edgekit.tasks.labels import (
            class_names_near,
            image_size,
            read_coco_annotations,
            read_yolo_labels,
            yolo_label_file,
        )

        files, s = dataset.files, self.settings
        labelled = files is not None and (s.val_annotations is not None
                                          or any(yolo_label_file(f).is_file() for f in files))
        if not labelled:
            self.vs = "fp32"
            why = ("the validation data is an .npz (no image files to find labels for)" if files is None else
                   f"no labels/*.txt beside {Path(files[0]).parent} and no --val-annotations")
            self.notes.append(f"{why}: the FP32 model's detections (confidence >= {s.reference_conf}) are the "
                              "reference boxes")
            self.truth = [Boxes(b.xyxy, b.classes) for b in self._detect(reference, s.reference_conf)]
            self.sizes = [(self.hw[1], self.hw[0])] * len(self.truth)
            self.class_names = dataset.class_names
            return
        self.vs = "labels"
        assert files is not None
        if s.val_annotations is not None:
            truth, names, _ = read_coco_annotations(Path(s.val_annotations), files)
            keep = np.array([t is not None for t in truth])
            if not keep.all():
                self.notes.append(f"{int((~keep).sum())} of {len(files)} validation images are not in "
                                  f"{s.val_annotations}: judged on the other {int(keep.sum())}")
            self.keep = keep
            self.truth = [t for t in truth if t is not None]
            self.class_names = names
        else:
            self.truth = read_yolo_labels(files)
            self.class_names = class_names_near(Path(files[0]).parent) or dataset.class_names
        kept = [f for f, k in zip(files, self.keep if self.keep is not None else [True] * len(files)) if k]
        pre = dataset.preprocess
        self.sizes = [image_size(f) for f in kept]
        self.frames = [pre.input_frame(w, h) for w, h in self.sizes] if pre is not None else \
            [(self.hw[1] / w, self.hw[0] / h, 0.0, 0.0) for w, h in self.sizes]

    def _detect(self, outputs: list[np.ndarray], conf: float) -> list[Boxes]:
        from edgekit.tasks.decoders import decoder_notes
        from edgekit.tasks.nms import nms

        candidates = self.decoder(outputs, self.hw)
        for n in decoder_notes():
            if n not in self.notes:
                self.notes.append(n)
        s = self.settings
        return [nms(c, s.iou, conf, s.max_det) for c in candidates]

    def predictions(self, outputs: list[np.ndarray], conf: float | None = None) -> list[Boxes]:
        """Detections per judged image, in the frame its ground truth is in."""
        dets = self._detect(outputs, self.settings.conf if conf is None else conf)
        if self.keep is not None:
            dets = [d for d, k in zip(dets, self.keep) if k]
        if self.frames is None:
            return dets
        out = []
        for d, (sx, sy, ox, oy), (w, h) in zip(dets, self.frames, self.sizes):
            b = d.scaled(1 / sx, 1 / sy, -ox / sx, -oy / sy)
            b.xyxy = np.clip(b.xyxy, 0, [w, h, w, h])
            out.append(b)
        return out

    def score(self, outputs: list[np.ndarray]) -> Score:
        from edgekit.tasks.coco import evaluate_detections

        preds = self.predictions(outputs)
        if len(preds) != len(self.truth):
            raise BadInput(f"the decoder gave {len(preds)} images for {len(self.truth)} with ground truth")
        classes = [int(t.classes.max()) for t in self.truth if len(t)] + [int(p.classes.max()) for p in preds
                                                                            if len(p)]
        nc = max([len(self.class_names or []), *[c + 1 for c in classes]])
        ds = evaluate_detections(self.truth, preds, self.sizes, nc)
        assert ds is not None  # make() checked there is ground truth
        return Score(ds.map50_95 * 100, {k: v * 100 for k, v in ds.per_class.items()}, ds.map50 * 100)

    def examples(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> list[dict[str, Any]]:
        """A few images (the most ground-truth boxes first) with the FP32 and the artifact's boxes."""
        ref, art = self.predictions(reference, EXAMPLE_CONF), self.predictions(outputs, EXAMPLE_CONF)
        order = sorted(range(len(self.truth)), key=lambda i: -len(self.truth[i]))[:MAX_EXAMPLES]
        kept = [f for f, k in zip(self.files or [], self.keep if self.keep is not None else
                                  [True] * len(self.files or [])) if k]

        def rows(b: Boxes) -> list[list[float]]:
            scores = b.scores if b.scores is not None else np.ones(len(b))
            return [[*(round(float(v), 1) for v in xy), int(c), round(float(s), 3)]
                    for xy, c, s in zip(b.xyxy[:50], b.classes[:50], scores[:50])]

        frame = "image" if self.frames is not None else "input"  # boxes on the original image, or the model input
        return [{"image": str(kept[i]) if i < len(kept) else None, "frame": frame, "width": self.sizes[i][0],
                 "height": self.sizes[i][1], "truth": rows(self.truth[i]) if self.vs == "labels" else [],
                 "reference": rows(ref[i]), "artifact": rows(art[i])} for i in order]
