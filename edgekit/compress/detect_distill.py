"""Distillation of a detector's decoded output: what the student must copy are the teacher's scores everywhere
and its boxes where it sees an object.

An MSE over a detector's whole `[N, 4 + nc, anchors]` output spends the student on the boxes of thousands of
background anchors NMS throws away: measured on the bundled detector pruned by a quarter, 10 epochs of it
reached a 96 % teacher fit and lost 20 points of mAP50-95. Here, as in the box/class split of YOLO's own loss
(and LD / DeFeat-style detection distillation):
- scores: binary cross-entropy against the teacher's (soft targets), over every anchor and class;
- boxes: 1 - GIoU plus an L1 in units of the teacher's box size, each anchor weighted by the teacher's
  confidence in it, so background anchors teach nothing about boxes.
Both are normalised by the teacher's total confidence, as TAL normalises by its target scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The decoded layouts whose rows this loss can read (tasks/decoders.py names): yolov8 [N, 4 + nc, A] with
# class probabilities; yolov5 [N, A, 5 + nc] with objectness and class probabilities.
DETECT_LAYOUTS = ("yolov8", "yolov5")
_EPS = 1e-6


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of [..., 4] (cx, cy, w, h) boxes, elementwise."""
    a1, a2 = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b1, b2 = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    inter = (torch.min(a2, b2) - torch.max(a1, b1)).clamp_min(0).prod(-1)
    union = a[..., 2:].clamp_min(0).prod(-1) + b[..., 2:].clamp_min(0).prod(-1) - inter + _EPS
    hull = (torch.max(a2, b2) - torch.min(a1, b1)).clamp_min(0).prod(-1) + _EPS
    return inter / union - (hull - union) / hull


def _rows(out: torch.Tensor, layout: str, logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> boxes [N, A, 4], score probabilities [N, A, k] (k = nc, or 1 + nc with objectness first) and each
    anchor's confidence [N, A] (best class, times objectness)."""
    out = _anchors_last(out, layout)
    scores = out[..., 4:].sigmoid() if logits else out[..., 4:]
    if layout == "yolov5":
        return out[..., :4], scores, scores[..., 0] * scores[..., 1:].max(-1).values
    return out[..., :4], scores, scores.max(-1).values


def _anchors_last(out: torch.Tensor, layout: str) -> torch.Tensor:
    """[N, A, C] whatever the export's order (yolov8 exports [N, 4 + nc, A]; the decoder takes either)."""
    return out.transpose(1, 2) if layout == "yolov8" and out.shape[1] < out.shape[2] else out


def scores_are_logits(out: torch.Tensor, layout: str) -> bool:
    """Score rows outside [0, 1]: the export left the sigmoid out (decoders._probabilities' test)."""
    scores = _anchors_last(out, layout)[..., 4:]
    return bool(((scores < 0) | (scores > 1)).any())


def detection_kd_loss(student: torch.Tensor, teacher: torch.Tensor, layout: str, logits: bool = False) -> torch.Tensor:
    """The student's decoded detector output distilled from the teacher's (module docstring). `logits`: the
    score rows are logits (the export left the sigmoid out), as decoders._probabilities tells them apart."""
    if layout not in DETECT_LAYOUTS:
        raise ValueError(f"no detection distillation for layout {layout!r}")
    s_box, s_scores, _ = _rows(student, layout, logits)
    t_box, t_scores, t_conf = _rows(teacher, layout, logits)
    norm = t_conf.sum().clamp_min(1.0)
    if logits:  # the sigmoid is fused into the loss where the scores are logits: no clamping, exact gradients
        scores = F.binary_cross_entropy_with_logits(_anchors_last(student, layout)[..., 4:], t_scores, reduction="sum")
    else:
        scores = F.binary_cross_entropy(s_scores.clamp(_EPS, 1 - _EPS), t_scores, reduction="sum")
    size = t_box[..., 2:].clamp_min(1.0).repeat(1, 1, 2)  # L1 in box sizes: a 4 px box counts as a 100 px one
    boxes = ((1 - giou(s_box, t_box)) + ((s_box - t_box).abs() / size).sum(-1) / 2) * t_conf
    return (scores + 2.0 * boxes.sum()) / norm
