"""Calibration and validation data: image folders with a preprocessing spec, or .npz arrays.

Everything is checked against the model's inputs before any expensive work, and the samples used
for validation are never the ones used for calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BadInput
from edgekit.ingest import ModelSpec, TensorSpec, available_memory, human_bytes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
RESIZE_MODES = ("stretch", "letterbox", "center-crop")
COLORS = ("rgb", "bgr", "gray")
LAYOUTS = ("nchw", "nhwc")


@dataclass
class Preprocess:
    """How an image file becomes a model input: ((pixel * scale) - mean) / std, in `layout`."""

    size: list[int]  # [H, W]
    resize: str = "stretch"
    color: str = "rgb"
    scale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    layout: str = "nchw"
    pad_value: int = 114  # letterbox border, the YOLO convention

    @classmethod
    def from_file(cls, path: str | Path) -> Preprocess:
        from edgekit.untrusted import load_yaml

        p = Path(path)
        if not p.is_file():
            raise BadInput(f"preprocess file not found: {p}")
        raw = load_yaml(p, "preprocess file")
        if not isinstance(raw, dict):
            raise BadInput(f"{p}: expected a mapping with keys size, resize, color, scale, mean, std, layout")
        return cls.from_dict(raw, str(p))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "preprocess") -> Preprocess:
        from edgekit.untrusted import typed_fields

        if "size" not in raw:
            raise BadInput(f"{where}: missing key 'size' ([H, W] of the model input)")
        # One number for mean or std means the same for every channel.
        raw = {k: [v] if k in ("mean", "std") and isinstance(v, (int, float)) and not isinstance(v, bool) else v
               for k, v in raw.items()}
        pre = cls(**typed_fields(cls, raw, where))
        pre._check(where)
        return pre

    def _check(self, where: str) -> None:
        if not (isinstance(self.size, list) and len(self.size) == 2 and all(isinstance(v, int) and v > 0
                                                                          for v in self.size)):
            raise BadInput(f"{where}: key 'size' must be [H, W] in pixels, got {self.size!r}")
        for key, allowed in (("resize", RESIZE_MODES), ("color", COLORS), ("layout", LAYOUTS)):
            if getattr(self, key) not in allowed:
                raise BadInput(f"{where}: key '{key}' is {getattr(self, key)!r}; use one of {', '.join(allowed)}")
        channels = 1 if self.color == "gray" else 3
        for key in ("mean", "std"):
            v = getattr(self, key)
            if len(v) == 1:
                setattr(self, key, [float(v[0])] * channels)
            elif len(v) != channels:
                raise BadInput(f"{where}: key '{key}' needs {channels} values, got {len(v)}")
            if not all(np.isfinite(getattr(self, key))):
                raise BadInput(f"{where}: key '{key}' has a value that is not a finite number")
        if any(s == 0 for s in self.std):
            raise BadInput(f"{where}: key 'std' has a zero")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise BadInput(f"{where}: key 'scale' must be a finite, non-zero number, got {self.scale}")
        if not 0 <= self.pad_value <= 255:
            raise BadInput(f"{where}: key 'pad_value' must be a pixel value 0-255, got {self.pad_value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def input_frame(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Where an image of this size lands in the model input: (sx, sy, ox, oy) with x_in = x * sx + ox and
        y_in = y * sy + oy, exactly as `_resize` places it (so boxes and masks can be mapped both ways)."""
        h, w = self.size
        if self.resize == "stretch":
            return w / width, h / height, 0.0, 0.0
        if self.resize == "letterbox":
            r = min(h / height, w / width)
            nw, nh = max(1, round(width * r)), max(1, round(height * r))
            return nw / width, nh / height, float((w - nw) // 2), float((h - nh) // 2)
        r = max(h / height, w / width)
        nw, nh = max(w, round(width * r)), max(h, round(height * r))
        return nw / width, nh / height, -float((nw - w) // 2), -float((nh - h) // 2)

    @classmethod
    def default_for(cls, spec: TensorSpec) -> Preprocess:
        """What a plain image model expects when the user gives no spec: RGB in [0, 1]."""
        layout, (h, w), c = _image_geometry(spec)
        return cls(size=[h, w], layout=layout, color="gray" if c == 1 else "rgb",
                   mean=[0.0] * c, std=[1.0] * c)

    def apply(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.color == "gray" else "RGB")
                im = self._resize(im)
                x = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise BadInput(f"cannot read image {path}: {e}") from None
        if x.ndim == 2:
            x = x[:, :, None]
        if self.color == "bgr":
            x = x[:, :, ::-1]
        x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.layout == "nchw" else x, dtype=np.float32)

    def _resize(self, im: Any) -> Any:
        from PIL import Image

        h, w = self.size
        if self.resize == "stretch":
            return im.resize((w, h), Image.BILINEAR)
        if self.resize == "letterbox":
            r = min(h / im.height, w / im.width)
            nw, nh = max(1, round(im.width * r)), max(1, round(im.height * r))
            canvas = Image.new(im.mode, (w, h), (self.pad_value,) * len(im.getbands()))
            canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
            return canvas
        r = max(h / im.height, w / im.width)  # center-crop: cover, then cut the middle
        nw, nh = max(w, round(im.width * r)), max(h, round(im.height * r))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        return im.crop((left, top, left + w, top + h))


def _image_geometry(spec: TensorSpec) -> tuple[str, tuple[int, int], int]:
    s = spec.shape
    if len(s) != 4:
        raise BadInput(f"input '{spec.name}' has shape {s}; image folders need a 4-D image input (use .npz)")
    if s[1] in (1, 3):
        return "nchw", (s[2], s[3]), s[1]
    if s[3] in (1, 3):
        return "nhwc", (s[1], s[2]), s[3]
    raise BadInput(f"input '{spec.name}' {s} has neither 1 nor 3 channels; give the data as .npz instead")


@dataclass
class Dataset:
    """Samples per model input (first axis = samples), with labels when the data has them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    source: str = ""
    # The image file of each sample and how it was preprocessed (image folders only): a task metric reads the
    # sample's boxes or mask beside it and maps them into the model input's frame.
    files: list[Path] | None = None
    preprocess: Preprocess | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, spec: ModelSpec) -> list[dict[str, np.ndarray]]:
        """Feeds shaped as the model's inputs (its fixed batch size; a partial last batch is dropped)."""
        b = max(1, spec.inputs[0].shape[0])
        n = len(self) // b
        return [{k: v[i * b:(i + 1) * b] for k, v in self.inputs.items()} for i in range(n)]

    def batch_labels(self, spec: ModelSpec) -> np.ndarray | None:
        if self.labels is None:
            return None
        b = max(1, spec.inputs[0].shape[0])
        return self.labels[: (len(self) // b) * b]


# ---------------------------------------------------------------- sources


@dataclass
class _Source:
    """Samples not yet loaded: a list of image files, or arrays from an .npz."""

    where: str
    count: int
    labels: np.ndarray | None
    class_names: list[str] | None
    files: list[Path] | None = None
    arrays: dict[str, np.ndarray] | None = None
    preprocess: Preprocess | None = None

    def load(self, idx: np.ndarray, spec: ModelSpec, what: str) -> Dataset:
        labels = self.labels[idx] if self.labels is not None else None
        if self.arrays is not None:
            inputs = {k: v[idx] for k, v in self.arrays.items()}
        else:
            assert self.files is not None and self.preprocess is not None
            from edgekit.console import progress

            name = spec.inputs[0].name
            out = np.empty((len(idx), *spec.inputs[0].shape[1:]), np.float32)
            with progress() as bar:
                task = bar.add_task(f"loading {what} images", total=len(idx))
                for j, i in enumerate(idx):
                    out[j] = self.preprocess.apply(self.files[i])
                    bar.advance(task)
            bad = nonfinite_samples(out)
            if len(bad):  # an image is finite: the preprocessing made it so (a tiny std, a huge scale)
                raise BadInput(f"{what} image {self.files[idx[bad[0]]]} has NaN/inf after preprocessing (scale "
                               f"{self.preprocess.scale:g}, mean {self.preprocess.mean}, std {self.preprocess.std}): "
                               "check scale, mean and std in the preprocess file")
            inputs = {name: out}
        files = [self.files[i] for i in idx] if self.files is not None else None
        return Dataset(inputs, labels, self.class_names, self.where, files, self.preprocess)

    def sample_bytes(self, spec: ModelSpec) -> int:
        """Memory one loaded sample takes (all inputs)."""
        if self.arrays is not None:
            return sum(a[0].nbytes for a in self.arrays.values())
        return int(np.prod(spec.inputs[0].shape[1:], dtype=np.float64)) * 4


def nonfinite_samples(a: np.ndarray) -> np.ndarray:
    """Indices along the first axis of the samples holding a NaN or an infinity."""
    if a.dtype.kind not in "fc" or not len(a):
        return np.zeros(0, np.int64)
    step = 256  # in chunks: never a boolean copy of a large array at once
    found = [start + np.flatnonzero(~np.isfinite(a[start:start + step].reshape(len(a[start:start + step]), -1))
                                    .all(axis=1)) for start in range(0, len(a), step)]
    return np.concatenate(found)


def classifier_classes(spec: ModelSpec) -> tuple[str, int] | None:
    """The model's classifier output (as verification picks it: the first [N, C] one) and its C."""
    from edgekit.verify.metrics import is_classifier_output

    for o in spec.outputs:
        if is_classifier_output(tuple(o.shape)):
            return o.name, int(o.shape[1])
    return None


def open_source(path: str | Path, spec: ModelSpec, preprocess: Preprocess | None, what: str,
                task: str = "auto") -> _Source:
    """Find the samples at `path` and check they fit the model; loads nothing heavy yet."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{what} data not found: {p}")
    if p.is_dir():
        return _image_folder(p, spec, preprocess, what, task)
    if p.suffix == ".npz":
        return _npz(p, spec, what)
    raise BadInput(f"{what} data {p} is neither a folder of images nor an .npz file")


def dense_layout(root: Path) -> bool:
    """A folder of images with their boxes or masks beside them: root/images + root/labels or root/masks."""
    return (root / "images").is_dir() and ((root / "labels").is_dir() or (root / "masks").is_dir())


def _image_folder(root: Path, spec: ModelSpec, pre: Preprocess | None, what: str, task: str = "auto") -> _Source:
    if len(spec.inputs) != 1:
        names = ", ".join(i.name for i in spec.inputs)
        raise BadInput(f"the model has {len(spec.inputs)} inputs ({names}); give {what} data as .npz")
    inp = spec.inputs[0]
    layout, (h, w), c = _image_geometry(inp)
    pre = pre or Preprocess.default_for(inp)
    if pre.size != [h, w] or pre.layout != layout or (c == 1) != (pre.color == "gray"):
        raise BadInput(
            f"preprocess gives {pre.layout} {pre.size} {pre.color} but model input '{inp.name}' is {inp.shape}; "
            f"set size: [{h}, {w}] and layout: {layout} in the preprocess file"
        )
    if inp.dtype != "float32":
        raise BadInput(f"model input '{inp.name}' is {inp.dtype}; image folders give float32, use .npz")
    if dense_layout(root):  # Ultralytics' detection layout (images/ + labels/) or images/ + masks/: no classes
        root = root / "images"
    top = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if root.name == "images" or task in ("detect", "segment"):  # sub-folders of a detection set are not classes
        classes = []
    files: list[Path] = []
    labels: list[int] = []
    if not top and classes:  # one sub-folder per class gives labels, in sorted order (as ImageFolder)
        for k, name in enumerate(classes):
            found = sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [k] * len(found)
    else:
        files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        classes = []
    if not files:
        raise BadInput(f"{what} folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    found = classifier_classes(spec)
    if classes and found and len(classes) > found[1]:  # sorted folder names are the labels: some would not exist
        raise BadInput(f"{what} folder {root} has {len(classes)} class folders ({', '.join(classes[:6])}"
                       f"{', …' if len(classes) > 6 else ''}) but the model's output '{found[0]}' has {found[1]} "
                       "classes: give one folder per class the model outputs, in its order")
    return _Source(str(root), len(files), np.asarray(labels) if classes else None, classes or None,
                   files=files, preprocess=pre)


def _npz(path: Path, spec: ModelSpec, what: str) -> _Source:
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle a user's file
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise BadInput(f"{what} file {path} is not a readable .npz ({type(e).__name__})") from None
    labels = arrays.pop("labels", None)
    missing = [i.name for i in spec.inputs if i.name not in arrays]
    if missing:
        raise BadInput(
            f"{path} has no array named {', '.join(repr(m) for m in missing)} (arrays: "
            f"{', '.join(arrays) or 'none'}); name the arrays after the model inputs"
        )
    counts = set()
    out = {}
    for inp in spec.inputs:
        a = arrays[inp.name]
        want = tuple(inp.shape[1:])
        if a.shape[1:] != want:
            raise BadInput(
                f"{what} array '{inp.name}' has samples of shape {list(a.shape[1:])} but the model input is "
                f"{inp.shape} (first axis = samples, then {list(want)})"
            )
        target = np.dtype(inp.dtype)
        if a.dtype != target:
            if a.dtype.kind != target.kind:
                raise BadInput(f"{what} array '{inp.name}' is {a.dtype} but the model input is {inp.dtype}")
            a = a.astype(target)
        bad = nonfinite_samples(a)
        if len(bad):
            more = f" (and {len(bad) - 1} more sample{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
            raise BadInput(f"{what} array '{inp.name}' in {path} has NaN/inf at sample {bad[0]}{more}: "
                           "fix or drop those samples")
        counts.add(len(a))
        out[inp.name] = a
    if len(counts) != 1 or 0 in counts:
        raise BadInput(f"{path}: arrays have different or zero sample counts {sorted(counts)}")
    n = counts.pop()
    if labels is not None:
        if labels.ndim != 1 or len(labels) != n:
            raise BadInput(f"{path}: 'labels' must be one integer per sample ({n}), got shape {list(labels.shape)}")
        labels = _checked_labels(labels, spec, path, what)
    return _Source(str(path), n, labels, None, arrays=out)


def _checked_labels(labels: np.ndarray, spec: ModelSpec, path: Path, what: str) -> np.ndarray:
    """Class indices: integers, >= 0, and below the number of classes of the model's classifier output."""
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            i = int(np.argmin(whole))
            raise BadInput(f"{what} array 'labels' in {path} has {labels[i].item()} at sample {i}: labels must be "
                           "integer class indices")
    elif labels.dtype.kind not in "biu":
        raise BadInput(f"{what} array 'labels' in {path} is {labels.dtype}: labels must be integer class indices")
    labels = labels.astype(np.int64)
    classes = classifier_classes(spec)
    top = classes[1] if classes else None
    bad = (labels < 0) | (labels >= top) if top is not None else labels < 0
    if bad.any():
        i = int(np.argmax(bad))
        more = f" (and {int(bad.sum()) - 1} more)" if bad.sum() > 1 else ""
        allowed = (f"the model's output '{classes[0]}' has {top} classes, so labels must be 0..{top - 1}"
                   if classes else "labels must be class indices >= 0")
        raise BadInput(f"{what} array 'labels' in {path} has {labels[i]} at sample {i}{more}: {allowed}")
    return labels


@dataclass
class DataSplit:
    calibration: Dataset | None
    validation: Dataset
    note: str


def prepare_data(
    spec: ModelSpec,
    calib: str | None,
    val: str | None,
    preprocess: Preprocess | None,
    calib_samples: int = 300,
    val_samples: int = 500,
    holdout: float = 0.2,
    seed: int = 0,
    task: str = "auto",
) -> DataSplit:
    """Open, check and load calibration and validation data; without --val, hold out part of --calib.
    `task` detect/segment: an image folder's sub-folders are never class labels."""
    rng = np.random.default_rng(seed)
    csrc = open_source(calib, spec, preprocess, "calibration", task) if calib else None
    vsrc = open_source(val, spec, preprocess, "validation", task) if val else None
    if csrc is None and vsrc is None:
        raise BadInput("no data: give --calib DIR|FILE.npz (and --val for held-out validation)")
    if vsrc is not None:
        vidx = _pick(rng, vsrc, val_samples)
        cidx = _pick(rng, csrc, calib_samples) if csrc else None
        _check_memory(spec, [(csrc, cidx), (vsrc, vidx)])
        cal = csrc.load(cidx, spec, "calibration") if csrc and cidx is not None else None
        return DataSplit(cal, vsrc.load(vidx, spec, "validation"), f"validation from {vsrc.where}")
    assert csrc is not None
    if csrc.count < 2:
        raise BadInput(f"{csrc.where} has {csrc.count} sample; need >= 2 to hold some out, or give --val")
    order = _stratified_order(rng, csrc)
    n_val = min(val_samples, max(1, round(csrc.count * holdout)))
    vidx, cidx = np.sort(order[:n_val]), np.sort(order[n_val:][:calib_samples])
    note = f"validation = {n_val} samples held out of {csrc.where}, never used for calibration"
    _check_memory(spec, [(csrc, cidx), (csrc, vidx)])
    return DataSplit(csrc.load(cidx, spec, "calibration"), csrc.load(vidx, spec, "validation"), note)


def _check_memory(spec: ModelSpec, parts: list[tuple[_Source | None, np.ndarray | None]]) -> None:
    """Refuse, before loading anything, samples that cannot fit in memory (with their size, and what to change)."""
    need = sum(len(idx) * src.sample_bytes(spec) for src, idx in parts if src is not None and idx is not None)
    available = available_memory()
    if need > available:
        n = sum(len(idx) for src, idx in parts if src is not None and idx is not None)
        shapes = ", ".join(f"{i.name} {'x'.join(map(str, i.shape[1:]))} {i.dtype}" for i in spec.inputs)
        raise BadInput(f"loading {n} calibration and validation samples ({shapes} each) needs {human_bytes(need)}, "
                       f"more than the {human_bytes(available)} of memory available: give fewer --calib-samples / "
                       "--val-samples or a smaller --input-shape")


def _pick(rng: np.random.Generator, src: _Source, limit: int) -> np.ndarray:
    return np.sort(_stratified_order(rng, src)[:limit])


def _stratified_order(rng: np.random.Generator, src: _Source) -> np.ndarray:
    """A shuffled order that interleaves classes, so any prefix keeps the class balance."""
    if src.labels is None:
        return rng.permutation(src.count)
    per_class = [rng.permutation(np.flatnonzero(src.labels == k)) for k in np.unique(src.labels)]
    rank = np.empty(src.count)
    for members in per_class:
        rank[members] = (np.arange(len(members)) + rng.random(len(members))) / max(1, len(members))
    return np.argsort(rank, kind="stable")
