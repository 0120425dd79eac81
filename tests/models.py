"""Small reference networks the tests build (no torchvision here): written out, exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


class _ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class YoloStyle(nn.Module):
    """YOLOv8-style detector: a small conv backbone with three levels (strides 8, 16, 32), a decoupled
    head per level (box branch of 4 x reg_max distribution bins, class branch), the distribution-focal
    decode (softmax over the bins, then a fixed 1x1 conv with weights 0..reg_max-1), boxes decoded to
    pixels ((anchor +- distance) * stride, centre x/y and width/height) and sigmoid class scores,
    concatenated into one output [1, 4 + classes, anchors] as Ultralytics exports it."""

    def __init__(self, num_classes: int = 4, size: int = 128, reg_max: int = 16) -> None:
        super().__init__()
        self.nc, self.reg_max = num_classes, reg_max
        self.stem = nn.Sequential(_ConvBnAct(3, 16, 3, 2), _ConvBnAct(16, 32, 3, 2))
        self.p3 = _ConvBnAct(32, 32, 3, 2)
        self.p4 = _ConvBnAct(32, 48, 3, 2)
        self.p5 = _ConvBnAct(48, 64, 3, 2)
        chans = (32, 48, 64)
        self.box = nn.ModuleList(nn.Sequential(_ConvBnAct(c, 32), nn.Conv2d(32, 4 * reg_max, 1)) for c in chans)
        self.cls = nn.ModuleList(nn.Sequential(_ConvBnAct(c, 32), nn.Conv2d(32, num_classes, 1)) for c in chans)
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)
        points, strides = [], []
        for stride in (8, 16, 32):
            n = size // stride
            ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
            points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)]))
            strides.append(torch.full((1, n * n), float(stride)))
        self.register_buffer("anchors", torch.cat(points, 1).unsqueeze(0))  # [1, 2, A]
        self.register_buffer("strides", torch.cat(strides, 1).unsqueeze(0))  # [1, 1, A]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        levels = [torch.cat([b(p), c(p)], 1).flatten(2) for p, b, c in zip((p3, p4, p5), self.box, self.cls)]
        y = torch.cat(levels, 2)  # [1, 4 * reg_max + nc, A]
        box, cls = y.split((4 * self.reg_max, self.nc), 1)
        a = box.shape[-1]
        dist = self.dfl(box.view(-1, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(-1, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        boxes = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.strides
        return torch.cat([boxes, cls.sigmoid()], 1)


def yolo_style(num_classes: int = 4, size: int = 128) -> YoloStyle:
    """Weights seeded; BatchNorm settled on the tests' data (detector_images); class logits spread and
    shifted as a trained head's are (std 2, mostly background: about one score in six above 0.25)."""
    torch.manual_seed(0)
    model = YoloStyle(num_classes, size)
    x = torch.from_numpy(detector_images(32, size, seed=1))
    _settle_batchnorm(model, x)
    seen: dict[nn.Module, torch.Tensor] = {}
    convs = [head[-1] for head in (*model.box, *model.cls)]
    hooks = [c.register_forward_hook(lambda m, _i, out: seen.__setitem__(m, out)) for c in convs]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        for conv in convs:  # box bins peaked (std 3: distances follow the input), class logits std 2, shifted
            out = seen[conv]
            box = conv.out_channels == 4 * model.reg_max
            gain = (BOX_LOGIT_STD if box else 2.0) / float(out.std())
            conv.weight.mul_(gain)
            conv.bias.copy_((conv.bias - float(out.mean())) * gain - (0.0 if box else 3.0))
    return model.eval()


BOX_LOGIT_STD = 3.0


def detector_images(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Scenes the detector's outputs depend on: a dim noisy background with a few bright rectangles of
    random colour, position and size, in [0, 1] (float32, NCHW)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.25, (n, 3, size, size)).astype(np.float32)
    for img in images:
        for _ in range(rng.integers(1, 5)):
            w, h = rng.integers(size // 8, size // 2, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            img[:, y0:y0 + h, x0:x0 + w] = rng.uniform(0.3, 1.0, (3, 1, 1))
    return images


def export_yolo(model: nn.Module, path: Path, size: int = 128) -> Path:
    """Fixed shape, opset 17, one output 'output0' [1, 4 + classes, anchors] (as Ultralytics names it)."""
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["output0"])
    return path


class _ManualHardSwish(nn.Module):
    """HardSwish written out as PaddlePaddle's exporter (and PicoDet) writes it: x * relu6(x + 3) / 6, four
    ONNX nodes (Add, Clip, Mul, Div) that pnnx fuses into one ncnn HardSwish. The Mul's output points the
    same way as the result at six times its size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * nn.functional.relu6(x + 3.0) / 6.0


class PicoLike(nn.Module):
    """PP-PicoDet/LCNet-style backbone: conv-BN-hardswish stem, then depthwise 3x3 + pointwise 1x1 pairs,
    each followed by the written-out hardswish; global pool and a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def cba(cin: int, cout: int, k: int, s: int, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                                 _ManualHardSwish())

        self.stem = cba(3, 16, 3, 2)
        self.blocks = nn.Sequential(cba(16, 16, 3, 1, 16), cba(16, 32, 1, 1), cba(32, 32, 3, 2, 32), cba(32, 48, 1, 1),
                                    cba(48, 48, 3, 1, 48), cba(48, 64, 1, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def pico_like(num_classes: int = 10) -> PicoLike:
    torch.manual_seed(0)
    model = PicoLike(num_classes)
    _settle_batchnorm(model, torch.randn(64, 3, 64, 64))
    return model.eval()


@torch.jit.script
def _hard_swish_fwd(x: torch.Tensor) -> torch.Tensor:
    return x * (x + 3).clamp(min=0, max=6).div(6.0)


@torch.jit.script
def _hard_swish_bwd(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    m = torch.ones_like(x) * (x >= 3.0)
    return grad * torch.where((x >= -3.0) & (x <= 3.0), x / 3.0 + 0.5, m)


class HardSwishJitAutoFn(torch.autograd.Function):
    """A memory-efficient hardswish as older MobileNetV3/EfficientNet libraries write it (timm's
    activations_me): a custom autograd.Function around TorchScript kernels. The TorchScript ONNX exporter
    cannot inline it (prim::PythonOp); torch.export can."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return _hard_swish_fwd(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _hard_swish_bwd(ctx.saved_tensors[0], grad)


class HardSwishMe(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return HardSwishJitAutoFn.apply(x)


def mobilenet_me(num_classes: int = 10) -> MobileNetLike:
    """mobilenet_like (same weights) with every nn.Hardswish swapped for the memory-efficient HardSwishMe."""
    model = mobilenet_like(num_classes)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Hardswish):
                setattr(parent, name, HardSwishMe())
    return model.eval()


class _ListReluFn(torch.autograd.Function):
    """A custom activation computed in Python on the tensor's values: neither exporter can trace it (the
    TorchScript trace freezes it into constants, torch.export stops at the data-dependent branch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor([v if v > 0 else 0.0 for v in x.flatten().tolist()]).view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class ListRelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ListReluFn.apply(x)


def untraceable_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ListRelu(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).eval()


# ---------------------------------------------------------------- transformers (NCNN Gemm / MultiHeadAttention)


class _Attention(nn.Module):
    """Hugging Face style self-attention: separate q/k/v Linear layers, 4-D heads, softmax, output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v))
        a = torch.matmul(q, k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        return self.o(torch.matmul(a.softmax(-1), v).transpose(1, 2).reshape(b, n, d))


class _TransformerBlock(nn.Module):
    """Pre-norm encoder block: LayerNorm, attention (ours or nn.MultiheadAttention), LayerNorm, GELU MLP."""

    def __init__(self, dim: int, heads: int, torch_mha: bool = False) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.torch_mha = torch_mha
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if torch_mha else _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n1(x)
        x = x + (self.attn(y, y, y, need_weights=False)[0] if self.torch_mha else self.attn(y))
        return x + self.mlp(self.n2(x))


class TinyViT(nn.Module):
    """ViT: patch-embedding conv, class token, position embedding, encoder blocks, LayerNorm, Linear head
    on the class token."""

    def __init__(self, size: int = 32, patch: int = 8, dim: int = 32, heads: int = 2, depth: int = 2,
                 num_classes: int = 10, torch_mha: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_TransformerBlock(dim, heads, torch_mha) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class _MobileViTBlock(nn.Module):
    """Local 3x3 + 1x1 convs, unfold into 2x2 patches (4-D reshapes/transposes as transformers' MobileViT
    does), a transformer block over the patches, fold back, 1x1 projection, 1x1 fusion conv with the input
    (3x3 in MobileViT, where a BatchNorm evens out the two halves' ranges; without one a 3x3 fusion's
    6-bit INT8 weights lose the smaller half)."""

    def __init__(self, channels: int, dim: int = 32, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, dim, 1))
        self.transformer = _TransformerBlock(dim, 2)
        self.project = nn.Conv2d(dim, channels, 1)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        y = self.local(x)
        d, nh, nw = y.shape[1], h // p, w // p
        y = y.reshape(b * d * nh, p, nw, p).transpose(1, 2).reshape(b, d, nh * nw, p * p).transpose(1, 3)
        y = self.transformer(y.reshape(b * p * p, nh * nw, d))
        y = y.reshape(b, p * p, nh * nw, d).transpose(1, 3).reshape(b * d * nh, nw, p, p).transpose(1, 2)
        return self.fuse(torch.cat([x, self.project(y.reshape(b, d, h, w))], 1))


class TinyMobileViT(nn.Module):
    """Stem, one MobileViT block, 4x4 average pooling and a Linear head on the flattened map (a global mean
    over noise inputs barely varies: INT8 rounding would dominate what is left)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU())
        self.block = _MobileViTBlock(16)
        self.pool = nn.AvgPool2d(4)
        self.head = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


class _ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm over channels (channels-last via permute), Linear MLP, layer-scale gamma."""

    def __init__(self, dim: int, layer_scale: float) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, dim: int = 32, num_classes: int = 10, layer_scale: float = 0.5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(_ConvNeXtBlock(dim, layer_scale), _ConvNeXtBlock(dim, layer_scale))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


def _spread_logits(model: nn.Module, head: nn.Linear, x: torch.Tensor) -> nn.Module:
    """Centre and spread each class logit as a trained head's are (std 2): a random transformer's logits
    are near-uniform, and top-1 agreement on them is a coin toss."""
    with torch.no_grad():
        logits = model(x)
        gain = 2.0 / logits.std(0)
        head.weight.mul_(gain[:, None])
        head.bias.copy_((head.bias - logits.mean(0)) * gain)
    return model.eval()


def tiny_transformer(kind: str, size: int = 32) -> nn.Module:
    """'vit' (our attention: pnnx makes MultiHeadAttention), 'vit_torch_mha' (nn.MultiheadAttention),
    'mobilevit', 'convnext'; seeded, 4 classes (on random features, more classes means more near-ties
    whose top-1 flips with any rounding), logits spread on the tests' data (standard normal images)."""
    torch.manual_seed(0)
    model: nn.Module = {"vit": lambda: TinyViT(size, num_classes=4),
                        "vit_torch_mha": lambda: TinyViT(size, num_classes=4, torch_mha=True),
                        "mobilevit": lambda: TinyMobileViT(4), "convnext": lambda: TinyConvNeXt(num_classes=4)}[kind]()
    return _spread_logits(model.eval(), model.head, torch.randn(64, 3, size, size))


class FocusNet(nn.Module):
    """YOLOX's Focus stem (space-to-depth by four step-2 slices, concatenated), a conv, a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 16, 3, 1, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.head(torch.relu(self.conv(x)))


def focus_net() -> FocusNet:
    torch.manual_seed(0)
    return FocusNet().eval()


def export_fixed(model: nn.Module, path: Path, size: int = 32, name: str = "images") -> Path:
    """Fixed shape [1, 3, size, size], opset 17, one output 'logits'."""
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=[name], output_names=["logits"])
    return path


class ChannelStride(nn.Module):
    """A step-2 slice over channels before a 1x1 conv: ONNX Runtime and OpenVINO run it, ncnn has nothing for
    it (pnnx warns and leaves a layer ncnn cannot load)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, ::2])


def export_channel_stride(path: Path, samples: int) -> tuple[Path, Path]:
    """The ChannelStride model as ONNX (input x [1, 4, 8, 8]) and `samples` seeded inputs as .npz beside it."""
    torch.onnx.export(ChannelStride().eval(), (torch.randn(1, 4, 8, 8),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    data = path.with_suffix(".npz")
    np.savez(data, x=np.random.default_rng(0).standard_normal((samples, 4, 8, 8)).astype(np.float32))
    return path, data


class Fp16SumOverflow(nn.Module):
    """Activations and weights that fp16 storage holds exactly (inputs 20-40, weights +-100 plus multiples of
    1/16), through a 1x1 conv whose running sum passes 65504 before its two halves cancel: fp32 arithmetic (x86,
    or ARM with fp16 storage only) computes it; ncnn's fp16 arithmetic on an ARMv8.2 core overflows to inf."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(64, 16, 1)
        w = torch.randint(-2, 3, (16, 64)).float() / 16
        w[:, :32] += 100.0
        w[:, 32:] -= 100.0
        self.conv.weight.data = w.view(16, 64, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, x], 1)).mean((2, 3))


def export_fp16_sum_overflow(path: Path, samples: int) -> tuple[Path, Path]:
    """Fp16SumOverflow as ONNX (input x [1, 32, 8, 8], output y [1, 16]) and `samples` inputs in [20, 40]."""
    torch.onnx.export(Fp16SumOverflow().eval(), (torch.zeros(1, 32, 8, 8),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    data = path.with_suffix(".npz")
    np.savez(data, x=np.random.default_rng(0).uniform(20, 40, (samples, 32, 8, 8)).astype(np.float32))
    return path, data


class OutlierChannel(nn.Module):
    """One channel of c1's output is 2000x the others (its weights scaled up, c2's reading of it scaled down): FP32
    computes the same function, but one INT8 scale per activation tensor (the RKNN NPU's w8a8) spends all its levels
    on that channel and rounds the other 15 to zero. Keeping c1 and c2 in float recovers it; six near-identity convs
    after them carry the input-dependent signal to the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()) for _ in range(6)])
        with torch.no_grad():
            self.c1.weight[0] *= 2000
            self.c1.bias[0] *= 2000
            self.c2.weight[:, 0] /= 2000
            for block in self.body:
                nn.init.dirac_(block[0].weight)
                block[0].weight.add_(0.05 * torch.randn_like(block[0].weight))
                block[0].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.relu(self.c2(torch.relu(self.c1(x)))))


def export_outlier_channel(path: Path, samples: int) -> tuple[Path, Path]:
    """OutlierChannel as ONNX (input x [1, 3, 32, 32], output features) and `samples` seeded inputs beside it."""
    torch.onnx.export(OutlierChannel().eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["features"])
    data = path.with_suffix(".npz")
    np.savez(data, x=np.random.default_rng(0).standard_normal((samples, 3, 32, 32)).astype(np.float32))
    return path, data
