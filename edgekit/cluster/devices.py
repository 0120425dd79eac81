"""The device pool on a Ray cluster: each device is the resource `edgekit-device:NAME` (one unit) of the node that
reaches it, given at `ray start --resources "$(edgekit devices resources)"` on that node (`--cluster local`: this
machine's devices.yaml). A measurement is a Ray task asking for that one unit, so Ray runs it on that node and
never two at once; the pool's dispatcher (profiling/pool.py) queues the rest. The package travels through the
object store once per package; the node reads its own devices.yaml (its keys never leave it) and takes the
device's lock there too, against an `edgekit profile` started on that node by hand."""

from __future__ import annotations

import io
import platform
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from edgekit.cluster.connection import (
    DEVICE_RESOURCE,
    alive_resources,
    connect,
    device_resources,
    system_errors,
)
from edgekit.errors import BadInput, EdgekitError
from edgekit.profiling.device import DeviceMeasurement, RemoteSettings, measure_on_device
from edgekit.profiling.devices import Device, get_device, load_devices
from edgekit.profiling.pool import Job

DISCOVER_S = 60.0  # a node asked which target a device it offers is


class ClusterLost(EdgekitError):
    """The task's worker or node was lost; `device_lost` once no live node offers the device any more."""

    def __init__(self, message: str, device_lost: bool) -> None:
        super().__init__(message)
        self.device_lost = device_lost


def _pack(package: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(package.rglob("*")):
            if f.is_file() and not f.is_symlink():
                tar.add(f, arcname=str(f.relative_to(package)), recursive=False)
    return buf.getvalue()


def _unpack(data: bytes, dest: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for m in tar.getmembers():  # edgekit's own bytes, still checked
            if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise EdgekitError(f"a package sent to the cluster holds an unsafe path: {m.name}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, **safe)


def _node_device(name: str, fallback: Device | None) -> Device:
    try:
        return get_device(name)  # the node's own devices.yaml: the one whose keys reach the device
    except BadInput:
        if fallback is None:
            raise
        return fallback


def _measure(package_bytes: bytes, package_name: str, device: str, fallback: Device | None,
             settings: RemoteSettings, keys: list[str] | None) -> tuple[DeviceMeasurement, str]:
    """On the node that reaches the device: the package unpacked in a node-local folder, measured, removed."""
    import ray

    work = Path(tempfile.mkdtemp(prefix="edgekit-measure-"))
    try:
        package = work / package_name
        package.mkdir()
        _unpack(package_bytes, package)
        m = measure_on_device(package, _node_device(device, fallback), settings, keys)
        return m, f"{platform.node()} (node {ray.get_runtime_context().get_node_id()[:12]})"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _target_of(device: str) -> str:
    return get_device(device).target


class RaySlots:
    """DeviceSlots on a Ray cluster (profiling.pool)."""

    def __init__(self, address: str) -> None:
        local = load_devices()
        self.ray = connect(address, device_resources(list(local)) if address == "local" else None)
        self.where = f"cluster {address}"
        self.known = local
        self._remote = self.ray.remote(num_cpus=0, max_retries=0)(_measure)
        self._payloads: dict[Path, Any] = {}
        self._running: dict[Any, str] = {}

    def offered(self) -> dict[str, str]:
        """{device: target} of every device a live node offers (asked of its node where this machine's list
        does not name it)."""
        names = [r[len(DEVICE_RESOURCE):] for r in alive_resources(self.ray) if r.startswith(DEVICE_RESOURCE)]
        ask = self.ray.remote(num_cpus=0, max_retries=0)(_target_of)
        unknown = {n: ask.options(resources={DEVICE_RESOURCE + n: 1}).remote(n) for n in names if n not in self.known}
        targets = {n: self.known[n].target for n in names if n in self.known}
        for n, ref in unknown.items():
            try:
                targets[n] = self.ray.get(ref, timeout=DISCOVER_S)
            except Exception as e:
                self.ray.cancel(ref, force=True)
                targets[n] = f"unknown ({type(e).__name__})"
        return targets

    def targets(self, names: list[str]) -> dict[str, str]:
        offered = self.offered()
        missing = [n for n in names if n not in offered]
        if missing:
            raise BadInput(f"no node of the cluster offers device {missing[0]} (offered: "
                           f"{', '.join(offered) or 'none'}); start the node that reaches it with "
                           "`ray start --address HEAD --resources \"$(edgekit devices resources)\"`")
        return {n: offered[n] for n in names}

    def submit(self, job: Job, device: str, settings: RemoteSettings, keys: list[str] | None) -> Any:
        if job.package not in self._payloads:
            self._payloads[job.package] = self.ray.put(_pack(job.package))
        ref = self._remote.options(resources={DEVICE_RESOURCE + device: 1}).remote(
            self._payloads[job.package], job.package.name, device, self.known.get(device), settings, keys)
        self._running[ref] = device
        return ref

    def wait(self, timeout: float) -> list[tuple[Any, DeviceMeasurement | BaseException, str | None]]:
        if not self._running:
            return []
        ready, _ = self.ray.wait(list(self._running), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
        out: list[tuple[Any, DeviceMeasurement | BaseException, str | None]] = []
        system = system_errors(self.ray)
        for ref in ready:
            device = self._running.pop(ref)
            try:
                m, ran_on = self.ray.get(ref)
                out.append((ref, m, ran_on))
            except self.ray.exceptions.RayTaskError as e:
                out.append((ref, e.as_instanceof_cause(), None))  # edgekit's own error, its class kept
            except system as e:
                gone = DEVICE_RESOURCE + device not in alive_resources(self.ray)
                first = (str(e).splitlines() or [""])[0]
                out.append((ref, ClusterLost(f"the cluster lost the measurement ({type(e).__name__}: {first})",
                                             gone), None))
            except self.ray.exceptions.RayError as e:
                out.append((ref, EdgekitError(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"), None))
        return out

    def lost(self, devices: list[str]) -> dict[str, str]:
        offered = alive_resources(self.ray)
        gone = {d: "no live node of the cluster offers it any more (the node that reaches it left)"
                for d in devices if DEVICE_RESOURCE + d not in offered}
        for ref, device in list(self._running.items()):
            if device in gone:  # the task would wait for its node forever
                self.ray.cancel(ref, force=True)
                del self._running[ref]
        return gone

    def close(self) -> None:
        for ref in self._running:
            self.ray.cancel(ref, force=True)
        self._running.clear()
