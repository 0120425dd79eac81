"""A device pool: several packages measured on several devices, every device busy, never two measurements on one.

`edgekit profile PKG [PKG ...] --devices a,b | --target-devices T` hands a list of packages and devices to
`run_pool`. Two ways to spread them:
- each (the default): every package on every device, so each artifact gets per-device figures and the spread
  across the boards of one target (one SoC varies up to 2x between boards);
- once (`--once`): each package on whichever device is free first (throughput; a lost device's job moves on).

The dispatcher queues jobs per device and hands a device its next job only when its last one finished; the
slots carry them out: `LocalSlots` (threads here, each device reached from this machine) or
`edgekit.cluster.devices.RaySlots` (a Ray task on the node whose `edgekit-device:NAME` resource names the
device). Whatever runs it, measure_on_device holds the device's lock (device_lock.py), so a second edgekit on
the same machine waits. Each finished measurement is recorded here at once (profiles/ and the manifest): a run
stopped half-way keeps what it measured.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekit.console import note
from edgekit.errors import DeviceUnreachable, EdgekitError
from edgekit.profiling.device import (
    DeviceMeasurement,
    RemoteSettings,
    load_package,
    measure_on_device,
    record,
    select_artifacts,
)
from edgekit.profiling.devices import Device, StepTimedOut, get_device

WAIT_S = 2.0


@dataclass
class Job:
    """One package to measure; `device` set once it is queued on (or, --once, handed to) a device."""

    package: Path
    device: str | None = None
    tried: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every failed try: {device, error}


@dataclass
class JobOutcome:
    package: Path
    device: str | None
    measurement: DeviceMeasurement | None
    error: str | None
    attempts: list[dict[str, Any]]
    ran_on: str | None = None  # the machine (or cluster node) that reached the device

    @property
    def ok(self) -> bool:
        return self.measurement is not None and not self.measurement.errors


@dataclass
class PoolRun:
    """The run's record: every job's outcome, devices dropped from the pool and why, wall time."""

    mode: str
    devices: list[str]
    outcomes: list[JobOutcome] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    where: str = "here"

    @property
    def failed(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def to_dict(self) -> dict[str, Any]:
        jobs = []
        for o in self.outcomes:
            m = o.measurement
            jobs.append({"package": str(o.package), "device": o.device, "ran_on": o.ran_on, "error": o.error,
                         "started": m.started if m else None, "finished": m.finished if m else None,
                         "measured": sorted(m.latencies) if m else [], "errors": m.errors if m else {},
                         "attempts": o.attempts})
        busy = collections.Counter()
        for o in self.outcomes:
            if o.measurement and o.measurement.started and o.measurement.finished:
                busy[o.device] += o.measurement.finished - o.measurement.started
        return {"mode": self.mode, "where": self.where, "devices": self.devices, "seconds": round(self.seconds, 3),
                "jobs": jobs, "lost": self.lost, "retried": [dict(a, package=j["package"]) for j in jobs
                                                            for a in j["attempts"]],
                "busy_s": {d: round(s, 3) for d, s in busy.items()}}


class DeviceSlots(Protocol):
    """Carries out one measurement per device at a time: `submit` starts one, `wait` returns those finished."""

    where: str

    def targets(self, names: list[str]) -> dict[str, str]:
        """{device: target} for the named devices this pool can reach; BadInput for one it cannot."""
        ...

    def submit(self, job: Job, device: str, settings: RemoteSettings, keys: list[str] | None) -> Any: ...

    def wait(self, timeout: float) -> list[tuple[Any, DeviceMeasurement | BaseException, str | None]]:
        """(handle, the measurement or the error, the machine that ran it) of every job finished."""
        ...

    def lost(self, devices: list[str]) -> dict[str, str]:
        """Those of `devices` no longer reachable at all (their cluster node left), with the reason; a job
        running on one is given up (its handle never comes back from wait)."""
        ...

    def close(self) -> None: ...


def device_lost(e: BaseException) -> bool:
    """An error that says the device (not the package) is gone: it leaves the pool."""
    return isinstance(e, DeviceUnreachable | StepTimedOut) or getattr(e, "device_lost", False)


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, EdgekitError) else f"{type(e).__name__}: {e}"


class LocalSlots:
    """Each device reached from this machine, one thread per device (ssh and scp wait; they do not compute)."""

    where = "here"

    def __init__(self) -> None:
        self._pool: cf.ThreadPoolExecutor | None = None
        self._running: dict[cf.Future, Any] = {}

    def targets(self, names: list[str]) -> dict[str, str]:
        return {n: get_device(n).target for n in names}

    def submit(self, job: Job, device: str, settings: RemoteSettings, keys: list[str] | None) -> cf.Future:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=32, thread_name_prefix="edgekit-device")
        fut = self._pool.submit(measure_on_device, job.package, get_device(device), settings, keys)
        self._running[fut] = job
        return fut

    def wait(self, timeout: float) -> list[tuple[Any, DeviceMeasurement | BaseException, str | None]]:
        done, _ = cf.wait(list(self._running), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        out = []
        for fut in done:
            self._running.pop(fut)
            e = fut.exception()
            out.append((fut, e if e is not None else fut.result(), "here"))
        return out

    def lost(self, devices: list[str]) -> dict[str, str]:
        return {}

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._running:
                fut.cancel()
            self._pool.shutdown(wait=True)  # a running measurement ends by its own timeouts and cleans up


def run_pool(packages: list[Path], devices: list[str], slots: DeviceSlots, settings: RemoteSettings,
             keys: list[str] | None = None, once: bool = False,
             on_done: Callable[[JobOutcome], None] | None = None) -> PoolRun:
    """Measure `packages` on `devices` (each on every device, or with `once` each on one) and record every
    measurement as it arrives. Never raises for a failed job: its outcome says why."""
    start = time.monotonic()
    run = PoolRun("once" if once else "each", list(devices), where=slots.where)
    shared: collections.deque[Job] = collections.deque(Job(p) for p in packages)
    queues = {d: collections.deque(Job(p, d) for p in packages) for d in devices} if not once else {}
    busy: dict[str, tuple[Any, Job]] = {}
    by_handle: dict[Any, str] = {}

    def finish(job: Job, device: str | None, m: DeviceMeasurement | None, error: str | None,
               ran_on: str | None = None) -> None:
        outcome = JobOutcome(job.package, device, m, error, job.attempts, ran_on)
        run.outcomes.append(outcome)
        if on_done:
            on_done(outcome)

    def drop(device: str, why: str) -> None:
        if device in run.lost:
            return
        run.lost[device] = why
        note(f"device {device} left the pool: {why}")
        for job in queues.pop(device, ()):  # each: what was queued on it cannot be measured there
            finish(job, device, None, f"device {device} was lost before this job ran: {why}")

    def next_job(device: str) -> Job | None:
        if not once:
            q = queues.get(device)
            return q.popleft() if q else None
        for job in list(shared):
            if device not in job.tried:
                shared.remove(job)
                return job
        return None

    try:
        while True:
            for d in devices:
                if d in busy or d in run.lost:
                    continue
                job = next_job(d)
                if job is None:
                    continue
                job.device = d
                job.tried.append(d)
                handle = slots.submit(job, d, settings, keys)
                busy[d], by_handle[handle] = (handle, job), d
            if once:  # jobs no device left in the pool can take: failed with every try's reason
                for job in [j for j in shared if all(d in j.tried or d in run.lost for d in devices)]:
                    shared.remove(job)
                    finish(job, None, None, "no device of the pool could measure it: " + "; ".join(
                        f"{a['device']}: {a['error']}" for a in job.attempts) if job.attempts else
                        "every device of the pool was lost")
            if not busy:
                break
            for handle, res, ran_on in slots.wait(WAIT_S):
                d = by_handle.pop(handle)
                _, job = busy.pop(d)
                if isinstance(res, DeviceMeasurement):
                    finish(job, d, res, None, ran_on)
                    continue
                why = _reason(res)
                job.attempts.append({"device": d, "error": why})
                if device_lost(res):
                    drop(d, why)
                if once and any(x not in job.tried and x not in run.lost for x in devices):
                    note(f"{job.package.name} on {d} failed ({why}); it goes to another device")
                    shared.appendleft(job)
                else:
                    finish(job, d, None, why, ran_on)
            for d, why in slots.lost([d for d in devices if d not in run.lost]).items():
                if d in busy:  # the node that reached it left: its job cannot report
                    handle, job = busy.pop(d)
                    by_handle.pop(handle, None)
                    job.attempts.append({"device": d, "error": why})
                    if once and any(x not in job.tried and x not in run.lost and x != d for x in devices):
                        shared.appendleft(job)
                    else:
                        finish(job, d, None, why)
                drop(d, why)
    finally:
        slots.close()
        run.seconds = time.monotonic() - start
    return run


def recorder(settings: RemoteSettings, keys: list[str] | None) -> Callable[[JobOutcome], None]:
    """on_done for run_pool: the measurement's profiles/ records and manifest fields, written at once."""
    def record_outcome(o: JobOutcome) -> None:
        m = o.measurement
        if m is None or not m.latencies:
            return
        manifest = load_package(o.package)
        record(o.package, manifest, m.device, select_artifacts(manifest, m.keys), m.latencies, m.out, m.facts,
               settings)
        took = f" in {m.finished - m.started:.1f} s" if m.started and m.finished else ""
        note(f"{o.package.name}: measured on {m.device.name}{took}")
    return record_outcome


def pool_devices(devices: str | None, target: str | None, known: dict[str, Device] | None = None,
                 cluster_devices: dict[str, str] | None = None) -> list[str]:
    """--devices a,b,c or --target-devices T (every device of that target: in devices.yaml, or, on a cluster,
    every node's) as names, in order, without repeats."""
    from edgekit.errors import BadInput

    if devices:
        names = list(dict.fromkeys(n.strip() for n in devices.split(",") if n.strip()))
        if not names:
            raise BadInput("--devices names no device; e.g. --devices pi-a,pi-b")
        return names
    reachable = dict(cluster_devices or {})
    for name, dev in (known or {}).items():
        reachable.setdefault(name, dev.target)
    names = [n for n, t in reachable.items() if t == target]
    if not names:
        listed = ", ".join(f"{n} ({t})" for n, t in reachable.items()) or "none"
        raise BadInput(f"no device of target {target} (devices: {listed}); add one with "
                       f"`edgekit devices add NAME ssh://user@host --target {target}`")
    return names

