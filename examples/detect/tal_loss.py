"""YOLOv8's loss, compactly: task-aligned assignment (TAL), BCE on classes, GIoU + DFL on boxes.

Assignment per ground-truth box: candidate anchors are those whose centre lies inside the box grown to at
least one stride per side (so a 4 px spot still reaches a stride-8 anchor, which YOLOv8's in-box rule would
miss); of those the top k by score^0.5 * IoU^6 are positives; an anchor claimed twice goes to the box it
overlaps most. Class targets are that alignment metric normalised per box to its best IoU (soft labels).
Gains as Ultralytics' defaults: box 7.5, cls 0.5, dfl 1.5.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

TOPK, ALPHA, BETA = 10, 0.5, 6.0
GAIN_BOX, GAIN_CLS, GAIN_DFL = 7.5, 0.5, 1.5


def box_iou(a: torch.Tensor, b: torch.Tensor, giou: bool = False) -> torch.Tensor:
    """IoU (or GIoU) of xyxy boxes, broadcasting over leading dims."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(0)
    inter = iw * ih
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = union - inter + 1e-7
    iou = inter / union
    if not giou:
        return iou
    hull = (torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])) * (
        torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    ) + 1e-7
    return iou - (hull - union) / hull


@torch.no_grad()
def assign(
    pred: torch.Tensor, scores: torch.Tensor, centres: torch.Tensor, strides: torch.Tensor,
    gt: torch.Tensor, valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred [B, A, 4] pixels xyxy, scores [B, A, nc] probabilities, centres [2, A] and strides [1, A] pixels,
    gt [B, M, 5] (cls, xyxy), valid [B, M] -> foreground [B, A], target boxes [B, A, 4], target scores [B, A, nc].
    """
    _, a, nc = scores.shape
    m = gt.shape[1]
    gcls, gbox = gt[..., 0].long(), gt[..., 1:]
    half_w = torch.maximum((gbox[..., 2:3] - gbox[..., 0:1]) / 2, strides / 2)  # [B, M, A]
    half_h = torch.maximum((gbox[..., 3:4] - gbox[..., 1:2]) / 2, strides / 2)
    cand = ((centres[0] - (gbox[..., 0:1] + gbox[..., 2:3]) / 2).abs() < half_w) & (
        (centres[1] - (gbox[..., 1:2] + gbox[..., 3:4]) / 2).abs() < half_h
    ) & valid[..., None]
    iou = box_iou(gbox[:, :, None], pred[:, None]).clamp(0) * cand  # [B, M, A]
    score = scores.transpose(1, 2).gather(1, gcls[..., None].expand(-1, -1, a))  # [B, M, A]: score of its class
    metric = score.pow(ALPHA) * iou.pow(BETA)
    top = metric.topk(min(TOPK, a), dim=2).indices
    mask = torch.zeros_like(cand).scatter_(2, top, True) & cand
    # An anchor claimed by several boxes goes to the one it overlaps most.
    multi = mask.sum(1, keepdim=True) > 1
    best = F.one_hot((iou * mask).argmax(1), m).transpose(1, 2).bool()
    mask = torch.where(multi, mask & best, mask)
    fg = mask.any(1)
    idx = mask.to(torch.uint8).argmax(1)  # [B, A]: index of the assigned box
    metric, iou = metric * mask, iou * mask
    norm = (metric * iou.amax(2, keepdim=True) / (metric.amax(2, keepdim=True) + 1e-9)).amax(1)  # [B, A]
    tcls = gcls.gather(1, idx)
    tscores = F.one_hot(tcls, nc).to(scores.dtype) * (norm * fg)[..., None]
    tboxes = gbox.gather(1, idx[..., None].expand(-1, -1, 4))
    return fg, tboxes, tscores


def detection_loss(
    box_logits: torch.Tensor, cls_logits: torch.Tensor, points: torch.Tensor, strides: torch.Tensor,
    gt: torch.Tensor, valid: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """box_logits [B, 4*R, A] (DFL), cls_logits [B, nc, A], points [2, A] in strides, strides [1, A]."""
    b, _, a = box_logits.shape
    dist_logits = box_logits.view(b, 4, -1, a)
    bins = dist_logits.shape[2]
    dist = (dist_logits.softmax(2) * torch.arange(bins, dtype=box_logits.dtype).view(1, 1, -1, 1)).sum(2)
    pred = (torch.cat([points - dist[:, :2], points + dist[:, 2:]], 1) * strides).transpose(1, 2)  # [B, A, 4]
    cls = cls_logits.transpose(1, 2)  # [B, A, nc]
    fg, tboxes, tscores = assign(pred.detach(), cls.detach().sigmoid(), points * strides, strides, gt, valid)
    total = tscores.sum().clamp(min=1.0)
    loss_cls = F.binary_cross_entropy_with_logits(cls, tscores, reduction="sum") / total
    loss_box = loss_dfl = cls.new_zeros(())
    if fg.any():
        weight = tscores.sum(-1)[fg]
        loss_box = ((1.0 - box_iou(pred[fg], tboxes[fg], giou=True)) * weight).sum() / total
        # DFL: cross-entropy on the two bins around each side's target distance, linearly weighted.
        s = strides.T.expand(b, -1, -1)[fg]  # [P, 1]
        p = points.T.expand(b, -1, -1)[fg]
        target = torch.cat([p - tboxes[fg][:, :2] / s, tboxes[fg][:, 2:] / s - p], 1).clamp(0, bins - 1.01)
        logits = dist_logits.permute(0, 3, 1, 2)[fg].reshape(-1, bins)  # [P*4, bins]
        left = target.floor().long().view(-1)
        w_left = (left + 1 - target.view(-1))
        ce = F.cross_entropy(logits, left, reduction="none") * w_left + F.cross_entropy(
            logits, left + 1, reduction="none"
        ) * (1 - w_left)
        loss_dfl = (ce.view(-1, 4).mean(1) * weight).sum() / total
    loss = GAIN_BOX * loss_box + GAIN_CLS * loss_cls + GAIN_DFL * loss_dfl
    return loss, {"box": loss_box.item(), "cls": loss_cls.item(), "dfl": loss_dfl.item()}
