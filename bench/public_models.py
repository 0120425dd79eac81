"""Public model definitions, built and trained here (no hub downloads): YOLOv8n from Ultralytics' own
definition, trained briefly on generated detection images, exported as Ultralytics exports it.

    from public_models import yolov8n_trained
    built = yolov8n_trained(Path("~/.cache/edgekit-tests").expanduser(), steps=450)
    built.onnx, built.calib, built.val, built.val_boxes, built.meta

Also a numpy-only detection decoder (cx, cy, w, h + class scores; confidence threshold, NMS) and box
matching, to judge artifacts on decoded boxes rather than tensors.

Needs `ultralytics` (installed with --no-deps; beyond edgekit's own dependencies it imports only
opencv-python-headless). Ultralytics reads torchvision's version at import time; without torchvision (the
CPU venv has none) that lookup is answered with "0.0.0" during the import only (`import_ultralytics`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 160
CLASSES = ("disc", "square", "triangle", "ring")
# Bump when the generator, the training recipe or the export changes: it is part of the cache key.
RECIPE_VERSION = 3


# ---------------------------------------------------------------- generated detection images


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: a smooth two-colour gradient, low-frequency blotches, fine grain. [H, W, 3] 0-1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0.15, 0.85, 3), rng.uniform(0.15, 0.85, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    for _ in range(3):  # blotches: sums of low-frequency waves
        fx, fy = rng.uniform(1, 6, 2)
        phase = rng.uniform(0, 2 * np.pi)
        img += (0.06 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))[..., None] * rng.uniform(0.3, 1, 3)
    img += rng.normal(0, 0.035, img.shape)  # grain
    return img.astype(np.float32)


def _mask(cls: int, size: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """The shape's pixels; the shape fills the box [cx - r, cx + r] x [cy - r, cy + r] (r: half the side)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (xx - cx) / r, (yy - cy) / r
    if cls == 0:  # disc
        return dx * dx + dy * dy <= 1.0
    if cls == 1:  # square
        return (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    if cls == 2:  # triangle, apex up or down
        v = dy if rng.random() < 0.5 else -dy
        return (v >= -1.0) & (v <= 1.0) & (np.abs(dx) <= (v + 1.0) / 2.0)
    ring = dx * dx + dy * dy
    return (ring <= 1.0) & (ring >= rng.uniform(0.25, 0.45))  # ring


def detection_sample(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One image [3, H, W] float32 in 0-1 (RGB) with 1-3 shapes of 4 classes, and their boxes
    [k, 5]: class, x1, y1, x2, y2 in pixels. Shapes overlap little (box IoU < 0.2)."""
    img = _background(rng, size)
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(20):
            r = float(rng.uniform(0.07, 0.3) * size)
            cx, cy = rng.uniform(r, size - r, 2)
            box = [cx - r, cy - r, cx + r, cy + r]
            if all(box_iou(np.array(box), np.array(b[1:]))[0] < 0.2 for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(CLASSES)))
        m = _mask(cls, size, float(cx), float(cy), r, rng)
        under = img[m].mean(0)
        colour = rng.uniform(0, 1, 3)
        while np.abs(colour - under).max() < 0.35:  # visible against what it covers
            colour = rng.uniform(0, 1, 3)
        shade = 1.0 + 0.15 * (np.mgrid[0:size, 0:size][0] - cy) / size  # a little shading
        img[m] = colour[None] * shade[m][:, None] + rng.normal(0, 0.02, (int(m.sum()), 3))
        boxes.append([cls, *box])
    return np.clip(img, 0, 1).transpose(2, 0, 1).copy(), np.array(boxes, np.float32).reshape(-1, 5)


def detection_images(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """n images [n, 3, H, W] float32 0-1 and their boxes (one [k, 5] array each), deterministic in seed."""
    rng = np.random.default_rng(seed)
    samples = [detection_sample(rng, size) for _ in range(n)]
    return np.stack([s[0] for s in samples]), [s[1] for s in samples]


# ---------------------------------------------------------------- decoding and matching boxes (numpy)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [n, 4] (or [4]) against b [m, 4] (or [4]), xyxy: [n, m] (or [m])."""
    a2, b2 = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    lt = np.maximum(a2[:, None, :2], b2[None, :, :2])
    rb = np.minimum(a2[:, None, 2:], b2[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    iou = inter / np.maximum(area(a2)[:, None] + area(b2)[None] - inter, 1e-9)
    return iou[0] if a.ndim == 1 else iou


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou]
    return np.array(keep, np.int64)


def decode(output: np.ndarray, conf: float = 0.25, iou: float = 0.45, max_det: int = 100) -> np.ndarray:
    """Detections of one image from a YOLOv8 export output [1, 4 + nc, N] (or [4 + nc, N]): rows cx, cy, w, h
    in pixels, then class scores. Per-class NMS (as Ultralytics' non_max_suppression, agnostic=False).
    Returns [k, 6]: x1, y1, x2, y2, score, class."""
    p = np.asarray(output, np.float64).reshape(output.shape[-2], output.shape[-1]).T  # [N, 4 + nc]
    cls_scores = p[:, 4:]
    cls = cls_scores.argmax(1)
    score = cls_scores[np.arange(len(p)), cls]
    keep = score > conf
    xywh, score, cls = p[keep, :4], score[keep], cls[keep]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    # per-class NMS by offsetting each class's boxes apart (Ultralytics' trick)
    kept = nms(xyxy + cls[:, None] * 4096.0, score, iou)[:max_det]
    return np.concatenate([xyxy[kept], score[kept, None], cls[kept, None]], 1)


def match(found: np.ndarray, wanted: np.ndarray, iou: float = 0.5, same_class: bool = True) -> dict[str, Any]:
    """How well detections `found` [k, 6] cover `wanted` (detections [m, 6] or labels [m, 5] class-first):
    each wanted box's best IoU with a found box (of its class), recall at `iou`, and how many found boxes
    match nothing wanted (extra)."""
    if wanted.shape[1] == 5:  # labels: class, x1, y1, x2, y2
        wanted = np.concatenate([wanted[:, 1:], np.ones((len(wanted), 1)), wanted[:, :1]], 1)
    best = np.zeros(len(wanted))
    if len(wanted) and len(found):
        ious = box_iou(wanted[:, :4], found[:, :4])
        if same_class:
            ious = ious * (wanted[:, 5:6] == found[None, :, 5])
        best = ious.max(1)
        extra = int((ious.max(0) < iou).sum())
    else:
        extra = len(found)
    return {"best_iou": best, "hits": int((best >= iou).sum()), "wanted": len(wanted), "extra": extra}


def match_all(found: list[np.ndarray], wanted: list[np.ndarray], iou: float = 0.5) -> dict[str, float]:
    """match() over images: mean best IoU, recall and extra boxes per wanted box."""
    ms = [match(f, w, iou) for f, w in zip(found, wanted)]
    n = sum(m["wanted"] for m in ms)
    best = np.concatenate([m["best_iou"] for m in ms]) if n else np.zeros(0)
    return {"mean_best_iou": float(best.mean()) if n else float("nan"),
            "recall": sum(m["hits"] for m in ms) / n if n else float("nan"),
            "extra": sum(m["extra"] for m in ms), "wanted": n, "found": sum(len(f) for f in found)}


def map50(found: list[np.ndarray], labels: list[np.ndarray], nc: int = len(CLASSES)) -> float:
    """mAP at IoU 0.5 (all-point interpolated AP per class, averaged over classes with labels)."""
    aps = []
    for c in range(nc):
        n_gt = sum(int((lab[:, 0] == c).sum()) for lab in labels)
        if n_gt == 0:
            continue
        dets: list[tuple[float, bool]] = []
        for f, lab in zip(found, labels):
            gt = lab[lab[:, 0] == c, 1:]
            used = np.zeros(len(gt), bool)
            for d in f[f[:, 5] == c][np.argsort(-f[f[:, 5] == c][:, 4], kind="stable")]:
                ious = box_iou(d[:4], gt) if len(gt) else np.zeros(0)
                j = int(ious.argmax()) if len(ious) else -1
                ok = j >= 0 and ious[j] >= 0.5 and not used[j]
                if ok:
                    used[j] = True
                dets.append((float(d[4]), ok))
        dets.sort(key=lambda t: -t[0])
        tp = np.cumsum([ok for _, ok in dets]) if dets else np.zeros(0)
        precision = tp / np.arange(1, len(dets) + 1) if dets else np.zeros(0)
        recall = tp / n_gt if dets else np.zeros(0)
        r = np.concatenate([[0.0], recall, [1.0]])
        p = np.concatenate([[1.0], precision, [0.0]])
        p = np.maximum.accumulate(p[::-1])[::-1]
        aps.append(float(((r[1:] - r[:-1]) * p[1:]).sum()))
    return float(np.mean(aps)) if aps else float("nan")


# ---------------------------------------------------------------- running a package's artifacts


def artifact_runner(package: Path, artifact: dict[str, Any]) -> Any:
    """A function image batch [1, 3, H, W] -> the artifact's first output, run in the artifact's own runtime
    as examples/loaders/ load it (ONNX Runtime on model.onnx, OpenVINO on model.xml with the verified
    precision hint, ncnn on the .param/.bin with details.runtime_options and input/output blobs)."""
    path = Path(package) / artifact["entry"]
    details, backend, precision = artifact["details"], artifact["backend"], artifact["precision"]
    if backend in ("onnxruntime", "ort-mobile"):
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if backend == "openvino":
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": details.get("inference_precision_hint", "f32")}
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        return lambda x: compiled(x)[compiled.output(0)]
    if backend == "ncnn":
        import ncnn

        from edgekit.backends.ncnn.param_bin import to_mat

        net = ncnn.Net()
        net.opt.use_vulkan_compute = False
        net.opt.use_bf16_storage = False
        net.opt.use_fp16_storage = net.opt.use_fp16_packed = precision == "fp16"
        net.opt.use_fp16_arithmetic = False
        net.opt.use_int8_inference = precision == "int8"
        for option, value in details.get("runtime_options", {}).items():
            setattr(net.opt, option, value)
        if net.load_param(str(path)) != 0 or net.load_model(str(path).replace(".param", ".bin")) != 0:
            raise RuntimeError(f"ncnn could not load {path}")
        shape = (details.get("output_shapes") or [None])[0]

        def run(x: np.ndarray) -> np.ndarray:
            ex = net.create_extractor()
            ex.input(details["input_blobs"][0], to_mat(ncnn, x[0]))  # no batch axis; channels aligned as ncnn's
            ret, out = ex.extract(details["output_blobs"][0])
            if ret != 0:
                raise RuntimeError(f"ncnn could not compute {details['output_blobs'][0]} (error {ret})")
            y = np.array(out)
            return y.reshape(shape) if shape else y[None]

        return run
    raise ValueError(f"no runner for backend {backend}")


def box_agreement(package: Path, images: np.ndarray, labels: list[np.ndarray] | None = None,
                  conf: float = 0.25, iou: float = 0.45) -> dict[str, dict[str, Any]]:
    """Every artifact of a package (manifest.json) run on the images and decoded (decode(): conf, NMS iou);
    per artifact: its boxes vs the FP32 ONNX Runtime artifact's boxes (mean best IoU of each FP32 box, recall
    at IoU 0.5, extra boxes), and mAP50 / recall vs the labels when given."""
    manifest = json.loads((Path(package) / "manifest.json").read_text())
    dets = {}
    for a in manifest["artifacts"]:
        run = artifact_runner(package, a)
        dets[a["key"]] = [decode(run(x[None].astype(np.float32)), conf, iou) for x in images]
    ref_key = "onnxruntime-fp32" if "onnxruntime-fp32" in dets else next(iter(dets))
    out = {}
    for key, found in dets.items():
        r = {"vs": ref_key, **match_all(found, dets[ref_key])}
        if labels is not None:
            r["map50"] = map50(found, labels)
            r["label_recall50"] = match_all(found, labels)["recall"]
        out[key] = r
    return out


# ---------------------------------------------------------------- Ultralytics YOLOv8n


def import_ultralytics() -> Any:
    """`ultralytics.nn.tasks`, quietly and offline. Ultralytics reads torchvision's installed version at import
    (importlib.metadata) and nothing here uses torchvision; without it installed, that one lookup answers
    "0.0.0" while the import runs. Importing ultralytics also replaces PIL's `Image.open` process-wide with one
    that pip-installs pi-heif on any unreadable file; the real `Image.open` is put back, so edgekit's own image
    readers (masks, calibration folders) keep raising their clear errors in the same process."""
    import importlib.metadata as md

    from PIL import Image

    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_OFFLINE", "True")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    real = md.version
    pil_open = Image.open

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name == "torchvision":
                return "0.0.0"
            raise

    md.version = version
    try:
        import ultralytics.nn.tasks as tasks
    finally:
        md.version = real
        Image.open = pil_open
    return tasks


@dataclass
class Built:
    folder: Path
    onnx: Path
    calib: Path
    val: Path
    val_boxes: Path  # npz: one [k, 5] array (class, x1, y1, x2, y2) per validation image, keys "0", "1", ...
    meta: dict[str, Any]

    def labels(self) -> list[np.ndarray]:
        with np.load(self.val_boxes) as z:
            return [z[str(i)] for i in range(len(z.files))]


def _settings(seconds: float | None, steps: int | None, seed: int, size: int, n_calib: int, n_val: int, batch: int,
              lr: float) -> dict:
    import torch

    return {"model": "yolov8n.yaml", "nc": len(CLASSES), "seconds": seconds, "steps": steps, "seed": seed, "size": size,
            "n_calib": n_calib, "n_val": n_val, "batch": batch, "lr": lr, "recipe": RECIPE_VERSION,
            "ultralytics": _version("ultralytics"), "torch": torch.__version__.split("+")[0]}


def _version(name: str) -> str:
    import importlib.metadata as md

    return md.version(name)


def yolov8n_trained(out_dir: Path, seconds: float | None = None, steps: int | None = 450, seed: int = 0,
                    size: int = SIZE, n_calib: int = 64, n_val: int = 48, batch: int = 8, lr: float = 2e-3,
                    log: Any = None) -> Built:
    """YOLOv8n (Ultralytics' yolov8n.yaml, nc=4, random init) trained on CPU (one thread) for `steps` batches
    (deterministic: the same model on every run; 450 steps of 8 images took 150-210 s on a busy 2-core VM) or, with
    steps=None, for a `seconds` budget (the step count fixed from the first 20 steps' pace) on
    generated images with Ultralytics' own loss (v8DetectionLoss via model.loss(batch)), exported to ONNX
    as Ultralytics' exporter does (fused conv+BN, Detect export mode: output0 [1, 4 + nc, N], decoded
    xywh pixels + sigmoid scores; opset 17, fixed 1x3xHxW, onnxslim), with calibration and validation
    .npz (key "images", 0-1 RGB). Cached in out_dir under a hash of the settings: a rerun is instant."""
    if steps is None and seconds is None:
        raise ValueError("give steps or seconds")
    settings = _settings(None if steps else seconds, steps, seed, size, n_calib, n_val, batch, lr)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(out_dir).expanduser() / f"yolov8n-{key}"
    if (folder / "meta.json").is_file():
        return _built(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _train_and_export(tmp, settings, log or (lambda *_: None))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        with contextlib.suppress(FileExistsError, OSError):
            tmp.rename(folder)  # another process may have made it meanwhile: keep that one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _built(folder)


def _built(folder: Path) -> Built:
    return Built(folder, folder / "yolov8n.onnx", folder / "calib.npz", folder / "val.npz", folder / "val_boxes.npz",
                 json.loads((folder / "meta.json").read_text()))


def _targets(labels: list[np.ndarray], size: int) -> dict[str, Any]:
    """Ultralytics' batch dict: batch_idx [n], cls [n, 1], bboxes [n, 4] normalised xywh."""
    import torch

    idx, cls, xywh = [], [], []
    for i, lab in enumerate(labels):
        for c, x1, y1, x2, y2 in lab:
            idx.append(i)
            cls.append([c])
            xywh.append([(x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size])
    return {"batch_idx": torch.tensor(idx, dtype=torch.float32), "cls": torch.tensor(cls, dtype=torch.float32),
            "bboxes": torch.tensor(xywh, dtype=torch.float32).reshape(-1, 4)}


def _train_and_export(folder: Path, s: dict, log: Any) -> dict[str, Any]:
    import torch

    tasks = import_ultralytics()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a busy 2-core machine two threads were 20x slower (spin-waits)
    try:
        return _train_export_1(folder, s, log, tasks)
    finally:
        torch.set_num_threads(threads)


def _train_export_1(folder: Path, s: dict, log: Any, tasks: Any) -> dict[str, Any]:
    import torch
    from ultralytics.cfg import get_cfg

    torch.manual_seed(s["seed"])
    model = tasks.DetectionModel(s["model"], nc=s["nc"], verbose=False)
    model.args = get_cfg()  # the loss gains (box 7.5, cls 0.5, dfl 1.5) of Ultralytics' default.yaml
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"], weight_decay=5e-4)
    rng = np.random.default_rng(s["seed"] + 1000)
    start, step, losses, total = time.perf_counter(), 0, [], None
    warmup = 20
    while True:
        elapsed = time.perf_counter() - start
        if total is None and s["steps"]:
            total = s["steps"]
        if total is None and step == warmup:  # the step count the time budget allows, fixed once measured
            total = max(warmup + 1, int(s["seconds"] / (elapsed / warmup)))
        if (total is not None and step >= total) or (s["seconds"] and elapsed > 1.5 * s["seconds"]):
            break
        frac = step / warmup if step < warmup else 1.0
        if total is not None and step >= warmup:  # linear warmup, then cosine to 5%
            frac = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        for g in opt.param_groups:
            g["lr"] = s["lr"] * max(frac, 0.02)
        samples = [detection_sample(rng, s["size"]) for _ in range(s["batch"])]
        batch = {"img": torch.from_numpy(np.stack([x for x, _ in samples])), **_targets([b for _, b in samples],
                                                                                          s["size"])}
        loss, items = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append([float(v) for v in items.values()])
        if step % 20 == 0:
            log(f"step {step}/{total or '?'} {time.perf_counter() - start:.0f}s loss "
                + " ".join(f"{k} {float(v):.3f}" for k, v in items.items()))
        step += 1
    train_s = time.perf_counter() - start

    calib, _ = detection_images(s["n_calib"], s["seed"] + 1, s["size"])
    val, val_labels = detection_images(s["n_val"], s["seed"] + 2, s["size"])
    onnx_path = _export(model, folder / "yolov8n.onnx", s["size"])
    np.savez(folder / "calib.npz", images=calib)
    np.savez(folder / "val.npz", images=val)
    np.savez(folder / "val_boxes.npz", **{str(i): b for i, b in enumerate(val_labels)})

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    found = [decode(sess.run(None, {"images": x[None]})[0]) for x in val]
    quality = match_all(found, val_labels)
    last = np.mean(losses[-20:], 0).tolist() if losses else []
    return {"settings": s, "steps": step, "images_seen": step * s["batch"], "train_seconds": round(train_s, 1),
            "final_loss": dict(zip(("box", "cls", "dfl"), last)), "val_map50": map50(found, val_labels),
            "val_recall50": quality["recall"], "val_mean_best_iou": quality["mean_best_iou"],
            "val_boxes": quality["wanted"], "val_found": quality["found"], "val_extra": quality["extra"],
            "input": "images", "output": "output0", "shape": [1, 3, s["size"], s["size"]]}


def _export(model: Any, path: Path, size: int) -> Path:
    """As Ultralytics' Exporter does for format=onnx: no grads, eval, fuse conv+BN, Detect in export mode
    (decoded [1, 4 + nc, N] alone), C2f's split forward, its torch2onnx (TorchScript exporter), onnxslim."""
    import onnx
    import torch
    from ultralytics.nn.modules import C2f, Detect
    from ultralytics.utils.export.engine import torch2onnx

    for p in model.parameters():
        p.requires_grad = False
    model.eval()
    model.float()
    model = model.fuse()
    for m in model.modules():
        if isinstance(m, Detect):
            m.dynamic, m.export, m.format, m.xyxy, m.shape = False, True, "onnx", False, None
        elif isinstance(m, C2f):
            m.forward = m.forward_split
    im = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        y = model(im)
    assert isinstance(y, torch.Tensor) and y.shape[1] == 4 + len(CLASSES), type(y)
    torch2onnx(model, im, path, opset=17, input_names=["images"], output_names=["output0"])
    import onnxslim

    slim = onnxslim.slim(onnx.load(str(path)))
    onnx.save(slim, str(path))
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build (or find cached) the briefly trained YOLOv8n and its data.")
    ap.add_argument("--out", type=Path, default=Path("~/.cache/edgekit-tests"))
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--seconds", type=float, help="a time budget instead of --steps")
    a = ap.parse_args()
    t0 = time.perf_counter()
    b = yolov8n_trained(a.out, seconds=a.seconds, steps=None if a.seconds else a.steps,
                        log=print)
    print(json.dumps({**b.meta, "folder": str(b.folder), "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
