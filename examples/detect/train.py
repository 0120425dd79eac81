"""Train the bundled DefectDet detector on the synthetic defect-box data and export it.

    nice -n 10 python examples/detect/train.py     # writes defectdet.pt and defectdet.onnx next to this file

Deterministic on a given machine (fixed seeds and thread count, deterministic algorithms) as long as the
time budget does not bind: the learning-rate schedule follows max(step progress, time progress), so a slow
(shared) machine still ends on an annealed, exported model, and the script then says the run was cut.
Train and val data are make_detection_arrays(1500, seed=0) and (200, seed=2): the same images that
`python -m edgekit.zoo.defect_boxes DIR` writes to DIR/train and DIR/val.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

# Before torch loads its OpenMP: idle threads sleep instead of spinning. On a shared machine a spinning
# team waits for a descheduled thread, and 2 threads ran 15x slower than 1 under another user's load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnxruntime as ort
import torch
import yaml
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing edgekit
sys.path.insert(0, str(HERE))

from detect_eval import coco_map, run_model  # noqa: E402
from tal_loss import detection_loss  # noqa: E402

from edgekit.zoo.defect_boxes import CLASSES, make_detection_arrays  # noqa: E402
from edgekit.zoo.defectdet import STRIDES, DefectDet, anchors, defectdet  # noqa: E402

TRAIN_SEED, VAL_SEED = 0, 2  # generate()'s train and val split seeds for seed=0


def load_preprocess(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    assert cfg["color"] == "rgb" and cfg["layout"] == "nchw", cfg
    return cfg


def preprocess(images: np.ndarray, cfg: dict) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB -> (n, 3, H, W) float32, exactly the preprocess.yaml formula."""
    assert images.shape[1:3] == tuple(cfg["size"]), (images.shape, cfg["size"])  # drawn at the model size
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    x = (images.astype(np.float32) * np.float32(cfg["scale"]) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def dihedral(x: torch.Tensor, boxes: list[np.ndarray], gen: torch.Generator) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Random transpose / flips per sample (the 8 flips and 90-degree rotations), boxes moved alike:
    surfaces and defects have no preferred orientation."""
    ops = torch.randint(0, 8, (len(x),), generator=gen).tolist()
    h, w = x.shape[2:]
    out, moved = [], []
    for img, b, op in zip(x, boxes, ops):
        b = b.copy()
        if op & 1:
            img, b = img.transpose(1, 2), b[:, [0, 2, 1, 4, 3]]
        if op & 2:
            img, b[:, [1, 3]] = img.flip(2), w - b[:, [3, 1]]
        if op & 4:
            img, b[:, [2, 4]] = img.flip(1), h - b[:, [4, 2]]
        out.append(img)
        moved.append(b)
    return torch.stack(out), moved


def pad_boxes(boxes: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image [k, 5] boxes -> gt [B, M, 5] and valid [B, M] (M >= 1 so empty batches still work)."""
    m = max(1, *(len(b) for b in boxes))
    gt = torch.zeros(len(boxes), m, 5)
    valid = torch.zeros(len(boxes), m, dtype=torch.bool)
    for i, b in enumerate(boxes):
        gt[i, : len(b)] = torch.from_numpy(b).float()
        valid[i, : len(b)] = True
    return gt, valid


class EMA:
    """Exponential moving average of the weights (as Ultralytics' ModelEMA): the model that is exported."""

    def __init__(self, model: nn.Module, decay: float = 0.998, tau: float = 200.0) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))  # ramps up: early weights are noise
        state = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(state[k].detach(), alpha=1 - d)
            else:
                v.copy_(state[k])


def torch_fn(model: nn.Module):
    @torch.no_grad()
    def fn(x: np.ndarray) -> np.ndarray:
        return model.eval()(torch.from_numpy(x)).numpy()

    return fn


def evaluate(model: nn.Module, xv: np.ndarray, gts: list[np.ndarray], size: tuple[int, int]) -> tuple[float, float]:
    return coco_map(run_model(torch_fn(model), xv, batch=50), gts, size, len(CLASSES))


def train(model: DefectDet, x: torch.Tensor, boxes: list[np.ndarray], xv: np.ndarray, vboxes: list[np.ndarray],
          args: argparse.Namespace) -> tuple[EMA, bool]:
    """Returns the EMA and whether the time budget cut the schedule."""
    gen = torch.Generator().manual_seed(args.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999))
    ema = EMA(model)
    per_epoch = (len(x) + args.batch - 1) // args.batch
    total_steps, warmup = args.epochs * per_epoch, 2 * per_epoch
    size = tuple(x.shape[2:])
    points, strides = anchors(tuple((size[0] // s, size[1] // s) for s in STRIDES))
    t_start, step, cut = time.perf_counter(), 0, False
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=gen).tolist()
        sums = {"box": 0.0, "cls": 0.0, "dfl": 0.0}
        for i in range(0, len(x), args.batch):
            idx = order[i : i + args.batch]
            # Step progress, unless the clock is a whole step ahead of it (a slow machine): then the clock's.
            clock = (time.perf_counter() - t_start) / args.time_budget
            progress = clock if clock > (step + 1) / total_steps else step / total_steps
            if progress >= 1.0:
                break
            cut |= clock > (step + 1) / total_steps
            # Linear warm-up, then cosine down to 1 % of the peak.
            lr = args.lr * (min(1.0, (step + 1) / warmup) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))))
            for g in opt.param_groups:
                g["lr"] = lr
            imgs, b = dihedral(x[idx], [boxes[j] for j in idx], gen)
            imgs = (imgs.float() / 255).contiguous(memory_format=torch.channels_last)
            box_logits, cls_logits, _ = model.raw(imgs)
            loss, parts = detection_loss(box_logits, cls_logits, points, strides, *pad_boxes(b))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            ema.update(model)
            step += 1
            for k, v in parts.items():
                sums[k] += v
        n = max(1, step - (epoch - 1) * per_epoch)
        line = f"epoch {epoch:2d}/{args.epochs}  " + "  ".join(f"{k} {v / n:.3f}" for k, v in sums.items())
        if epoch % args.eval_every == 0 or epoch == args.epochs or progress >= 1.0:
            m5095, m50 = evaluate(ema.model, xv, vboxes, size)
            line += f"  val mAP50-95 {m5095:.3f} mAP50 {m50:.3f}"
        print(f"{line}  lr {lr:.2e}  ({time.perf_counter() - t0:.1f}s)", flush=True)
        if progress >= 1.0:
            break
    return ema, cut


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int]) -> None:
    x = torch.zeros(1, 3, *size)
    # The TorchScript exporter on purpose (plain static graph, anchors folded to constants); hush its notice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the level shapes are meant to be constants
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output0"], do_constant_folding=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, shuffling, augmentation)")
    # One thread: on this shared 2-core machine it beat two under load (0.31 vs 0.40 s a step).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget", type=float, default=600.0, help="seconds of training at most")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    cfg = load_preprocess(HERE / "preprocess.yaml")
    size = tuple(cfg["size"])
    t0 = time.perf_counter()
    imgs, boxes = make_detection_arrays(args.n_train, seed=TRAIN_SEED, size=size[0])
    vimgs, vboxes = make_detection_arrays(args.n_val, seed=VAL_SEED, size=size[0])
    n_boxes = sum(len(b) for b in boxes)
    print(f"data: {len(imgs)} train ({n_boxes} boxes) / {len(vimgs)} val images in {time.perf_counter() - t0:.1f}s")
    # Training keeps uint8 and scales per batch; the formula is preprocess.yaml's (scale 1/255, mean 0, std 1).
    assert cfg["mean"] == [0.0] * 3 and cfg["std"] == [1.0] * 3, cfg
    x = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
    xv = preprocess(vimgs, cfg)

    model = defectdet(num_classes=len(CLASSES)).to(memory_format=torch.channels_last)
    print(f"DefectDet: {sum(p.numel() for p in model.parameters()):,} parameters")
    t1 = time.perf_counter()
    ema, cut = train(model, x, boxes, xv, vboxes, args)
    print(f"training took {time.perf_counter() - t1:.0f}s")
    final = ema.model.eval().to(memory_format=torch.contiguous_format)
    m5095, m50 = evaluate(final, xv, vboxes, size)
    print(f"torch FP32 val mAP50-95 {m5095:.4f}  mAP50 {m50:.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    pt_path, onnx_path = args.out_dir / "defectdet.pt", args.out_dir / "defectdet.onnx"
    torch.save(final.state_dict(), pt_path)
    export_onnx(final, onnx_path, size)

    # Check the export: the same output as torch, and the mAP ONNX Runtime actually delivers.
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(["output0"], {"images": xv[i : i + 1]})[0] for i in range(len(xv))])
    with torch.no_grad():
        ref = np.concatenate([final(torch.from_numpy(xv[i : i + 50])).numpy() for i in range(0, len(xv), 50)])
    box_diff, score_diff = float(np.abs(out[:, :4] - ref[:, :4]).max()), float(np.abs(out[:, 4:] - ref[:, 4:]).max())
    o5095, o50 = coco_map(run_model(lambda b: sess.run(["output0"], {"images": b})[0], xv), vboxes, size,
                          len(CLASSES))
    print(f"ONNX output {list(out.shape[1:])}; vs torch max |diff| boxes {box_diff:.2e} px, scores {score_diff:.2e}")
    print(f"ORT FP32 val mAP50-95 {o5095:.4f}  mAP50 {o50:.4f}")
    print(f"saved {pt_path} ({pt_path.stat().st_size / 1e6:.2f} MB), "
          f"{onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB)")
    if cut:
        print("NOTE: the time budget shortened the schedule: this run is not the deterministic reference",
              file=sys.stderr)
    if box_diff >= 1e-3 or score_diff >= 1e-4:
        print("ERROR: ONNX output differs from torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
