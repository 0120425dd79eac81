"""Side-by-side timing (compare, check): two packages' artifacts timed here in one interleaved run, and
the paired ratio of two of them, round by round.

Latency ratios are only meaningful from one interleaved run on one machine; pairing goes further: the
ratio of two artifacts is taken per round, between blocks run milliseconds apart, so load that comes
and goes on a shared machine hits both sides of a pair rather than one (p50 ratios of identical
OpenVINO files ranged 0.8x-1.2x on 2 cores at load 7; ONNX Runtime's stayed within 1%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.profiling.timing import Job, Latency, ProfileSettings, time_jobs

PAIRED_ROUNDS = 10  # rounds at least: the paired ratio's bootstrap interval needs some (none under 5)


@dataclass
class SideBySide:
    """One interleaved run: each job's latency summary, and the median of each of its blocks per round
    (in the same order for every job, so blocks of two jobs in one round can be paired)."""

    latency: dict[str, Latency]
    rounds: dict[str, list[float]]


def time_side_by_side(groups: list[dict[str, Job]], settings: ProfileSettings, threads: int) -> SideBySide:
    """Every job, each with its own package's inputs, timed in one fresh process by build's loop
    (timing.time_jobs): each job `seconds` at least (compare's --seconds: "per artifact, at least"), in
    PAIRED_ROUNDS rounds at least. Jobs of one group (the two packages' builds of one artifact) run back
    to back in each round, in alternating order."""
    timed = time_jobs(groups, settings, threads, min_rounds=PAIRED_ROUNDS, per_job_seconds=True)
    return SideBySide(timed.latency, timed.block_medians)


def paired_ratio(rounds_a: list[float], rounds_b: list[float]) -> dict[str, Any]:
    """Median over rounds of B's block median / A's, with a 95% bootstrap interval of that median
    (seeded: the same times give the same interval); no interval from fewer than 5 rounds."""
    r = np.asarray(rounds_b) / np.asarray(rounds_a)
    out: dict[str, Any] = {"ratio": round(float(np.median(r)), 4), "rounds": len(r), "low": None, "high": None}
    if len(r) >= 5:
        idx = np.random.default_rng(0).integers(0, len(r), (2000, len(r)))
        lo, hi = np.percentile(np.median(r[idx], axis=1), [2.5, 97.5])
        out["low"], out["high"] = round(float(lo), 4), round(float(hi), 4)
    return out
