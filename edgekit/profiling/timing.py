"""Local timing: latency measured on this machine, every artifact interleaved with its FP32 reference.

Shared machines are noisy; only ratios from one interleaved run mean anything. So all sessions are
timed round-robin in the same process, and each artifact's speedup is against the reference
measured in the very same rounds. `timed_rounds` is the one loop that does it (build, compare and
check, the planner, the cost model's host calibration); the device runner (runner.py) keeps a copy
of its rule because it runs alone on the device, and tests/test_profile.py holds the two to the same
sequence. Also here: peak memory and ONNX Runtime's per-node times, each in a fresh process.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
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
    # Stop as soon as every job's speed ratio to the first job is known within this fraction (the 95% interval
    # of the median of the per-round ratios), past min_runs and STABLE_MIN_ROUNDS: the planner's rounds end when
    # the comparison is settled, not after a fixed time. None: the time budget alone (build, compare, check).
    stable_within: float | None = None


def where_local() -> str:
    return f"local:{platform.node() or 'host'}"


Job = tuple[Artifact, dict[str, np.ndarray]]  # an artifact, and the inputs it is timed with


@dataclass
class RoundTimes:
    """What one interleaved run measured: every counted run (ms) and each block's median (ms), per job,
    round by round (the same order for every job, so blocks of two jobs in one round can be paired)."""

    times: dict[str, list[float]]
    block_medians: dict[str, list[float]]
    rounds: int


@dataclass
class Timed:
    """One interleaved run, summarised: each job's latency, and its block medians round by round."""

    latency: dict[str, Latency]
    block_medians: dict[str, list[float]]
    rounds: int


STABLE_MIN_ROUNDS = 6


def ratios_settled(medians: dict[str, list[float]], within: float) -> bool:
    """Every job's ratio to the first job, per round (both timed in that round), has a median whose 95%
    interval (1.58 IQR / sqrt(n), the notch of a box plot) is within `within` of it."""
    keys = list(medians)
    base = np.asarray(medians[keys[0]], dtype=np.float64)
    if len(base) < STABLE_MIN_ROUNDS or len(keys) < 2:
        return False
    for k in keys[1:]:
        r = np.asarray(medians[k], dtype=np.float64) / np.maximum(base, 1e-12)
        q1, med, q3 = np.percentile(r, [25, 50, 75])
        if 1.58 * (q3 - q1) / np.sqrt(len(r)) > within * med:
            return False
    return True


def block_rule(settings: ProfileSettings) -> tuple[int, int]:
    """(runs counted per block, runs discarded before them). The device runner applies the same rule."""
    block = max(1, min(settings.block, settings.min_runs // 4))
    return block, settings.block_skip if block > 1 else 0


def timed_rounds(groups: list[dict[str, Callable[[], Any]]], settings: ProfileSettings, min_rounds: int = 1,
                 per_job_seconds: bool = False, on_round: Callable[[int], Any] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> RoundTimes:
    """THE interleaved timing loop (build, compare and check, the planner, the host calibration).

    After `warmup_runs` of every job, rounds: each job runs one block (block_rule), the groups in an order
    rotated every round and the jobs of a group (the two packages' builds of one artifact, in compare)
    back to back, alternating their order. Stops once every job has min_runs, at least min_rounds were
    run and the time is up; or once every job has max_runs. The time is up when the rounds took
    len(jobs) x seconds in all (build's --seconds; the whole rounds count, discarded runs included: the
    bound is on what the caller waits), or with per_job_seconds when every job's counted runs took
    `seconds` of its own (compare's and check's --seconds, "per artifact, at least", as the device
    runner's)."""
    jobs = {k: run for g in groups for k, run in g.items()}
    for _ in range(settings.warmup_runs):
        for run in jobs.values():
            run()
    block, skip = block_rule(settings)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    medians: dict[str, list[float]] = {k: [] for k in jobs}
    spent = dict.fromkeys(jobs, 0.0)
    budget = settings.seconds * len(jobs)
    started = clock()
    rnd = 0
    while True:
        shift = rnd % len(groups)
        for g in groups[shift:] + groups[:shift]:
            for k in (list(g) if rnd % 2 == 0 else list(g)[::-1]):
                run, ms = jobs[k], []
                for i in range(skip + block):
                    t0 = clock()
                    run()
                    dt = clock() - t0
                    if i >= skip:
                        ms.append(dt * 1e3)
                        spent[k] += dt
                times[k] += ms
                medians[k].append(float(np.median(ms)))
        rnd += 1
        if on_round:
            on_round(rnd)
        runs = min(len(v) for v in times.values())
        up = min(spent.values()) >= settings.seconds if per_job_seconds else clock() - started >= budget
        if settings.stable_within is not None and not up:
            up = ratios_settled(medians, settings.stable_within)
        if (runs >= settings.min_runs and up and rnd >= min_rounds) or runs >= settings.max_runs:
            return RoundTimes(times, medians, rnd)


def summarize(ms: list[float], threads: int, where: str) -> Latency:
    """The figures every timing reports (the device runner's `summary` computes the same)."""
    a = np.asarray(ms)
    p50, p90, p99 = (round(float(np.percentile(a, q)), 4) for q in (50, 90, 99))
    return Latency(p50, p90, p99, round(float(a.mean()), 4), round(float(a.min()), 4), len(a), threads, where)


def interleaved(sessions: dict[str, Session], feeds: dict[str, np.ndarray], settings: ProfileSettings,
                on_round: Any = None) -> dict[str, Latency]:
    """Time loaded sessions in this process on the same inputs (timed_rounds, one job per session)."""
    rounds = timed_rounds([{k: partial(s.run, feeds)} for k, s in sessions.items()], settings, on_round=on_round)
    where = where_local()
    return {k: summarize(v, sessions[k].threads, where) for k, v in rounds.times.items()}


def time_artifacts(artifacts: dict[str, Artifact], feeds: dict[str, np.ndarray], settings: ProfileSettings,
                   threads: int) -> dict[str, Latency]:
    """Interleaved timing of artifacts in a fresh process of their own (time_jobs, one job each)."""
    return time_jobs([{k: (a, feeds)} for k, a in artifacts.items()], settings, threads).latency


def time_jobs(groups: list[dict[str, Job]], settings: ProfileSettings, threads: int, min_rounds: int = 1,
              per_job_seconds: bool = False) -> Timed:
    """timed_rounds over artifacts loaded in a fresh process, each job with its own inputs.

    A fresh process keeps the caller's memory and threads out of the timing, and lets backends set
    process-wide options (ONNX Runtime's shared thread pool) without touching the caller's sessions.
    """
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_time, (groups, settings, threads, min_rounds, per_job_seconds))


def _child_time(groups: list[dict[str, Job]], settings: ProfileSettings, threads: int, min_rounds: int,
                per_job_seconds: bool) -> Timed:
    from edgekit import backends

    used = {a.backend: backends.get_installed(a.backend) for g in groups for a, _ in g.values()}
    for backend in used.values():
        backend.prepare_timing_process(threads)
    sessions = {k: used[a.backend].load(a, threads) for g in groups for k, (a, _) in g.items()}
    rounds = timed_rounds([{k: partial(sessions[k].run, feeds) for k, (_, feeds) in g.items()} for g in groups],
                          settings, min_rounds, per_job_seconds)
    where = where_local()
    return Timed({k: summarize(v, sessions[k].threads, where) for k, v in rounds.times.items()},
                 rounds.block_medians, rounds.rounds)


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
