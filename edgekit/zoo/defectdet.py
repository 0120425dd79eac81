"""DefectDet: a small anchor-free YOLOv8-style detector for the synthetic defect-detection data (160x160 RGB).

Backbone of Conv-BN-SiLU with residual blocks giving stride 8/16/32 maps, a tiny top-down neck (upsample +
concat + conv, as YOLOv8's FPN half), and per level a decoupled head: a box branch predicting a DFL
distribution over 16 bins for each of the four sides, and a class branch.

In eval mode the output is exactly Ultralytics' YOLOv8 export format: one tensor [N, 4 + nc, A]
(A = sum over strides 8, 16, 32 of (H/s) * (W/s)) whose rows 0-3 are cx, cy, w, h in input pixels (DFL
softmax expectation -> ltrb distances -> boxes around the anchor points, times the stride) and rows 4..
are sigmoid class scores. That concat of pixel-scale boxes and 0-1 scores in one tensor is deliberate:
it is the output a uniform per-tensor INT8 scale destroys.
"""

from __future__ import annotations

import torch
from torch import nn

STRIDES: tuple[int, ...] = (8, 16, 32)
REG_MAX = 16  # DFL bins per side, as YOLOv8: distances 0..15 strides
# Channels: stem (stride 2), stride 4, then the P3/P4/P5 stages (strides 8, 16, 32).
WIDTHS: tuple[int, ...] = (16, 32, 48, 64, 80)
NECK = 48  # neck and box-branch width
CLS_WIDTH = 32  # class-branch width: three classes need less than four DFL distributions


class ConvBnAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.SiLU(inplace=True),
        )


class Residual(nn.Module):
    """Two 3x3 Conv-BN-SiLU with an identity shortcut (YOLOv8's Bottleneck, without the C2f split)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBnAct(c, c), ConvBnAct(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Strided 3x3 downsampling conv, then one residual block."""
    return nn.Sequential(ConvBnAct(c_in, c_out, 3, 2), Residual(c_out))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over REG_MAX bins, expectation by a fixed 1x1 conv (as YOLOv8)."""

    def __init__(self, bins: int = REG_MAX) -> None:
        super().__init__()
        self.bins = bins
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, a = x.shape  # x: [N, 4 * bins, A]
        return self.conv(x.view(n, 4, self.bins, a).transpose(2, 1).softmax(1)).view(n, 4, a)


class DefectDet(nn.Module):
    def __init__(
        self, num_classes: int = 3, widths: tuple[int, ...] = WIDTHS, neck: int = NECK, cls_width: int = CLS_WIDTH
    ) -> None:
        super().__init__()
        self.nc = num_classes
        c1, c2, c3, c4, c5 = widths
        # Stride-2 stem and a stride-4 stage: ~1 px scratches must survive into the stride-8 map.
        self.stem = nn.Sequential(ConvBnAct(3, c1, 3, 2), _stage(c1, c2))
        self.p3, self.p4, self.p5 = _stage(c2, c3), _stage(c3, c4), _stage(c4, c5)
        # Top-down neck: P5 context reaches the P4 and P3 heads (long scratches need the big receptive field).
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lat5 = ConvBnAct(c5, neck, 1)
        self.fuse4 = ConvBnAct(c4 + neck, neck)
        self.fuse3 = ConvBnAct(c3 + neck, neck)
        self.box = nn.ModuleList(self._branch(neck, neck, 4 * REG_MAX) for _ in STRIDES)
        self.cls = nn.ModuleList(self._branch(neck, cls_width, num_classes) for _ in STRIDES)
        self.dfl = DFL()
        self._init_biases()

    @staticmethod
    def _branch(c_in: int, c: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(ConvBnAct(c_in, c), ConvBnAct(c, c), nn.Conv2d(c, c_out, 1))

    def _init_biases(self, size: int = 160) -> None:
        # YOLOv8's priors: box logits 1.0 (flat DFL), class prior ~5 objects per image spread over the grid.
        for box, cls, s in zip(self.box, self.cls, STRIDES):
            box[-1].bias.data[:] = 1.0
            cls[-1].bias.data[:] = float(torch.log(torch.tensor(5 / self.nc / (size / s) ** 2)))

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int], ...]]:
        """Box DFL logits [N, 4*REG_MAX, A], class logits [N, nc, A] and the (H, W) of each level."""
        x3 = self.p3(self.stem(x))
        x4 = self.p4(x3)
        x5 = self.p5(x4)
        l5 = self.lat5(x5)
        n4 = self.fuse4(torch.cat([self.up(l5), x4], 1))
        n3 = self.fuse3(torch.cat([self.up(n4), x3], 1))
        feats = (n3, n4, l5)
        n = x.shape[0]
        box = torch.cat([b(f).view(n, 4 * REG_MAX, -1) for b, f in zip(self.box, feats)], 2)
        cls = torch.cat([c(f).view(n, self.nc, -1) for c, f in zip(self.cls, feats)], 2)
        return box, cls, tuple((int(f.shape[2]), int(f.shape[3])) for f in feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, cls, shapes = self.raw(x)
        points, strides = anchors(shapes, x.dtype, x.device)
        dist = self.dfl(box)
        lt, rb = dist[:, :2], dist[:, 2:]  # slices, not chunk(): no Shape/Gather in the graph
        x1y1, x2y2 = points - lt, points + rb
        xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * strides
        return torch.cat([xywh, cls.sigmoid()], 1)


def anchors(
    shapes: tuple[tuple[int, int], ...], dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points [2, A] (x, y at cell centres, in units of each level's stride) and strides [1, A].

    Built from the feature shapes, so the traced ONNX graph holds them as constants (static input size).
    """
    points, strides = [], []
    for (h, w), s in zip(shapes, STRIDES):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=dtype, device=device) + 0.5,
            torch.arange(w, dtype=dtype, device=device) + 0.5,
            indexing="ij",
        )
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)]))
        strides.append(torch.full((1, h * w), float(s), dtype=dtype, device=device))
    return torch.cat(points, 1), torch.cat(strides, 1)


def defectdet(num_classes: int = 3) -> DefectDet:
    """DefectDet with the default widths (the factory that examples/detect/train.py trains)."""
    return DefectDet(num_classes=num_classes)
