"""The build cache: finished stages kept by the content hash of everything they depend on.

A second build with the same inputs reuses each stage (ingest, compression, every export, the runtime
outputs verification compares, the timing, the memory and per-layer profiles) instead of redoing it;
a changed input changes the keys of exactly the stages that depend on it, so only those run again.
Keys hash content, never paths or times: the model's bytes, the data's arrays, the settings, and the
versions of edgekit and of the libraries that did the work. Measurements (timing, memory) are reused
only on the same host (CPU model, cores, hostname) and say so in the manifest (`cache.reused`);
`--remeasure` times again, `--no-cache` rebuilds everything.

Entries are folders under $EDGEKIT_HOME/cache/build (default ~/.cache/edgekit/build), written to a
temporary name and renamed into place, so a crash never leaves a half entry that looks valid.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.home import cache_dir
from edgekit.jsonable import jsonable as _jsonable
from edgekit.version import __version__

SCHEMA = "edgekit-build-cache/1"


def default_root() -> Path:
    return cache_dir("build")


@functools.cache
def code_digest() -> str:
    """edgekit's own source: a changed exporter (a fix, a git pull) must not hand back old results."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """sha256 of JSON-able parts; numpy arrays and dataclasses by content; keyed by edgekit's code."""
    h = hashlib.sha256(SCHEMA.encode() + __version__.encode() + code_digest().encode())
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x)
        h.update(f"nd:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(x, dict):
        h.update(b"{")
        for k in sorted(x, key=str):
            h.update(str(k).encode() + b":")
            _feed(h, x[k])
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"[")
        for v in x:
            _feed(h, v)
        h.update(b"]")
    elif is_dataclass(x) and not isinstance(x, type):
        _feed(h, asdict(x))
    else:
        h.update(json.dumps(x, default=str).encode())


def dataset_digest(dataset: Any) -> str | None:
    """A Dataset's inputs and labels; None for no data."""
    if dataset is None:
        return None
    return digest(dict(dataset.inputs), dataset.labels)


def files_digest(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.encode() + b"\0")
        with open(root / f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def host_identity() -> dict[str, Any]:
    """What a measurement is valid for: the same machine (a shared runner's noise is the user's to judge)."""
    from edgekit.targets import detect_host

    cpu = detect_host()["cpu"]
    return {"host": platform.node(), "cpu": cpu.get("model"), "cores": cpu.get("cores")}


class BuildCache:
    def __init__(self, enabled: bool = True, root: Path | None = None) -> None:
        self.enabled = enabled
        self.root = root or default_root()
        self.reused: list[str] = []

    def _entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:40]

    def get_json(self, stage: str, key: str, label: str) -> Any:
        if not self.enabled:
            return None
        try:
            value = json.loads((self._entry(stage, key) / "value.json").read_text())
        except (OSError, ValueError):
            return None
        self.reused.append(label)
        return value

    def put_json(self, stage: str, key: str, value: Any) -> None:
        self._put(stage, key, lambda tmp: (tmp / "value.json").write_text(json.dumps(value, default=_jsonable)))

    def get_arrays(self, stage: str, key: str, label: str) -> list[np.ndarray] | None:
        if not self.enabled:
            return None
        try:
            with np.load(self._entry(stage, key) / "arrays.npz", allow_pickle=False) as z:
                arrays = [z[f"a{i}"] for i in range(len(z.files))]
        except (OSError, ValueError, KeyError):
            return None
        self.reused.append(label)
        return arrays

    def put_arrays(self, stage: str, key: str, arrays: list[np.ndarray]) -> None:
        self._put(stage, key, lambda tmp: np.savez(tmp / "arrays.npz", **{f"a{i}": a for i, a in enumerate(arrays)}))

    def get_tree(self, stage: str, key: str, dest: Path, label: str) -> Any:
        """Copy a cached folder's files into dest; returns its metadata, or None on a miss."""
        if not self.enabled:
            return None
        entry = self._entry(stage, key)
        try:
            meta = json.loads((entry / "value.json").read_text())
            files = entry / "files"
            dest.mkdir(parents=True, exist_ok=True)
            for src in files.rglob("*"):
                if src.is_file():
                    target = dest / src.relative_to(files)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
        except (OSError, ValueError):
            return None
        self.reused.append(label)
        return meta

    def put_tree(self, stage: str, key: str, src: Path, files: list[str], meta: Any) -> None:
        def write(tmp: Path) -> None:
            for f in files:
                target = tmp / "files" / f
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / f, target)
            (tmp / "value.json").write_text(json.dumps(meta, default=_jsonable))

        self._put(stage, key, write)

    def _put(self, stage: str, key: str, write: Any) -> None:
        if not self.enabled:
            return
        entry = self._entry(stage, key)
        tmp = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a full or read-only cache only costs time


