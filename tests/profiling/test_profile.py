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


# ---------------------------------------------------------------- one rule, on the host and on the device


class _FakeClock:
    """Time that passes only inside the calls: each call of a job takes the next of its own durations."""

    def __init__(self, durations: dict[str, list[float]]) -> None:
        self.now, self.log, self.durations = 0.0, [], {k: iter(v) for k, v in durations.items()}

    def __call__(self) -> float:
        return self.now

    def job(self, key: str):
        def run() -> None:
            self.log.append(key)
            self.now += next(self.durations[key])
        return run


def _synthetic_durations(keys: list[str]) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)  # 1, 2 and 5 ms, +-30%: a sequence of its own per job
    return {k: list((1, 2, 5)[i % 3] * 1e-3 * rng.uniform(0.7, 1.3, 100_000)) for i, k in enumerate(keys)}


def test_device_runner_keeps_the_hosts_timing_rule() -> None:
    """The runner's copy of the rule (it runs alone on the device) and the host's loop, on one synthetic
    sequence of run times: the same calls in the same order, the same counted times, the same figures."""
    from argparse import Namespace

    from edgekit.profiling import runner
    from edgekit.profiling.device import RemoteSettings
    from edgekit.profiling.timing import block_rule, summarize, timed_rounds

    defaults, remote = ProfileSettings(), RemoteSettings()
    assert (runner.BLOCK, runner.BLOCK_SKIP) == (defaults.block, defaults.block_skip) == (remote.block,
                                                                                           remote.block_skip)
    keys = ["fast", "mid", "slow"]
    for min_runs, seconds, max_runs in ((16, 0.05, 2000), (200, 0.01, 2000), (3, 0.0, 2000), (50, 10.0, 120)):
        settings = ProfileSettings(warmup_runs=2, min_runs=min_runs, max_runs=max_runs, seconds=seconds)
        assert block_rule(settings) == runner.block_rule(min_runs)
        host_clock = _FakeClock(_synthetic_durations(keys))
        host = timed_rounds([{k: host_clock.job(k)} for k in keys], settings, per_job_seconds=True, clock=host_clock)
        device_clock = _FakeClock(_synthetic_durations(keys))
        args = Namespace(warmup=2, min_runs=min_runs, max_runs=max_runs, seconds=seconds, block=runner.BLOCK,
                         block_skip=runner.BLOCK_SKIP)
        times, errors = runner.interleaved([(k, device_clock.job(k)) for k in keys], args, clock=device_clock)
        assert not errors and device_clock.log == host_clock.log  # the same calls, interleaved alike
        assert times == host.times and len({len(v) for v in times.values()}) == 1
        for k in keys:
            lat = summarize(host.times[k], 2, "local:x")
            assert runner.summary(times[k], 2) == {f: getattr(lat, f) for f in
                                                   ("p50", "p90", "p99", "mean", "min", "runs", "threads")}
        # whole blocks, the order rotated every round: fast mid slow, mid slow fast, slow fast mid, ...
        block, skip = runner.block_rule(min_runs)
        log = device_clock.log
        blocks = [log[i:i + block + skip] for i in range(2 * len(keys), len(log), block + skip)]
        assert all(len(set(b)) == 1 for b in blocks) and len(blocks) == len(keys) * len(times["fast"]) // block
        assert [b[0] for b in blocks[:9]] == ["fast", "mid", "slow", "mid", "slow", "fast", "slow", "fast", "mid"]


def test_compare_groups_run_back_to_back_alternating() -> None:
    """Jobs of one group (compare: the two packages' builds of one artifact) run next to each other, their
    order alternating every round, the groups rotated."""
    from edgekit.profiling.timing import timed_rounds

    clock = _FakeClock(_synthetic_durations(["a:x", "b:x", "a:y", "b:y"]))
    groups = [{"a:x": clock.job("a:x"), "b:x": clock.job("b:x")}, {"a:y": clock.job("a:y"), "b:y": clock.job("b:y")}]
    settings = ProfileSettings(warmup_runs=0, min_runs=4, seconds=0)  # blocks of one run, nothing discarded
    rounds = timed_rounds(groups, settings, min_rounds=3, per_job_seconds=True, clock=clock)
    assert rounds.rounds == 4 and all(len(v) == 4 == len(rounds.block_medians[k]) for k, v in rounds.times.items())
    assert clock.log == ["a:x", "b:x", "a:y", "b:y", "b:y", "a:y", "b:x", "a:x",
                         "a:x", "b:x", "a:y", "b:y", "b:y", "a:y", "b:x", "a:x"]


def _runner_package(tmp_path: Path) -> Path:
    """A package folder as the runner sees it on a device: manifest.json and two ONNX Runtime artifacts."""
    import json

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name, matmuls in (("fast", 0), ("slow", 2)):
        _ort_model(pkg / name, matmuls)
    arts = [{"key": k, "backend": "onnxruntime", "precision": "fp32", "entry": f"{k}/m.onnx", "files": []}
            for k in ("fast", "slow")]
    (pkg / "manifest.json").write_text(json.dumps({"inputs": [{"name": "x", "shape": [64, 512], "dtype": "float32"}],
                                                   "artifacts": arts, "toolchain": {}}))
    return pkg


def test_device_runner_interleaves_real_sessions(tmp_path: Path) -> None:
    """The runner's loop with two real ONNX Runtime sessions it loaded itself: whole blocks, alternating,
    and measure() reports both with the same runs and the fields device.py reads."""
    import json
    from argparse import Namespace

    from edgekit.profiling import runner

    pkg = _runner_package(tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    log: list[str] = []

    def logged(key: str, run):
        def call():
            log.append(key)
            return run()
        return call

    calls = [(a["key"], logged(a["key"], runner.load_onnxruntime(str(pkg), a, manifest["inputs"], 1)))
             for a in manifest["artifacts"]]
    args = Namespace(warmup=2, min_runs=8, max_runs=2000, seconds=0.005, block=runner.BLOCK,
                     block_skip=runner.BLOCK_SKIP)
    times, errors = runner.interleaved(calls, args)
    assert not errors and len(times["fast"]) == len(times["slow"]) >= 8
    block, skip = runner.block_rule(8)
    assert (block, skip) == (2, 3)
    timed = log[4:]  # after the warmup (fast, slow, fast, slow)
    chunks = [timed[i:i + block + skip] for i in range(0, len(timed), block + skip)]
    assert all(len(set(c)) == 1 for c in chunks), "a block runs one artifact only"
    assert [c[0] for c in chunks[:4]] == ["fast", "slow", "slow", "fast"]  # rotated every round
    assert len(chunks) == 2 * len(times["fast"]) // block

    out = runner.measure(Namespace(package=str(pkg), artifact=[], seconds=0.005, min_runs=8, max_runs=2000, warmup=2,
                                   threads=1, deadline=0, block=runner.BLOCK, block_skip=runner.BLOCK_SKIP))
    assert not out["errors"] and list(out["results"]) == ["fast", "slow"]
    fast, slow = out["results"]["fast"], out["results"]["slow"]
    assert set(fast) == set(slow) == {"p50", "p90", "p99", "mean", "min", "runs", "threads", "load_s"}
    assert fast["runs"] == slow["runs"] >= 8 and fast["threads"] == 1
    assert fast["p50"] < slow["p50"] and fast["min"] <= fast["p50"] <= fast["p90"] <= fast["p99"]


def test_rounds_stop_when_the_ratios_are_settled() -> None:
    """stable_within ends the rounds once every ratio is known that closely: steady jobs stop at the minimum
    rounds, long before the time budget; jobs whose ratio keeps swinging run to the budget."""
    from edgekit.profiling.timing import STABLE_MIN_ROUNDS, ProfileSettings, ratios_settled, timed_rounds

    keys = ["ref", "fast", "slow"]
    settings = ProfileSettings(warmup_runs=0, min_runs=20, seconds=60.0, block=10, block_skip=0, stable_within=0.03)
    clock = _FakeClock(_synthetic_durations(keys))  # +-30% per run, block medians far steadier
    steady = timed_rounds([{k: clock.job(k)} for k in keys], settings, clock=clock)
    assert steady.rounds >= STABLE_MIN_ROUNDS
    assert clock.now < 0.25 * settings.seconds * len(keys)  # stopped long before the time was up
    assert ratios_settled(steady.block_medians, 0.03)
    rng = np.random.default_rng(1)
    swinging = {"ref": list(np.full(10 ** 6, 1e-3)),
                "other": list(np.repeat(rng.choice([1e-3, 4e-3], 10 ** 5), 10))}  # whole blocks 1x or 4x
    clock = _FakeClock(swinging)
    noisy = timed_rounds([{k: clock.job(k)} for k in swinging], ProfileSettings(
        warmup_runs=0, min_runs=20, seconds=0.5, block=10, block_skip=0, stable_within=0.03), clock=clock)
    assert clock.now >= 0.5 * 2 and noisy.rounds > 3 * STABLE_MIN_ROUNDS
    assert not ratios_settled({"a": [1.0] * 5, "b": [2.0] * 5}, 0.03)  # too few rounds to say
    assert ratios_settled({"a": [1.0] * 8, "b": [2.0] * 8}, 0.03)
