"""Which task judges a model, and on what ground truth: `resolve_task` (the types are in tasks/base.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import BadInput
from edgekit.tasks.base import (
    EXAMPLE_CONF,
    MAX_EXAMPLES,
    TASKS,
    ClassifyEvaluator,
    Score,
    TaskEvaluator,
    TaskResult,
    TaskSettings,
)

__all__ = ["EXAMPLE_CONF", "MAX_EXAMPLES", "TASKS", "ClassifyEvaluator", "Score", "TaskEvaluator", "TaskResult",
           "TaskSettings", "resolve_task"]


def resolve_task(spec: Any, dataset: Any, settings: TaskSettings, reference: list[np.ndarray]
                 ) -> tuple[TaskEvaluator | None, list[str]]:
    """The evaluator for this model and data (None: tensor figures only) and what to tell the user."""
    from edgekit.verify.metrics import is_classifier_output

    settings.check()
    task = settings.task
    if task == "auto":
        task = "classify" if any(is_classifier_output(tuple(r.shape)) for r in reference) else ""
        if not task:
            return None, []
    ev: TaskEvaluator | None
    if task == "classify":
        ev = _classify(reference, dataset)
    elif task == "detect":
        from edgekit.tasks.detect_eval import DetectEvaluator

        ev = DetectEvaluator.make(spec, dataset, settings, reference)
    else:
        from edgekit.tasks.segment_eval import SegmentEvaluator

        ev = SegmentEvaluator.make(spec, dataset, settings, reference)
    if ev is None:
        return None, []
    if ev.reference is None:  # the evaluator found nothing to count: a note, and tensor figures decide
        return None, ev.notes
    if ev.reference.value <= settings.max_metric_drop:
        # No artifact can lose more than the budget from here (a metric that cannot fail decides nothing): an
        # untrained model, or data, labels or a decoder that do not match it.
        ev.notes.append(f"the FP32 model scores {ev.metric} {ev.reference.value:.2f} (vs {ev.vs}), not above the "
                        f"{settings.max_metric_drop:g}-point budget, so no artifact could fail on it: the tensor "
                        "figures decide. Check --preprocess, --decoder and the labels")
        return None, ev.notes
    return ev, ev.notes


def _classify(reference: list[np.ndarray], dataset: Any) -> TaskEvaluator:
    from edgekit.verify.metrics import is_classifier_output

    i = next((i for i, r in enumerate(reference) if is_classifier_output(tuple(r.shape))), None)
    if i is None:
        shapes = ", ".join(str(list(r.shape)) for r in reference)
        raise BadInput(f"--task classify needs a [N, C] class-score output; the model gives {shapes}")
    n = len(reference[i])
    labels = dataset.labels[:n] if dataset.labels is not None else None
    if labels is not None:
        ev = ClassifyEvaluator(i, labels, "labels", dataset.class_names)
    else:
        ev = ClassifyEvaluator(i, reference[i].reshape(n, -1).argmax(1), "fp32", dataset.class_names)
        ev.notes.append("no labels: the FP32 model's top-1 classes are the reference (accuracy = agreement); "
                        "recorded, while the tensor figures and top-1 agreement decide")
    ev.reference = ev.score(reference)
    return ev
