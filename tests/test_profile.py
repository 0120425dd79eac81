from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from conftest import BUNDLED_ONNX

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.profiling.timing import ProfileSettings, interleaved, peak_memory_mb, time_artifacts


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


def _ort_model(path: Path, matmuls: int) -> Artifact:
    """x[64, 512] -> Relu, then `matmuls` 512x512 MatMuls: 0 is microseconds, 6 milliseconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((512, 512)) / 23).astype(np.float32), f"w{i}")
             for i in range(matmuls)]
    nodes = [helper.make_node("Relu", ["x"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(matmuls)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 512])],
                              [helper.make_tensor_value_info(f"h{matmuls}", TensorProto.FLOAT, [64, 512])], inits)
    path.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path / "m.onnx")
    return Artifact("onnxruntime", "fp32", str(path), ["m.onnx"], "m.onnx")


def test_interleaved_time_is_bounded_by_sessions_times_seconds(tmp_path: Path) -> None:
    """A fast and a slow session: the rounds stop at about 2 x seconds in all, not when the fast one has
    `seconds` of its own (that took max_runs rounds of the slow one: seconds of extra wall time)."""
    ort = backends.get("onnxruntime")
    sessions = {"fast": ort.load(_ort_model(tmp_path / "fast", 0), 1),
                "slow": ort.load(_ort_model(tmp_path / "slow", 6), 1)}
    feeds = {"x": np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)}
    settings = ProfileSettings(warmup_runs=2, min_runs=8, seconds=0.25)
    t0 = time.perf_counter()
    lat = interleaved(sessions, feeds, settings)
    wall = time.perf_counter() - t0
    assert lat["fast"].runs == lat["slow"].runs >= settings.min_runs  # side by side, the same runs each
    assert lat["slow"].p50 > 20 * lat["fast"].p50  # the sessions really differ in cost
    assert lat["fast"].runs < settings.max_runs
    assert lat["fast"].runs * lat["fast"].mean / 1e3 < settings.seconds  # the fast one got less than `seconds`...
    assert wall < 2 * settings.seconds + 1.0, wall  # ...and the whole run stayed near 2 x seconds (+ warmup, a round)
