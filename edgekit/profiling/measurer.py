"""The measurer protocol: where artifacts' latencies come from when they are measured, not estimated.

A Measurer times a set of artifacts together, interleaved by one rule (timing.timed_rounds; the
device runner keeps a copy of it), and returns one latency record per artifact, `where` saying where
they were measured. Two implementations:

- LocalMeasurer: this host, in a fresh process (timing.time_artifacts): build, the planner, compress.
- DeviceMeasurer: a device over SSH, the runner copied there with the package (device.profile_package,
  which also writes the profiles/ records and the package's manifest): `edgekit profile --device`,
  `build --device`, `plan --device`.

The cost model (costmodel.py) is what stands in where neither can measure (`where: "estimate"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekit.backends.base import Artifact
from edgekit.profiling.device import RemoteSettings, profile_package
from edgekit.profiling.devices import Device
from edgekit.profiling.timing import Latency, ProfileSettings, time_artifacts, where_local


class Measurer(Protocol):
    @property
    def where(self) -> str: ...

    def measure(self, artifacts: dict[str, Artifact], feeds: dict[str, np.ndarray],
                settings: ProfileSettings) -> dict[str, Latency]:
        """Each artifact's latency, all measured in one interleaved run."""
        ...


@dataclass
class LocalMeasurer:
    """This host: the artifacts loaded in a fresh process and timed there with `threads` threads."""

    threads: int

    @property
    def where(self) -> str:
        return where_local()

    def measure(self, artifacts: dict[str, Artifact], feeds: dict[str, np.ndarray],
                settings: ProfileSettings) -> dict[str, Latency]:
        return time_artifacts(artifacts, feeds, settings, self.threads)


@dataclass
class DeviceMeasurer:
    """A device over SSH, measuring artifacts of one package (keyed as in its manifest). The runner makes
    its own inputs there (seeded random, of the manifest's shapes), so `feeds` are not sent; `seconds` is
    per artifact, at least, as `edgekit profile --seconds` says. The device's whole records (conditions,
    TensorRT's trtexec summary) are kept in `records` after each measure()."""

    device: Device
    package: Path
    threads: int | None = None  # None: every core the device lets the runner use
    timeout: float | None = None  # None: estimated from the settings and the artifacts
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return self.device.where

    def measure(self, artifacts: dict[str, Artifact], feeds: dict[str, np.ndarray],
                settings: ProfileSettings) -> dict[str, Latency]:
        remote = RemoteSettings(seconds=settings.seconds, min_runs=settings.min_runs, max_runs=settings.max_runs,
                                warmup_runs=settings.warmup_runs, block=settings.block,
                                block_skip=settings.block_skip, threads=self.threads, timeout=self.timeout)
        self.records = profile_package(self.package, self.device, remote, list(artifacts))
        return {k: Latency(**{f.name: r[f.name] for f in fields(Latency)}) for k, r in self.records.items()}
