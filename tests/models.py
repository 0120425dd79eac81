"""Small reference networks the tests build (no torchvision here): written out, exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.relu(self.fc1(self.pool(x)))
        return x * nn.functional.hardsigmoid(self.fc2(s))


class MobileBlock(nn.Module):
    """MobileNetV3-style: expand 1x1, depthwise 3x3, SE, project 1x1, hardswish."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.Hardswish(),
            SqueezeExcite(mid),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(MobileBlock(16, 24, 2), MobileBlock(24, 24, 1), MobileBlock(24, 40, 2),
                                    MobileBlock(40, 40, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def mobilenet_like(num_classes: int = 10) -> MobileNetLike:
    torch.manual_seed(0)
    model = MobileNetLike(num_classes)
    _settle_batchnorm(model, torch.randn(64, 3, 64, 64))  # the tests' data: standard normal images
    return model.eval()


def _settle_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give BatchNorm the exact statistics of `x` (cumulative average, one pass). A few momentum-0.1
    passes leave each running variance mostly at its initial 1, so every BatchNorm shrinks the
    activations' spread and the outputs end up nearly independent of the input (std over samples
    0.07% of their size), which no quantization check can fail on."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def export_dynamic(model: nn.Module, path: Path, opset: int, size: int = 64) -> Path:
    """Export as a vendor would: old opset, dynamic batch and spatial dims."""
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=["scores"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "scores": {0: "batch"}})
    return path


class TinyDetector(nn.Module):
    """Mobile-detector style: depthwise/SE backbone, an upsampling Resize and a ConvTranspose path,
    a Concat of branches, and two heads (class map with sigmoid, box regression)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.c3 = nn.Sequential(MobileBlock(16, 24, 2), MobileBlock(24, 24, 1))
        self.c4 = nn.Sequential(MobileBlock(24, 40, 2), MobileBlock(40, 40, 1))
        self.lateral = nn.Conv2d(40, 24, 1)
        self.deconv = nn.ConvTranspose2d(40, 24, 2, stride=2)
        self.fuse = nn.Sequential(nn.Conv2d(72, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.cls = nn.Conv2d(32, num_classes, 1)
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        up = nn.functional.interpolate(self.lateral(c4), scale_factor=2.0, mode="nearest")
        f = self.fuse(torch.cat([c3, up, self.deconv(c4)], dim=1))
        return torch.sigmoid(self.cls(f)), self.box(f)


def tiny_detector(num_classes: int = 3) -> TinyDetector:
    torch.manual_seed(0)
    model = TinyDetector(num_classes)
    x = torch.rand(32, 3, 96, 96) * 2 - 1  # the tests' data: uniform in [-1, 1]
    _settle_batchnorm(model, x)
    logits: list[torch.Tensor] = []
    hook = model.cls.register_forward_hook(lambda _m, _i, out: logits.append(out))
    with torch.no_grad():
        model(x)
        hook.remove()
        gain = 2.0 / float(logits[0].std())  # class logits spread as a trained head's do (std 2)
        model.cls.weight.mul_(gain)
        model.cls.bias.mul_(gain)
    return model.eval()


def export_detector(model: nn.Module, path: Path, opset: int, size: int = 96) -> Path:
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=["scores", "boxes"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                    "scores": {0: "batch", 2: "h", 3: "w"}, "boxes": {0: "batch", 2: "h", 3: "w"}})
    return path


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, an identity shortcut or a 1x1 conv+BN projection, Add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(nn.functional.relu(self.bn1(self.conv1(x)))))
        return nn.functional.relu(y + self.shortcut(x))


class TinyResNet(nn.Module):
    """A small ResNet for 3x32x32 inputs: two identity blocks (their Adds tie the stem and four convs to
    one channel count), two projection blocks, global pool, a hidden Linear ('embed') and the classes."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 32, 1))
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = BasicBlock(64, 128, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(128, 128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(nn.functional.relu(self.embed(torch.flatten(self.pool(x), 1))))


def tiny_resnet(num_classes: int = 5) -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet(num_classes)
    with torch.no_grad():  # a rank-8 hidden layer (trained heads are often nearly low-rank): SVD has something to find
        model.embed.weight.copy_(torch.randn(128, 8) @ torch.randn(8, 128) / 32)
    x = torch.randn(64, 3, 32, 32)  # the tests' data: standard normal images
    _settle_batchnorm(model, x)
    with torch.no_grad():  # centre and spread each class's logit as a trained head's are, so the argmax varies
        logits = model(x)
        gain = 2.0 / logits.std(0)
        model.fc.weight.mul_(gain[:, None])
        model.fc.bias.copy_((model.fc.bias - logits.mean(0)) * gain)
    return model.eval()
