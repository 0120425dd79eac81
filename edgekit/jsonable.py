"""The one `default=` for json.dumps across edgekit (manifest, console --json, the build cache)."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any, strict: bool = False) -> Any:
    """numpy arrays and scalars as lists and numbers, objects with to_dict() or dataclasses as dicts, paths
    as strings; anything else str() — or, with strict (what a manifest holds must be data), a TypeError."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if is_dataclass(x) and not isinstance(x, type):
        return asdict(x)
    if isinstance(x, Path):
        return str(x)
    if strict:
        raise TypeError(f"not JSON serialisable: {type(x).__name__}")
    return str(x)


def strict_jsonable(x: Any) -> Any:
    return jsonable(x, strict=True)
