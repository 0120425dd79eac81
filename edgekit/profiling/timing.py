"""Profile: latency measured on this machine, every artifact interleaved with its FP32 reference.

Shared machines are noisy; only ratios from one interleaved run mean anything. So all sessions are
timed round-robin in the same process, and each artifact's speedup is against the reference
measured in the very same rounds.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.backends.base import Artifact, Session


@dataclass
class Latency:
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    runs: int
    threads: int
    where: str  # "local:<host>" | "ssh://..." | "estimate"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProfileSettings:
    warmup_runs: int = 10
    min_runs: int = 50
    max_runs: int = 2000
    # Seconds per session on average: the rounds stop once they took len(sessions) x seconds in all (and
    # each session has min_runs), unless max_runs comes first. Every session gets the same runs, so the
    # time is shared in proportion to cost. (The fastest session used to need `seconds` of its own while
    # every round paid for all the others: --profile-seconds 2 ran 1,728 rounds of 12 sessions.)
    seconds: float = 3.0
    # Sessions alternate in blocks, and the first runs of each block are not counted: after a switch
    # the previous runtime's threads still spin for a while (ONNX Runtime, OpenVINO's TBB), which
    # alternating every run charges to the other runtime (OpenVINO p50 0.56 ms alone, 0.81 alternating
    # with ONNX Runtime per run, 0.70 in blocks of 25 with 3 discarded; measured on 2 cores).
    block: int = 25
    block_skip: int = 3


def where_local() -> str:
    return f"local:{platform.node() or 'host'}"


def interleaved(sessions: dict[str, Session], feeds: dict[str, np.ndarray], settings: ProfileSettings,
                on_round: Any = None) -> dict[str, Latency]:
    """Time every session in alternating blocks (rotating the order each round) until each has min_runs
    and the rounds took len(sessions) x seconds in all (the warmup aside), or max_runs."""
    keys = list(sessions)
    for _ in range(settings.warmup_runs):
        for k in keys:
            sessions[k].run(feeds)
    block = max(1, min(settings.block, settings.min_runs // 4))
    skip = settings.block_skip if block > 1 else 0
    times: dict[str, list[float]] = {k: [] for k in keys}
    budget = settings.seconds * len(keys)
    started = time.perf_counter()
    rnd = 0
    while True:
        order = keys[rnd % len(keys):] + keys[: rnd % len(keys)]
        for k in order:
            for i in range(skip + block):
                t0 = time.perf_counter()
                sessions[k].run(feeds)
                dt = time.perf_counter() - t0
                if i >= skip:
                    times[k].append(dt * 1e3)
        rnd += 1
        if on_round:
            on_round(rnd)
        runs = min(len(v) for v in times.values())
        # the whole rounds count (discarded runs included): the time bound is on what the caller waits
        if (runs >= settings.min_runs and time.perf_counter() - started >= budget) or runs >= settings.max_runs:
            break
    where = where_local()
    return {k: _summary(v, sessions[k].threads, where) for k, v in times.items()}


def time_artifacts(artifacts: dict[str, Artifact], feeds: dict[str, np.ndarray], settings: ProfileSettings,
                   threads: int) -> dict[str, Latency]:
    """Interleaved timing of artifacts in a fresh process of their own.

    A fresh process keeps the build's memory and threads out of the timing, and lets backends set
    process-wide options (ONNX Runtime's shared thread pool) without touching the caller's sessions.
    """
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_time, (artifacts, feeds, settings, threads))


def _child_time(artifacts: dict[str, Artifact], feeds: dict[str, np.ndarray], settings: ProfileSettings,
                threads: int) -> dict[str, Latency]:
    from edgekit import backends

    used = {a.backend: backends.get_installed(a.backend) for a in artifacts.values()}
    for backend in used.values():
        backend.prepare_timing_process(threads)
    sessions = {k: used[a.backend].load(a, threads) for k, a in artifacts.items()}
    return interleaved(sessions, feeds, settings)


def _summary(ms: list[float], threads: int, where: str) -> Latency:
    a = np.asarray(ms)
    p50, p90, p99 = (float(np.percentile(a, q)) for q in (50, 90, 99))
    return Latency(round(p50, 4), round(p90, 4), round(p99, 4), round(float(a.mean()), 4),
                   round(float(a.min()), 4), len(a), threads, where)


# ---------------------------------------------------------------- peak memory


def peak_memory_mb(artifact: Artifact, threads: int, feeds: dict[str, np.ndarray], runs: int = 5) -> float | None:
    """Resident memory the artifact adds: load + run in a fresh process, peak RSS minus the baseline
    of the same process with the runtime imported but no model loaded."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        try:
            return pool.apply(_child_peak, (artifact, threads, feeds, runs))
        except Exception:
            return None


def _child_peak(artifact: Artifact, threads: int, feeds: dict[str, np.ndarray], runs: int) -> float:
    from edgekit import backends

    backend = backends.get_installed(artifact.backend)
    for module in backend.requires:  # the runtime is imported before the baseline is taken
        importlib.import_module(module)
    before = _rss_kib("VmRSS")
    _reset_peak()  # import-time peaks would otherwise hide a small model
    session = backend.load(artifact, threads)
    for _ in range(runs):
        session.run(feeds)
    return round(max(0, _rss_kib("VmHWM") - before) / 1024, 2)


def _rss_kib(field: str) -> int:
    """VmRSS / VmHWM from /proc (Linux); elsewhere getrusage's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    with contextlib.suppress(OSError):  # "5" resets the peak resident set size (VmHWM), Linux >= 4.0
        Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- per-node time


def onnxruntime_node_times(model_path: str | Path, feeds: dict[str, np.ndarray], threads: int,
                           runs: int = 20) -> dict[str, float]:
    """Mean time per graph node (ms) from ONNX Runtime's own profiler, in a fresh process: the measured
    per-layer figures of the report (for the FP32 reference on this host)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_node_times, (str(model_path), feeds, threads, runs))


def _child_node_times(model_path: str, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgekit-nodeprof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        # Optimisations off: the profile then names the canonical graph's nodes, not fused ones.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        for _ in range(3 + runs):  # the profiler records every run: the first three are dropped below
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(float(e["dur"]) / 1e3)
    return {node: round(float(np.mean(d[3:] or d)), 5) for node, d in per_node.items()}
