"""Train the bundled DefectNet on the synthetic defects data and export it.

    python examples/defects/train.py            # writes defectnet.pt and defectnet.onnx next to this file

Deterministic on a given machine (fixed seeds, fixed thread count). Train and val data are
make_arrays(2000, seed=0) and make_arrays(400, seed=2): the same images that
`python -m edgekit.zoo.defects_data DIR` writes to DIR/train and DIR/val.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import yaml
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing edgekit

from edgekit.zoo.defectnet import DefectNet, defectnet  # noqa: E402
from edgekit.zoo.defects_data import CLASSES, make_arrays  # noqa: E402

TRAIN_SEED, VAL_SEED = 0, 2  # generate()'s train and val split seeds for seed=0


def load_preprocess(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    assert cfg["color"] == "rgb" and cfg["layout"] == "nchw", cfg
    return cfg


def preprocess(images: np.ndarray, cfg: dict) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB -> (n, 3, H, W) float32, exactly the preprocess.yaml formula."""
    h, w = cfg["size"]
    # The generator already draws at the model size, so 'stretch' resizing is the identity here.
    assert images.shape[1:3] == (h, w), (images.shape, cfg["size"])
    mean = np.asarray(cfg["mean"], np.float32)
    std = np.asarray(cfg["std"], np.float32)
    x = (images.astype(np.float32) * np.float32(cfg["scale"]) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip/90-degree rotation per sample: surfaces and defects have no preferred orientation."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=gen)
    out = x.clone()
    for k in range(8):
        idx = (ops == k).nonzero(as_tuple=True)[0]
        if idx.numel():
            t = torch.rot90(x[idx], k % 4, dims=(2, 3))
            out[idx] = torch.flip(t, dims=(3,)) if k >= 4 else t
    return out


def shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 8) -> torch.Tensor:
    """Random translation per sample (reflect-padded), so position is never a cue."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 200) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def train(
    model: DefectNet,
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    # Mild label smoothing: some generated defects are deliberately near-invisible.
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = loss_fn(model(shift(dihedral(x[idx], gen), gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = accuracy(model, xv, yv)
        dt = time.perf_counter() - t0
        print(f"epoch {epoch:2d}/{epochs}  loss {total / len(x):.4f}  val acc {acc:.4f}  ({dt:.1f}s)")


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int]) -> None:
    x = torch.zeros(1, 3, *size)
    # The TorchScript exporter is chosen on purpose (plain, static graph); silence its deprecation notice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            do_constant_folding=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, shuffling, augmentation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)

    cfg = load_preprocess(HERE / "preprocess.yaml")
    size = tuple(cfg["size"])
    t0 = time.perf_counter()
    imgs, labels = make_arrays(args.n_train, seed=TRAIN_SEED, size=size[0])
    vimgs, vlabels = make_arrays(args.n_val, seed=VAL_SEED, size=size[0])
    print(f"data: {len(imgs)} train / {len(vimgs)} val images in {time.perf_counter() - t0:.1f}s")
    x, y = torch.from_numpy(preprocess(imgs, cfg)), torch.from_numpy(labels)
    xv, yv = torch.from_numpy(preprocess(vimgs, cfg)), torch.from_numpy(vlabels)

    model = defectnet(num_classes=len(CLASSES))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DefectNet: {n_params:,} parameters")
    t1 = time.perf_counter()
    train(model, x, y, xv, yv, args.epochs, args.batch, args.lr, args.seed)
    train_s = time.perf_counter() - t1
    torch_acc = accuracy(model, xv, yv)
    print(f"training took {train_s:.0f}s; torch val accuracy {torch_acc:.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    pt_path, onnx_path = args.out_dir / "defectnet.pt", args.out_dir / "defectnet.onnx"
    model.eval()
    torch.save(model.state_dict(), pt_path)
    export_onnx(model, onnx_path, size)

    # Check the export: same logits as torch, and the accuracy ORT actually delivers.
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    xv_np = xv.numpy()
    logits = np.concatenate([sess.run(["logits"], {"image": xv_np[i : i + 1]})[0] for i in range(len(xv_np))])
    with torch.no_grad():
        ref = torch.cat([model(xv[i : i + 200]) for i in range(0, len(xv), 200)]).numpy()
    max_diff = float(np.abs(logits - ref).max())
    ort_acc = float((logits.argmax(1) == vlabels).mean())
    print(f"ONNX vs torch max |diff| {max_diff:.2e}; ORT val accuracy {ort_acc:.4f}")
    per_class = {c: float((logits.argmax(1)[vlabels == k] == k).mean()) for k, c in enumerate(CLASSES)}
    print("ORT per-class recall: " + ", ".join(f"{c} {a:.3f}" for c, a in per_class.items()))
    print(
        f"saved {pt_path} ({pt_path.stat().st_size / 1e6:.2f} MB), "
        f"{onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB)"
    )
    if max_diff >= 1e-4:
        print("ERROR: ONNX output differs from torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
