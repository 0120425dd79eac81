"""Synthetic surface-defect images: the data set behind the bundled DefectNet example.

Metal-like textures (brushed streaks, low-frequency grain, a lighting gradient, sensor noise) with
one of four labels: crack, ok, scratch, spot. Each image has its own numpy generator seeded by
(seed, index), so generation order never matters and any image can be redrawn from (seed, index, label).

Only numpy and Pillow are used: the data can be produced where torch is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES: tuple[str, ...] = ("crack", "ok", "scratch", "spot")
SPLITS: tuple[str, ...] = ("train", "calib", "val")
_STAMP = ".complete"
_FORMAT_VERSION = 1  # bump when the drawing code changes, so old folders get regenerated

# Defect contrast, as a fraction of full scale, drawn log-uniformly: the low end is barely above the
# texture's own streaks, which is what keeps the task from being trivially separable.
_CONTRAST = (0.08, 0.35)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _resize(a: np.ndarray, w: int, h: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), resample), dtype=np.float32)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _standardize(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Defect-free luminance map in [0, 1]-ish: tone + brushing + grain + lighting."""
    yy, xx = _grid(size)
    tone = rng.uniform(0.30, 0.72)
    # Brushing: noise stretched along one axis, then rotated. A larger canvas keeps the rotated
    # corners filled, and two streak lengths look more like real machining marks than one.
    canvas = int(size * 1.5)
    brushed = np.zeros((canvas, canvas), np.float32)
    for streak, weight in ((rng.uniform(20, 60), 1.0), (rng.uniform(3, 10), 0.6)):
        cols = max(2, int(canvas / streak))
        layer = _resize(rng.standard_normal((canvas, cols)), canvas, canvas, Image.Resampling.BILINEAR)
        brushed += weight * layer
    angle = rng.uniform(0, 180) if rng.random() < 0.6 else rng.choice([0.0, 90.0]) + rng.normal(0, 3)
    brushed = np.asarray(Image.fromarray(brushed).rotate(angle, Image.Resampling.BILINEAR), np.float32)
    off = (canvas - size) // 2
    brushed = _standardize(brushed[off : off + size, off : off + size])
    lum = tone + rng.uniform(0.006, 0.025) * brushed
    # Grain: smooth blotches, the "harmless low-contrast variation" every class carries.
    cells = int(rng.integers(3, 9))
    grain = _standardize(_resize(rng.standard_normal((cells, cells)), size, size, Image.Resampling.BICUBIC))
    lum += rng.uniform(0.005, 0.035) * grain
    # Lighting: a linear ramp plus, sometimes, a broad highlight.
    theta = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(theta) * xx + np.sin(theta) * yy) / size) - 0.5
    lum += rng.uniform(0.0, 0.35) * tone * ramp
    if rng.random() < 0.5:
        cy, cx = rng.uniform(-0.2, 1.2, 2) * size
        sigma = rng.uniform(0.3, 0.8) * size
        lum += rng.uniform(0.03, 0.15) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return lum


def _polyline_distance(points: np.ndarray, size: int, reach: float = 8.0) -> np.ndarray:
    """Distance from each pixel centre to a polyline (points: (k, 2) as x, y).

    Only the polyline's bounding box grown by `reach` is computed (the rest is set to `reach`):
    line profiles are ~0 that far out, and this is the generator's hot spot.
    """
    d = np.full((size, size), reach, np.float32)
    x0, y0 = np.floor(points.min(axis=0) - reach).astype(int).clip(0, size)
    x1, y1 = np.ceil(points.max(axis=0) + reach + 1).astype(int).clip(0, size)
    if x1 <= x0 or y1 <= y0:
        return d
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    px, py = xx.ravel()[:, None], yy.ravel()[:, None]  # (m, 1)
    ax, ay = points[None, :-1, 0], points[None, :-1, 1]  # (1, k-1)
    bx, by = points[None, 1:, 0] - ax, points[None, 1:, 1] - ay
    t = np.clip(((px - ax) * bx + (py - ay) * by) / np.maximum(bx * bx + by * by, 1e-6), 0.0, 1.0)
    dist2 = ((px - ax - t * bx) ** 2 + (py - ay - t * by) ** 2).min(axis=1)
    d[y0:y1, x0:x1] = np.minimum(np.sqrt(dist2).reshape(y1 - y0, x1 - x0), reach)
    return d


def _line_profile(d: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-0.5 * (d / width) ** 2)


def _contrast(rng: np.random.Generator) -> float:
    return _log_uniform(rng, *_CONTRAST)


def _scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
        length = rng.uniform(0.45, 1.1) * size
        heading = rng.uniform(0, np.pi)
        centre = rng.uniform(0.2, 0.8, 2) * size
        direction = np.array([np.cos(heading), np.sin(heading)])
        normal = np.array([-direction[1], direction[0]])
        # A gentle bow (up to 2.5% of the length): tool marks are straight-ish, but not ruler-straight.
        t = np.linspace(-0.5, 0.5, 9)[:, None]
        bow = rng.uniform(-0.025, 0.025) * length * (1 - 4 * t**2)
        pts = centre + t * length * direction + bow * normal
        d = _polyline_distance(pts.astype(np.float32), size)
        width = rng.uniform(0.45, 1.2)
        # Taper the ends so the line fades in and out instead of stopping dead.
        yy, xx = _grid(size)
        along = ((xx - centre[0]) * direction[0] + (yy - centre[1]) * direction[1]) / length + 0.5
        taper = np.clip(np.minimum(along, 1 - along) * 8, 0.25, 1.0)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        amp = _contrast(rng)
        out += sign * amp * taper * _line_profile(d, width)
        if rng.random() < 0.3:  # a groove lit from one side: bright edge next to the dark line
            shifted = np.roll(_line_profile(d, width), shift=(1, 1), axis=(0, 1))
            out -= 0.5 * sign * amp * taper * shifted
    return out


def _spot(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    out = np.zeros((size, size), np.float32)
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
        radius = _log_uniform(rng, 2.5, 11.0)
        aspect = rng.uniform(0.55, 1.0)
        rot = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0.12, 0.88, 2) * size
        u = ((xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)) / radius
        v = (-(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)) / (radius * aspect)
        r = np.sqrt(u**2 + v**2)
        softness = rng.uniform(0.08, 0.35)
        blob = 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / softness, -30, 30)))
        sign = -1.0 if rng.random() < 0.6 else 1.0
        out += sign * _contrast(rng) * blob
    return out


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, jitter: float) -> np.ndarray:
    """Jagged walk: short steps zig-zagging around a slowly drifting course, with occasional kinks.

    The deviation is mean-reverting so a crack keeps its general direction instead of curling up.
    """
    steps = max(3, int(length / 2.5))
    pts = [start]
    deviation = 0.0
    for _ in range(steps):
        heading += rng.normal(0, 0.08)
        deviation = 0.5 * deviation + rng.normal(0, jitter)
        if rng.random() < 0.12:
            deviation += rng.normal(0, 0.9)
        step = rng.uniform(1.5, 3.5)
        angle = heading + deviation
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.asarray(pts, np.float32)


def _crack(rng: np.random.Generator, size: int) -> np.ndarray:
    length = rng.uniform(0.3, 0.8) * size
    heading = rng.uniform(0, 2 * np.pi)
    # Start so that the bulk of the walk lands inside the image.
    start = rng.uniform(0.25, 0.75, 2) * size - 0.4 * length * np.array([np.cos(heading), np.sin(heading)])
    main = _walk(rng, start.astype(np.float32), heading, length, jitter=rng.uniform(0.35, 0.6))
    width = rng.uniform(0.45, 1.0)
    amp = _contrast(rng)
    out = amp * _line_profile(_polyline_distance(main, size), width)
    for _ in range(int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))):
        at = main[int(rng.integers(1, len(main) - 1))]
        branch_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.3)
        branch = _walk(rng, at, branch_heading, rng.uniform(0.2, 0.5) * length, jitter=0.5)
        d = _polyline_distance(branch, size)
        out = np.maximum(out, rng.uniform(0.5, 0.9) * amp * _line_profile(d, 0.8 * width))
    return -out  # cracks are always darker than the surface


_DEFECTS: dict[str, Callable[[np.random.Generator, int], np.ndarray] | None] = {
    "crack": _crack,
    "ok": None,
    "scratch": _scratch,
    "spot": _spot,
}


def make_image(label: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One (size, size, 3) uint8 image of class CLASSES[label]."""
    lum = _texture(rng, size)
    draw = _DEFECTS[CLASSES[label]]
    if draw is not None:
        # Scale with the local tone so a defect on a dark plate is not brighter than on a light one.
        lum += draw(rng, size) * (0.6 + 0.8 * float(lum.mean()))
    # Slight metal tint (cool steel to warm brass), then per-channel sensor noise.
    tint = 1.0 + rng.normal(0, 0.02, 3).astype(np.float32)
    rgb = lum[..., None] * tint
    rgb += rng.normal(0, rng.uniform(0.004, 0.022), rgb.shape).astype(np.float32)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _labels(n: int, seed: int) -> np.ndarray:
    """Balanced labels (counts differ by at most one), shuffled by the split's seed."""
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _image_rng(seed: int, index: int) -> np.random.Generator:
    # (seed, index) as SeedSequence entropy: independent streams, no dependence on generation order.
    return np.random.default_rng([seed, index])


def make_arrays(n: int, seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, size, size, 3) uint8 and their int64 labels; deterministic in (n, seed, size)."""
    labels = _labels(n, seed)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        images[i] = make_image(int(label), _image_rng(seed, i), size)
    return images, labels


def generate(
    out_dir: str | Path,
    n_train: int = 2000,
    n_calib: int = 200,
    n_val: int = 400,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """Write out_dir/{train,calib,val}/{class}/{index:05d}.png; a no-op if already generated alike.

    The splits use seeds seed, seed+1, seed+2, so make_arrays(n_train, seed) reproduces the train
    split exactly (PNG is lossless).
    """
    out = Path(out_dir)
    params = {
        "version": _FORMAT_VERSION,
        "n_train": n_train,
        "n_calib": n_calib,
        "n_val": n_val,
        "size": size,
        "seed": seed,
        "classes": list(CLASSES),
    }
    stamp = out / _STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == params:
                return out
        except (OSError, ValueError):
            pass  # unreadable stamp: regenerate
        stamp.unlink()
    for offset, (split, n) in enumerate(zip(SPLITS, (n_train, n_calib, n_val), strict=True)):
        split_dir = out / split
        for name in CLASSES:
            class_dir = split_dir / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for old in class_dir.glob("*.png"):  # leftovers of a different configuration
                old.unlink()
        split_seed = seed + offset
        for i, label in enumerate(_labels(n, split_seed)):
            img = make_image(int(label), _image_rng(split_seed, i), size)
            # compress_level=1: the files are scratch data; speed matters more than a few KB.
            Image.fromarray(img).save(split_dir / CLASSES[label] / f"{i:05d}.png", compress_level=1)
    stamp.write_text(json.dumps(params, indent=2) + "\n")
    return out


def _count(out: Path) -> dict[str, dict[str, int]]:
    return {split: {name: len(list((out / split / name).glob("*.png"))) for name in CLASSES} for split in SPLITS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgekit.zoo.defects_data", description="Generate the synthetic defects data set."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = generate(args.out_dir, args.train, args.calib, args.val, args.size, args.seed)
    counts = _count(out)
    for split, per_class in counts.items():
        detail = ", ".join(f"{name}={k}" for name, k in per_class.items())
        print(f"{split:<6} {sum(per_class.values()):>6}  ({detail})")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
