"""Where edgekit keeps what it caches: $EDGEKIT_HOME/cache/KIND, else ~/.cache/edgekit/KIND (one rule for
the build cache, sensitivities, pruning sensitivities and the host cost-model calibration)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    home = os.environ.get("EDGEKIT_HOME")
    return (Path(home) / "cache" if home else Path.home() / ".cache" / "edgekit") / kind
