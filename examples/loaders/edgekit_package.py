"""What an app needs to use an edgekit package, without edgekit: read manifest.json, pick an artifact,
turn an image into the model input exactly as edgekit verified it, name the top class, and refuse a
runtime the package was not verified with. Needs numpy and Pillow; copy this file into your app.

The run_*.py examples beside it use it:  python run_onnxruntime.py PACKAGE IMAGE [IMAGE ...] [--artifact KEY]
Each prints one line per image: LABEL<TAB>SCORE<TAB>ARTIFACT KEY<TAB>IMAGE.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PREFERRED = ("int8", "fp16", "fp32")  # the default artifact of a backend: the smallest precision it has
# Release numbers compared by the lock: major.minor, but ncnn's pip wheels are all 1.0.YYYYMMDD, so
# its date is the release.
RELEASE_PARTS = {"ncnn": 3}


# ---------------------------------------------------------------- the package


def parse_args(backend: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Classify images with an edgekit package's {backend} artifact.")
    p.add_argument("package", type=Path, help="the package folder (with manifest.json)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--artifact", help=f"artifact key, e.g. {backend}-int8 (default: the {backend} artifact "
                   "with the lowest precision)")
    return p.parse_args()


def load_manifest(package: Path) -> dict[str, Any]:
    path = Path(package) / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{package} is not an edgekit package (no manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != "edgekit-manifest/1":
        raise SystemExit(f"{path}: schema {manifest.get('schema')!r}; this loader reads edgekit-manifest/1")
    return manifest


def pick_artifact(manifest: dict[str, Any], backend: str, key: str | None = None) -> dict[str, Any]:
    """The artifact with this key, or the backend's lowest-precision one; only verified artifacts."""
    mine = [a for a in manifest["artifacts"] if a["backend"] == backend]
    if key:
        mine = [a for a in manifest["artifacts"] if a["key"] == key]
        if not mine or mine[0]["backend"] != backend:
            keys = ", ".join(a["key"] for a in manifest["artifacts"] if a["backend"] == backend) or "none"
            raise SystemExit(f"no {backend} artifact {key!r} in this package ({backend} artifacts: {keys})")
    if not mine:
        raise SystemExit(f"this package has no {backend} artifact (it has: "
                         f"{', '.join(a['key'] for a in manifest['artifacts'])})")
    mine.sort(key=lambda a: PREFERRED.index(a["precision"]) if a["precision"] in PREFERRED else len(PREFERRED))
    artifact = mine[0]
    if not artifact["verification"]["passed"]:
        raise SystemExit(f"{artifact['key']} failed edgekit's verification: "
                         + "; ".join(artifact["verification"]["failures"]))
    return artifact


def artifact_path(package: Path, artifact: dict[str, Any]) -> Path:
    return Path(package) / artifact["entry"]


# ---------------------------------------------------------------- preprocessing


def preprocess(image: Path, manifest: dict[str, Any]) -> np.ndarray:
    """The image as the model's input with a batch axis: resize, color, ((pixel * scale) - mean) / std,
    layout; the same arithmetic edgekit used on the validation data (edgekit/data.py)."""
    spec = manifest.get("preprocess")
    if not spec:
        raise SystemExit("this package was built from arrays (.npz), not images: feed the model as "
                         "manifest.json's `inputs` describe")
    color = spec.get("color", "rgb")
    with Image.open(image) as im:
        im = _resize(im.convert("L" if color == "gray" else "RGB"), spec)
        x = np.asarray(im, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if color == "bgr":
        x = x[:, :, ::-1]
    channels = x.shape[2]
    mean, std = (np.broadcast_to(np.asarray(spec.get(k, d), np.float32), (channels,)) for k, d in
                 (("mean", 0.0), ("std", 1.0)))
    x = (x * np.float32(spec.get("scale", 1 / 255)) - mean) / std
    if spec.get("layout", "nchw") == "nchw":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None], dtype=np.float32)


def _resize(im: Image.Image, spec: dict[str, Any]) -> Image.Image:
    h, w = spec["size"]
    mode = spec.get("resize", "stretch")
    if mode == "stretch":
        return im.resize((w, h), Image.BILINEAR)
    if mode == "letterbox":  # fit inside, centred on a pad_value border
        r = min(h / im.height, w / im.width)
        nw, nh = max(1, round(im.width * r)), max(1, round(im.height * r))
        canvas = Image.new(im.mode, (w, h), (int(spec.get("pad_value", 114)),) * len(im.getbands()))
        canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
        return canvas
    if mode == "center-crop":  # cover, then cut the middle
        r = max(h / im.height, w / im.width)
        nw, nh = max(w, round(im.width * r)), max(h, round(im.height * r))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        return im.crop((left, top, left + w, top + h))
    raise SystemExit(f"unknown resize mode {mode!r} in the manifest's preprocess")


# ---------------------------------------------------------------- results


def top1(scores: np.ndarray, manifest: dict[str, Any]) -> tuple[str, float]:
    """The best class's label (manifest `labels`, else its index) and its probability: softmax, unless
    the model already outputs probabilities."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (s.min() >= 0 and s.max() <= 1 and abs(s.sum() - 1) < 1e-3):
        e = np.exp(s - s.max())
        s = e / e.sum()
    i = int(s.argmax())
    labels = manifest.get("labels") or []
    return (labels[i] if i < len(labels) else str(i)), float(s[i])


def report(manifest: dict[str, Any], artifact: dict[str, Any], image: Path, scores: np.ndarray) -> None:
    label, score = top1(scores, manifest)
    print(f"{label}\t{score:.4f}\t{artifact['key']}\t{image}")


# ---------------------------------------------------------------- runtime lock


def release(name: str, version: str) -> tuple[int, ...]:
    """'2026.4.1-22982-...' -> (2026, 4); '1.0.20261020' (ncnn) -> (1, 0, 20261020)."""
    parts = [int(p) for p in re.findall(r"\d+", str(version))]
    n = RELEASE_PARTS.get(name, 2)
    return tuple(parts[:n] + [0] * (n - len(parts[:n])))


def check_runtime(manifest: dict[str, Any], artifact: dict[str, Any], runtime_name: str, runtime_version: str,
                  *, package: Path | None = None, compute_capability: str | None = None) -> None:
    """Refuse a runtime older than the one the package was verified with (an older runtime may lack an
    op, an INT8 kernel or the file format); warn on a newer major version (behaviour may change).
    TensorRT: the engine must match the TensorRT version and GPU it was built for (engine.json)."""
    key = artifact["key"]
    if runtime_name == "tensorrt":
        if package is None:
            raise SystemExit(f"{key}: the TensorRT check needs the package folder (engine.json)")
        check_engine(Path(package) / Path(artifact["entry"]).parent, runtime_version, compute_capability, key)
        return
    built = (manifest.get("toolchain") or {}).get(runtime_name)
    if not built:
        print(f"warning: {key}: manifest.json does not record the {runtime_name} version it was verified with; "
              "cannot check the runtime", file=sys.stderr)
        return
    have, want = release(runtime_name, runtime_version), release(runtime_name, built)
    if have < want:
        raise SystemExit(f"{key}: installed {runtime_name} {runtime_version} is older than {built}, which this "
                         f"package was built and verified with; install {runtime_name}>={built} (or rebuild the "
                         f"package with edgekit using {runtime_name} {runtime_version})")
    if have[0] > want[0]:
        print(f"warning: {key}: {runtime_name} {runtime_version} is a newer major version than {built}, which "
              "this package was verified with; rebuild it with edgekit to verify it with this one", file=sys.stderr)


def check_engine(artifact_dir: Path, tensorrt_version: str, compute_capability: str | None, key: str = "") -> None:
    """An engine is tied to the TensorRT version and the GPU architecture it was built with: compare
    engine.json's `tied_to` (and model.engine.json, written by build_engine.py when it built it)
    with the installed TensorRT and this GPU."""
    where = f"{key}: " if key else ""
    rebuild = f"rebuild the engine on this device with build_engine.sh: sh {artifact_dir / 'build_engine.sh'} --force"
    try:
        tied = json.loads((artifact_dir / "engine.json").read_text())["tied_to"]
    except (OSError, ValueError, KeyError):
        raise SystemExit(f"{where}{artifact_dir}/engine.json is missing or has no tied_to; {rebuild}") from None
    built = {}
    sidecar = artifact_dir / "model.engine.json"
    if sidecar.is_file():  # the exact version and GPU the engine was built with, when build_engine.py built it
        built = json.loads(sidecar.read_text())
    want_trt = built.get("tensorrt") or tied.get("tensorrt")
    exact = bool(built.get("tensorrt"))
    have, want = (_numbers(tensorrt_version), _numbers(want_trt)) if want_trt else ((), ())
    if want and (have[:len(want)] != want if exact else have[:2] != want[:2]):
        raise SystemExit(f"{where}the engine is tied to TensorRT {want_trt}, this device has TensorRT "
                         f"{tensorrt_version}; {rebuild}")
    want_cc = ((built.get("gpu") or {}).get("compute_capability")) or tied.get("compute_capability")
    if want_cc and compute_capability and _numbers(want_cc)[:2] != _numbers(compute_capability)[:2]:
        raise SystemExit(f"{where}the engine is tied to GPU compute capability {want_cc} "
                         f"({tied.get('gpu') or 'the target GPU'}), this GPU is {compute_capability}; {rebuild}")


def _numbers(version: str) -> tuple[int, ...]:
    v = str(version).lower().removeprefix("sm_")
    if re.fullmatch(r"\d{2,3}", v):  # "87" / "sm_87": compute capability without the dot
        return int(v[:-1]), int(v[-1])
    return tuple(int(p) for p in re.findall(r"\d+", v))
