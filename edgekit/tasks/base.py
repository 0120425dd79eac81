"""The task metric's types: settings, result, and the evaluator base (classify included).

What the model is for, judged: the task metric of an artifact's outputs next to the FP32 model's.

`resolve_task` picks the task (classify / detect / segment; auto: a [N, C] output is a classifier, anything
else keeps tensor figures only) and its ground truth: the data's labels when there are some (class folders,
Ultralytics `labels/*.txt`, COCO JSON, `masks/*.png`), else the FP32 model's own predictions, and says which
(`vs`: "labels" | "fp32"). A metric needs something to count: no ground-truth box or mask at all gives no
task figure (the tensor figures decide, and the note says why), never a score on an empty set.

Values are in points (0-100): accuracy, mAP50-95, mIoU. The verdict is the drop from the FP32 model's value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import BadInput

TASKS = ("auto", "classify", "detect", "segment")
MAX_EXAMPLES = 4  # images with boxes drawn in the report
EXAMPLE_CONF = 0.25  # boxes drawn in the report: what a deployment would show


@dataclass
class TaskSettings:
    """How outputs become task predictions, and the budget (`edgekit build --task ...`)."""

    task: str = "auto"
    decoder: str | None = None  # detect: yolov8 | yolov5 | yolox | module:function
    iou: float = 0.7  # NMS IoU
    conf: float = 0.001  # NMS confidence floor for mAP (the whole PR curve, as every evaluator counts it)
    max_det: int = 300
    val_annotations: str | None = None  # COCO JSON for the validation images
    mask_threshold: float | None = None  # segment: a one-channel probability map is foreground above this
    max_metric_drop: float = 1.0  # points of the task metric an artifact may lose against FP32
    strict_tensors: bool = False  # the tensor figures bind too, not only the task metric
    reference_conf: float = 0.25  # without labels: FP32 detections above this are the ground truth

    def check(self) -> None:
        if self.task not in TASKS:
            raise BadInput(f"--task {self.task}: use one of {', '.join(TASKS)}")
        if not 0 < self.iou <= 1:
            raise BadInput(f"--iou {self.iou}: an NMS IoU threshold is in (0, 1]")
        if not 0 <= self.conf < 1 or not 0 < self.reference_conf < 1:
            raise BadInput(f"--conf {self.conf}: a confidence threshold is in [0, 1)")
        if self.mask_threshold is not None and not np.isfinite(self.mask_threshold):
            raise BadInput("--mask-threshold must be a finite number")
        if not (np.isfinite(self.max_metric_drop) and self.max_metric_drop >= 0):
            raise BadInput(f"--max-metric-drop {self.max_metric_drop}: give points >= 0")
        if self.max_det < 1:
            raise BadInput("--max-det must be >= 1")


@dataclass
class TaskResult:
    """verification.task in the manifest: the artifact's task metric against the FP32 model's."""

    task: str
    metric: str  # accuracy | mAP50-95 | mIoU
    value: float  # points
    reference: float  # the FP32 model's value on the same samples
    drop_points: float
    vs: str  # labels | fp32
    passed: bool
    max_drop: float
    samples: int
    map50: float | None = None
    reference_map50: float | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)  # [{name, value, reference}]
    notes: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)  # detect: boxes of a few images, for the report

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        extra = f", mAP50 {self.map50:.1f}" if self.map50 is not None else ""
        return (f"{self.metric} {self.value:.2f} vs FP32 {self.reference:.2f} ({self.vs}){extra}: "
                f"drop {self.drop_points:.2f} points (max {self.max_drop:g})")


@dataclass
class Score:
    """One model's task figure on the samples (points), per class, and what else the result shows."""

    value: float
    per_class: dict[int, float]
    map50: float | None = None


class TaskEvaluator:
    """Scores outputs (concatenated over the validation samples, as verify.run_all gives them)."""

    task: str = ""
    metric: str = ""
    vs: str = "fp32"
    class_names: list[str] | None = None

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.reference: Score | None = None

    def score(self, outputs: list[np.ndarray]) -> Score:
        raise NotImplementedError

    def examples(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> list[dict[str, Any]]:
        return []

    def name_of(self, k: int) -> str:
        names = self.class_names or []
        return names[k] if 0 <= k < len(names) else f"class {k}"

    def result(self, outputs: list[np.ndarray], reference_outputs: list[np.ndarray], max_drop: float,
               samples: int) -> TaskResult:
        assert self.reference is not None
        s, ref = self.score(outputs), self.reference
        drop = round(ref.value - s.value, 4)
        per_class = [{"index": k, "name": self.name_of(k), "value": round(s.per_class.get(k, 0.0), 3),
                      "reference": round(r, 3)} for k, r in sorted(ref.per_class.items())]
        return TaskResult(self.task, self.metric, round(s.value, 4), round(ref.value, 4), drop, self.vs,
                          drop <= max_drop + 1e-9, max_drop, samples,
                          None if s.map50 is None else round(s.map50, 4),
                          None if ref.map50 is None else round(ref.map50, 4), per_class, list(self.notes),
                          self.examples(reference_outputs, outputs))


class ClassifyEvaluator(TaskEvaluator):
    task, metric = "classify", "accuracy"

    def __init__(self, output: int, truth: np.ndarray, vs: str, class_names: list[str] | None) -> None:
        super().__init__()
        self.output, self.truth, self.vs, self.class_names = output, truth, vs, class_names

    def score(self, outputs: list[np.ndarray]) -> Score:
        pred = outputs[self.output].reshape(len(outputs[self.output]), -1).argmax(1)[: len(self.truth)]
        hit = pred == self.truth[: len(pred)]
        per_class = {int(k): float(hit[self.truth[: len(pred)] == k].mean() * 100) for k in np.unique(self.truth)}
        return Score(float(hit.mean() * 100), per_class)
