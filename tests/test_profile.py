from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import BUNDLED_ONNX

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.timing import ProfileSettings, interleaved, peak_memory_mb, time_artifacts


def _artifact() -> Artifact:
    return Artifact("onnxruntime", "fp32", str(BUNDLED_ONNX.parent), [BUNDLED_ONNX.name], BUNDLED_ONNX.name)


def test_interleaved_rounds_give_every_session_the_same_runs() -> None:
    session = backends.get("onnxruntime").load(_artifact(), 1)
    feeds = {"image": np.zeros((1, 3, 96, 96), np.float32)}
    lat = interleaved({"a": session, "b": session}, feeds, ProfileSettings(warmup_runs=2, min_runs=16, seconds=0))
    assert lat["a"].runs == lat["b"].runs == 16  # blocks of 4
    assert 0 < lat["a"].min <= lat["a"].p50 <= lat["a"].p90 <= lat["a"].p99
    assert lat["a"].threads == 1 and lat["a"].where.startswith("local:")


def test_timing_process_leaves_callers_sessions_alone() -> None:
    feeds = {"image": np.zeros((1, 3, 96, 96), np.float32)}
    lat = time_artifacts({"x": _artifact(), "y": _artifact()}, feeds, ProfileSettings(min_runs=10, seconds=0), 2)
    assert lat["x"].runs == lat["y"].runs == 10 and lat["x"].threads == 2
    # the shared thread pool lives in the timing process only: per-session threads still work here
    session = backends.get("onnxruntime").load(_artifact(), 2)
    assert session.run(feeds)[0].shape == (1, 4)


def test_peak_memory_counts_the_model() -> None:
    feeds = {"image": np.zeros((1, 3, 96, 96), np.float32)}
    mb = peak_memory_mb(_artifact(), 1, feeds)
    weights_mb = Path(BUNDLED_ONNX).stat().st_size / 2**20
    assert mb is not None and mb >= weights_mb * 0.9  # at least the weights are resident
