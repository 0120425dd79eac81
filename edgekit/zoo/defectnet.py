"""DefectNet: a small residual CNN for 3x96x96 surface-defect images (the bundled default model).

Deliberately plain (Conv/BatchNorm/ReLU, residual Add, global average pool, Linear) so that every
backend can run it, it exports cleanly to ONNX opset 17, and Torch-Pruning can trace and prune it.
"""

from __future__ import annotations

import torch
from torch import nn

# Stem width, then one residual block per stage; the stem and every stage halve the resolution
# (96 -> 48 -> 24 -> 12 -> 6 -> 3 px before the global pool).
STEM_CHANNELS = 16
STAGE_CHANNELS: tuple[int, ...] = (32, 64, 128, 160)


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class ResidualBlock(nn.Module):
    """Basic ResNet block: two 3x3 convs; an average-pool + 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2 = _conv_bn(c_out, c_out, 3)
        self.relu = nn.ReLU(inplace=True)
        # Shortcut: 2x2 average pool then 1x1 conv (ResNet-D). A strided 1x1 conv would read only
        # every other pixel, and thin defects would often fall between the samples.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            pool: nn.Module = nn.AvgPool2d(stride, stride) if stride != 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, _conv_bn(c_in, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + self.shortcut(x))


class DefectNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 4,
        stem_channels: int = STEM_CHANNELS,
        stage_channels: tuple[int, ...] = STAGE_CHANNELS,
    ) -> None:
        super().__init__()
        # Strided 3x3 stem: the windows still overlap, so ~1 px scratches and cracks are seen, and
        # full-resolution feature maps would cost ~7x the training time on a CPU.
        self.stem = nn.Sequential(_conv_bn(3, stem_channels, 3, 2), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        c_in = stem_channels
        for c_out in stage_channels:
            blocks.append(ResidualBlock(c_in, c_out, stride=2))
            c_in = c_out
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # exports as GlobalAveragePool
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # No zero-init of the residual branches' last BN: with every block starting as its
        # shortcut, training sat at chance for ~10 epochs on this data before finding the defects.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def defectnet(num_classes: int = 4) -> DefectNet:
    """DefectNet with the default widths (the factory that examples/defects/train.py trains)."""
    return DefectNet(num_classes=num_classes)
