"""The profiles/ store: device measurement records, one JSON file per device, target, model, backend and
precision (`profiles/DEVICE/TARGET-SHA12-BACKEND-PRECISION.json`, schema edgekit-profile/1).

device.py writes a record per artifact measured on a device; the cost model reads the records of a
target (those carrying per-layer cost features) to fit itself to that target. Nothing here measures.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.packaging.manifest import write_json
from edgekit.profiling.devices import edgekit_home

SCHEMA = "edgekit-profile/1"


def profiles_root() -> Path:
    """$EDGEKIT_PROFILES; else the repository's profiles/ when run inside the edgekit repository;
    else $EDGEKIT_HOME/profiles."""
    if os.environ.get("EDGEKIT_PROFILES"):
        return Path(os.environ["EDGEKIT_PROFILES"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "profiles").is_dir() and (repo / "pyproject.toml").is_file() \
            and Path.cwd().resolve().is_relative_to(repo):
        return repo / "profiles"
    return edgekit_home() / "profiles"


def record_path(device: str, target: str, model_sha256: str, backend: str, precision: str) -> Path:
    """Where the measurement of one artifact of one model on one device is kept."""
    return profiles_root() / device / f"{target}-{model_sha256[:12]}-{backend}-{precision}.json"


def write_record(path: Path, record: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return path


def target_records(target: str, root: Path | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, record) of every readable record of the target, in path order; foreign or truncated
    files are skipped (they are not measurements)."""
    root = profiles_root() if root is None else root
    if not root.is_dir():
        return
    for path in sorted(root.glob(f"*/{target}-*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("target") == target:
            yield path, rec


def cost_features(spec_layers: list[dict[str, Any]]) -> list[list[Any]]:
    """A manifest's `layers` as the compact per-layer features a record carries (op type, MACs, params,
    output elements: costmodel.LayerFeatures)."""
    return [[la["op_type"], la["macs"], la["params"], math.prod(max(int(d), 1) for d in la["output_shape"])]
            for la in spec_layers]
