"""Ground truth in ORIGINAL image pixels: YOLO txt labels (Ultralytics' layout), COCO JSON, class names.

Image sizes come from the file header as PIL reports them, without EXIF rotation: edgekit's preprocessing
(data.Preprocess.apply) feeds the model the stored orientation, so predictions live in that frame too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BadInput
from edgekit.tasks.types import Boxes

NORM_TOLERANCE = 1e-3  # Ultralytics-written labels round to 6 digits; a value past this is another frame
CLASS_FILES = ("classes.txt", "data.yaml", "dataset.yaml")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header; PIL opens lazily, so no pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"cannot read image {path}: {e}") from None


def swap_folder(image: Path, old: str, new: str, suffix: str) -> Path:
    """Ultralytics' img2label_paths: the LAST folder named `old` becomes `new`, the suffix becomes `suffix`.
    With no such folder the file sits next to the image."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):  # folders only, never the file name itself
        if parts[i] == old:
            parts[i] = new
            break
    return Path(*parts).with_suffix(suffix)


def yolo_label_file(image: Path) -> Path:
    """dataset/images/val/a.jpg -> dataset/labels/val/a.txt (Ultralytics' rule)."""
    return swap_folder(Path(image), "images", "labels", ".txt")


def _bad(file: Path, line: int, what: str) -> BadInput:
    return BadInput(f"label file {file} line {line}: {what}")


def _parse_line(text: str, file: Path, line: int, num_classes: int | None) -> tuple[int, list[float]]:
    """One label line -> (class, [cx, cy, w, h] normalised)."""
    fields = text.split()
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise _bad(file, line, f"not numbers: {text.strip()[:80]!r}; expected 'class cx cy w h'") from None
    if not all(math.isfinite(v) for v in values):
        raise _bad(file, line, "a value is not finite (nan/inf)")
    coords = values[1:]
    is_polygon = len(fields) >= 7 and len(coords) % 2 == 0  # 'cls x1 y1 x2 y2 x3 y3 ...': 3 points or more
    if len(fields) != 5 and not is_polygon:
        raise _bad(file, line, f"{len(fields)} columns; expected 5 ('class cx cy w h', normalised) or a polygon "
                               "'class x1 y1 x2 y2 x3 y3 ...'")
    cls = values[0]
    if cls != int(cls) or cls < 0:
        raise _bad(file, line, f"class {fields[0]} is not a non-negative integer")
    if num_classes is not None and cls >= num_classes:
        raise _bad(file, line, f"class {int(cls)} out of range: the model has {num_classes} classes (0..."
                               f"{num_classes - 1})")
    lo, hi = min(coords), max(coords)
    if lo < -NORM_TOLERANCE or hi > 1 + NORM_TOLERANCE:
        raise _bad(file, line, f"coordinates must be normalised to [0, 1] (found {lo:g}..{hi:g}); divide pixel "
                               "values by the image width/height")
    if is_polygon:
        xs, ys = np.asarray(coords[0::2]), np.asarray(coords[1::2])
        x1, x2, y1, y2 = xs.min(), xs.max(), ys.min(), ys.max()
        return int(cls), [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    return int(cls), coords


def read_yolo_labels(images: list[Path], num_classes: int | None = None) -> list[Boxes]:
    """Ground truth per image from Ultralytics-style label files, in original image pixels.

    A missing label file is an image with no objects (Ultralytics' rule), but when no image has one the
    labels are elsewhere: BadInput naming the folder looked in. Duplicate lines count once (Ultralytics
    removes them too)."""
    if not images:
        return []
    out: list[Boxes] = []
    found = 0
    for image in images:
        file = yolo_label_file(image)
        if not file.is_file():
            out.append(Boxes.empty(with_scores=False))
            continue
        found += 1
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read label file {file}: {e}") from None
        rows: list[tuple[int, float, float, float, float]] = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                cls, (cx, cy, w, h) = _parse_line(line, file, n, num_classes)
                rows.append((cls, cx, cy, w, h))
        rows = list(dict.fromkeys(rows))  # drop duplicate lines, keep order
        if not rows:
            out.append(Boxes.empty(with_scores=False))
            continue
        width, height = image_size(image)
        lab = np.asarray(rows, dtype=np.float64)
        cx, cy, w, h = lab[:, 1] * width, lab[:, 2] * height, lab[:, 3] * width, lab[:, 4] * height
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        # Rounding in the label file can put an edge a hair outside the picture.
        xyxy = np.clip(xyxy, 0, [width, height, width, height])
        out.append(Boxes(xyxy, lab[:, 0].astype(np.int64)))
    if not found:
        where = yolo_label_file(images[0]).parent
        raise BadInput(f"no label file for any of the {len(images)} images: looked in {where} (Ultralytics layout "
                       "dataset/images/val/a.jpg -> dataset/labels/val/a.txt); give the labels or a COCO JSON")
    return out


def _names_from_yaml(file: Path) -> list[str] | None:
    from edgekit.untrusted import load_yaml

    data = load_yaml(file, "dataset YAML")
    if not isinstance(data, dict) or "names" not in data:
        return None  # some other YAML that happens to be called data.yaml: keep looking
    names = data["names"]
    if isinstance(names, list) and all(isinstance(n, (str, int, float)) for n in names):
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        if not all(isinstance(k, int) for k in names) or sorted(names) != list(range(len(names))):
            raise BadInput(f"{file}: 'names' keys must be the class indices 0..{len(names) - 1}, got "
                           f"{sorted(names, key=str)[:10]}")
        return [str(names[i]) for i in range(len(names))]
    raise BadInput(f"{file}: 'names' must be a list of class names or a mapping {{index: name}}")


def _names_from_txt(file: Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {file}: {e}") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines or "" in lines:
        raise BadInput(f"{file}: one class name per line, no blank lines between them (line "
                       f"{lines.index('') + 1 if '' in lines else 1} is empty)")
    return lines


def class_names_near(root: Path) -> list[str] | None:
    """Class names from classes.txt, data.yaml or dataset.yaml in `root`, its parent or its grandparent
    (dataset/images/val -> dataset/data.yaml), the nearest folder first; None when there is none."""
    root = Path(root)
    for folder in (root, root.parent, root.parent.parent):
        for name in CLASS_FILES:
            file = folder / name
            if not file.is_file():
                continue
            names = _names_from_txt(file) if name.endswith(".txt") else _names_from_yaml(file)
            if names is not None:
                return names
    return None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def read_coco_annotations(path: Path, images: list[Path]) -> tuple[list[Boxes | None], list[str], list[int]]:
    """Ground truth per image from a COCO instances JSON, in original image pixels.

    Returns (truth, class names, category ids): model class i is the i-th category id in ascending order
    (the usual 80-class reading of COCO's 91 ids), names and ids in that order. Images are matched by the
    basename of file_name; an image the JSON does not list gets None in `truth` (the caller skips it: it has
    no ground truth, which is not the same as no objects). iscrowd=1 boxes and boxes without area are left
    out of the ground truth (Ultralytics' COCO converter does the same)."""
    from edgekit.untrusted import load_json

    path = Path(path)
    data = load_json(path, "COCO annotations")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise BadInput(f"{path}: not a COCO annotations file (needs 'images', 'annotations', 'categories' lists)")
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise BadInput(f"{path}: each category needs an integer 'id', got {str(c)[:80]}")
        cats[c["id"]] = str(c.get("name", c["id"]))
    if not cats:
        raise BadInput(f"{path}: no categories")
    cat_ids = sorted(cats)
    class_of = {cid: i for i, cid in enumerate(cat_ids)}

    by_name: dict[str, list[int]] = {}
    for im in data["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or "id" not in im:
            raise BadInput(f"{path}: each image needs 'id' and 'file_name', got {str(im)[:80]}")
        by_name.setdefault(Path(im["file_name"].replace("\\", "/")).name, []).append(im["id"])
    image_ids: list[Any] = []
    for image in images:
        ids = by_name.get(Path(image).name, [])
        if len(ids) > 1:
            raise BadInput(f"{path}: {len(ids)} images are called {Path(image).name}; file names must be unique "
                           "to match images to annotations")
        image_ids.append(ids[0] if ids else None)
    if images and all(i is None for i in image_ids):
        raise BadInput(f"{path}: none of the {len(images)} images is listed in it (compared file names such as "
                       f"{Path(images[0]).name} with {len(by_name)} file_name entries)")

    rows: dict[Any, list[tuple[list[float], int]]] = {i: [] for i in image_ids if i is not None}
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise BadInput(f"{path}: 'annotations' must be a list")
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or a.get("image_id") not in rows:
            continue
        where = f"{path}: annotation {a.get('id', k)}"
        if a.get("iscrowd", 0):
            continue  # crowd regions are no objects to find
        if a.get("category_id") not in class_of:
            raise BadInput(f"{where}: category_id {a.get('category_id')!r} is not among the categories {cat_ids[:20]}")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise BadInput(f"{where}: 'bbox' must be [x, y, width, height], got {str(bbox)[:80]}")
        x, y, w, h = (_number(v, where) for v in bbox)
        if w <= 0 or h <= 0:
            continue
        rows[a["image_id"]].append(([x, y, x + w, y + h], class_of[a["category_id"]]))
    truth: list[Boxes | None] = []
    for i in image_ids:
        if i is None:
            truth.append(None)
        elif rows[i]:
            truth.append(Boxes(np.array([r[0] for r in rows[i]]), np.array([r[1] for r in rows[i]])))
        else:
            truth.append(Boxes.empty(with_scores=False))
    return truth, [cats[c] for c in cat_ids], cat_ids
