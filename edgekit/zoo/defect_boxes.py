"""Synthetic surface-defect images with bounding boxes: the data set behind the bundled DefectDet detector.

The same metal-like textures as defects_data, with 0-4 defects per image (classes: crack, scratch, spot).
Each defect is drawn on its own map, so its box is exactly the extent of its visible pixels (where the
defect changes the surface by at least a fifth of its peak contrast). Each image has its own numpy
generator seeded by (split seed, index), so any image can be redrawn alone and in any order.

    python -m edgekit.zoo.defect_boxes DIR      # DIR/{train,calib,val}/{images,labels}, classes.txt, data.yaml

Only numpy and Pillow are used: the data can be produced where torch is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from edgekit.errors import BadInput
from edgekit.zoo.defects_data import (
    _contrast,
    _grid,
    _image_rng,
    _line_profile,
    _log_uniform,
    _polyline_distance,
    _texture,
    _walk,
)

CLASSES: tuple[str, ...] = ("crack", "scratch", "spot")
SPLITS: tuple[str, ...] = ("train", "calib", "val")
DEFAULT_SIZE = 160  # 5x the stride-32 grid; 1 px scratches stay visible without a large input
_STAMP = ".complete"
_FORMAT_VERSION = 1  # bump when the drawing or label code changes, so old folders get regenerated

# Defects per image: ~15 % true negatives, the rest 1-4 defects.
_COUNT_P = (0.15, 0.30, 0.25, 0.18, 0.12)
_VISIBLE = 0.2  # a pixel belongs to a defect where |defect| >= this fraction of its peak (below the
# scratches' 0.25 end taper, so a faint end is inside its box)
_MIN_BOX = 4.0  # px: thinner boxes are widened about their centre (annotators do not draw 2 px boxes)
_MAX_IOU = 0.15  # a new defect overlapping an earlier one more than this is redrawn: boxes stay separable


def _centre(rng: np.random.Generator, size: int, margin: float) -> np.ndarray:
    return rng.uniform(margin, size - margin, 2)


def _one_scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    """One thin, nearly straight line (defects_data._scratch draws 1-3 over the whole image)."""
    length = _log_uniform(rng, 0.1, 0.6) * size
    heading = rng.uniform(0, np.pi)
    direction = np.array([np.cos(heading), np.sin(heading)])
    # Whole line inside the image (per-axis margin): a box is then the full scratch, never a clipped stub.
    margin = 3 + 0.5 * length * np.abs(direction) + 0.03 * length
    centre = rng.uniform(margin, size - margin)
    normal = np.array([-direction[1], direction[0]])
    t = np.linspace(-0.5, 0.5, 9)[:, None]
    bow = rng.uniform(-0.025, 0.025) * length * (1 - 4 * t**2)
    d = _polyline_distance((centre + t * length * direction + bow * normal).astype(np.float32), size)
    width = rng.uniform(0.5, 1.2)
    yy, xx = _grid(size)
    along = ((xx - centre[0]) * direction[0] + (yy - centre[1]) * direction[1]) / length + 0.5
    taper = np.clip(np.minimum(along, 1 - along) * 8, 0.25, 1.0)  # fade in and out, never stop dead
    sign = 1.0 if rng.random() < 0.5 else -1.0
    amp = _contrast(rng)
    out = sign * amp * taper * _line_profile(d, width)
    if rng.random() < 0.3:  # a groove lit from one side: bright edge next to the dark line
        shifted = np.zeros_like(d)
        shifted[1:, 1:] = _line_profile(d, width)[:-1, :-1]  # one pixel down-right, no wrap-around
        out -= 0.5 * sign * amp * taper * shifted
    return out


def _one_spot(rng: np.random.Generator, size: int) -> np.ndarray:
    """One roundish soft-edged blob; small radii are frequent on purpose (small objects matter)."""
    yy, xx = _grid(size)
    radius = _log_uniform(rng, 2.0, 12.0)
    aspect = rng.uniform(0.55, 1.0)
    rot = rng.uniform(0, np.pi)
    cx, cy = _centre(rng, size, 4 + radius)
    u = ((xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)) / radius
    v = (-(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)) / (radius * aspect)
    softness = rng.uniform(0.08, 0.3)
    blob = 1.0 / (1.0 + np.exp(np.clip((np.sqrt(u**2 + v**2) - 1.0) / softness, -30, 30)))
    sign = -1.0 if rng.random() < 0.6 else 1.0
    return (sign * _contrast(rng) * blob).astype(np.float32)


def _one_crack(rng: np.random.Generator, size: int) -> np.ndarray:
    """A jagged dark walk with 0-2 branches, like defects_data._crack but local and sized 12-50 % of the image."""
    length = _log_uniform(rng, 0.12, 0.5) * size
    heading = rng.uniform(0, 2 * np.pi)
    start = _centre(rng, size, 0.1 * size + 0.3 * length) - 0.5 * length * np.array([np.cos(heading), np.sin(heading)])
    main = _walk(rng, start.astype(np.float32), heading, length, jitter=rng.uniform(0.35, 0.6))
    width = rng.uniform(0.5, 1.0)
    amp = _contrast(rng)
    out = amp * _line_profile(_polyline_distance(main, size), width)
    for _ in range(int(rng.choice([0, 1, 2], p=[0.3, 0.5, 0.2]))):
        at = main[int(rng.integers(1, len(main) - 1))]
        branch_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.3)
        branch = _walk(rng, at, branch_heading, rng.uniform(0.2, 0.5) * length, jitter=0.5)
        branch_profile = _line_profile(_polyline_distance(branch, size), 0.8 * width)
        out = np.maximum(out, rng.uniform(0.5, 0.9) * amp * branch_profile)
    return -out  # cracks are always darker than the surface


_DRAW: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "crack": _one_crack,
    "scratch": _one_scratch,
    "spot": _one_spot,
}


def _box(defect: np.ndarray) -> np.ndarray | None:
    """(x1, y1, x2, y2) in pixels around the visible part of one defect map, or None if nothing is visible."""
    mag = np.abs(defect)
    peak = float(mag.max())
    if peak <= 0:
        return None
    ys, xs = np.nonzero(mag >= _VISIBLE * peak)
    size = defect.shape[0]
    # Pixel i covers [i, i+1): the box spans whole pixels.
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    for lo, hi in ((0, 2), (1, 3)):
        grow = max(0.0, _MIN_BOX - (box[hi] - box[lo])) / 2
        box[lo], box[hi] = box[lo] - grow, box[hi] + grow
        shift = max(0.0, -box[lo]) - max(0.0, box[hi] - size)  # keep a widened box inside the image
        box[lo], box[hi] = box[lo] + shift, box[hi] + shift
    return box


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _scene(rng: np.random.Generator, size: int, with_defects: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One image and its boxes [k, 5] (cls, x1, y1, x2, y2 in pixels).

    with_defects=False draws the very same image (same random stream) without adding the defects: the
    tests compare the two to check that every box surrounds changed pixels.
    """
    lum = _texture(rng, size)
    tone = 0.6 + 0.8 * float(lum.mean())  # as defects_data: a defect on a dark plate is not brighter
    total = np.zeros_like(lum)
    boxes: list[list[float]] = []
    for _ in range(int(rng.choice(len(_COUNT_P), p=_COUNT_P))):
        cls = int(rng.integers(len(CLASSES)))
        for _attempt in range(8):
            defect = _DRAW[CLASSES[cls]](rng, size)
            box = _box(defect)
            if box is not None and all(_iou(box, np.asarray(b[1:])) <= _MAX_IOU for b in boxes):
                total += defect
                boxes.append([cls, *box])
                break
    if with_defects:
        lum = lum + total * tone
    tint = 1.0 + rng.normal(0, 0.02, 3).astype(np.float32)
    rgb = lum[..., None] * tint
    rgb += rng.normal(0, rng.uniform(0.004, 0.02), rgb.shape).astype(np.float32)
    image = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, np.asarray(boxes, np.float64).reshape(-1, 5)


def _check_size(size: int) -> None:
    if size < 64 or size % 32:
        raise BadInput(f"--size {size}: give a multiple of 32 of at least 64 (the detector's strides are 8, 16, 32)")


def make_detection_arrays(n: int, seed: int, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """n images (n, size, size, 3) uint8 and per image its boxes [k, 5] float (cls, x1, y1, x2, y2 in pixels).

    Deterministic in (n, seed, size); generate() writes make_detection_arrays(n_train, seed) as its train split.
    """
    _check_size(size)
    images = np.empty((n, size, size, 3), np.uint8)
    boxes: list[np.ndarray] = []
    for i in range(n):
        images[i], b = _scene(_image_rng(seed, i), size)
        boxes.append(b)
    return images, boxes


def yolo_lines(boxes: np.ndarray, size: int) -> str:
    """Ultralytics label text: `cls cx cy w h` normalised to [0, 1], 6 decimals; '' for no boxes."""
    lines = []
    for cls, x1, y1, x2, y2 in boxes:
        cx, cy, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
        lines.append(f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def generate(
    out_dir: str | Path,
    n_train: int = 1500,
    n_calib: int = 200,
    n_val: int = 200,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the Ultralytics layout under out_dir; a no-op if already generated with the same arguments.

    The splits use seeds seed, seed+1, seed+2, so make_detection_arrays(n_val, seed + 2) is the val split.
    """
    _check_size(size)
    for name, n in (("train", n_train), ("calib", n_calib), ("val", n_val)):
        if n < 0:
            raise BadInput(f"--{name} {n}: give a number of images >= 0")
    out = Path(out_dir)
    params = {"version": _FORMAT_VERSION, "n_train": n_train, "n_calib": n_calib, "n_val": n_val,
              "size": size, "seed": seed, "classes": list(CLASSES)}
    stamp = out / _STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == params:
                return out
        except (OSError, ValueError):
            pass  # unreadable stamp: regenerate
        stamp.unlink()
    for offset, (split, n) in enumerate(zip(SPLITS, (n_train, n_calib, n_val), strict=True)):
        images, labels = out / split / "images", out / split / "labels"
        for folder, ext in ((images, "*.png"), (labels, "*.txt")):
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob(ext):  # leftovers of a different configuration
                old.unlink()
        t0 = time.perf_counter()
        for i in range(n):
            img, boxes = _scene(_image_rng(seed + offset, i), size)
            # compress_level=1: the files are scratch data; speed matters more than a few KB.
            Image.fromarray(img).save(images / f"{i:05d}.png", compress_level=1)
            (labels / f"{i:05d}.txt").write_text(yolo_lines(boxes, size))
            if progress and (i + 1) % 250 == 0 and i + 1 < n:
                print(f"  {split}: {i + 1}/{n} ({time.perf_counter() - t0:.0f}s)", flush=True)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    names = "".join(f"  {k}: {c}\n" for k, c in enumerate(CLASSES))
    (out / "data.yaml").write_text(
        f"# generated by python -m edgekit.zoo.defect_boxes\npath: {out.resolve()}\n"
        f"train: train/images\nval: val/images\n# calib/images: calibration images for INT8 (not used by training)\n"
        f"nc: {len(CLASSES)}\nnames:\n{names}"
    )
    stamp.write_text(json.dumps(params, indent=2) + "\n")
    return out


def _count(out: Path) -> dict[str, tuple[int, int, list[int]]]:
    """Per split: images, images without defects, boxes per class."""
    counts = {}
    for split in SPLITS:
        per_class = [0] * len(CLASSES)
        empty = 0
        files = sorted((out / split / "labels").glob("*.txt"))
        for f in files:
            rows = f.read_text().split("\n")
            rows = [r for r in rows if r.strip()]
            empty += not rows
            for r in rows:
                per_class[int(r.split()[0])] += 1
        counts[split] = (len(files), empty, per_class)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgekit.zoo.defect_boxes",
        description="Generate the synthetic defect-detection data set (Ultralytics layout).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = generate(args.out_dir, args.train, args.calib, args.val, args.size, args.seed, progress=True)
    except BadInput as e:
        print(f"edgekit: error: {e}", file=sys.stderr)
        return e.exit_code
    for split, (n, empty, per_class) in _count(out).items():
        detail = ", ".join(f"{name}={k}" for name, k in zip(CLASSES, per_class))
        print(f"{split:<6} {n:>6} images, {empty} without defects, {sum(per_class)} boxes ({detail})")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
