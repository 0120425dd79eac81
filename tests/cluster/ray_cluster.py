"""A real Ray cluster on loopback for the cluster tests (their fixtures wrap running_cluster): `ray start --head` on
127.0.0.1 plus worker processes that join it, each its own process group, stopped by their own pids (never
`ray stop`, which stops every Ray on the machine). Small object stores: the default reserves 30% of memory per
node."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports(*flags: str) -> list[str]:
    return [f"{flag}={_free_port()}" for flag in flags]


class RayCluster:
    """Head plus workers on 127.0.0.1; `address` for --cluster; `kill_worker(i)` loses one mid-run."""

    def __init__(self, root: Path, cpus: int = 1) -> None:
        self.root, self.cpus = root, cpus
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_AUTH_MODE"] = "disabled"  # loopback test cluster: no token to hand around
        self.env = env

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (kept open for the node's life)
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--object-store-memory=200000000",
                  "--disable-usage-stats", "--block",
                  *_ports("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                          "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")]
        p = subprocess.Popen([str(RAY), "start", *args, *common], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True)
        self.nodes.append(p)
        return p

    def start_head(self, resources: dict[str, int] | None = None) -> None:
        extra = [f"--resources={json.dumps(resources)}"] if resources else []
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--temp-dir={self.root / 'ray'}", *extra], "head")

    def add_worker(self, resources: dict[str, int] | None = None) -> subprocess.Popen:
        extra = [f"--resources={json.dumps(resources)}"] if resources else []
        return self._start([f"--address={self.address}", *extra], f"worker{len(self.nodes)}")

    def alive(self) -> int:
        code = (f"import ray, json; ray.init(address={self.address!r}, log_to_driver=False); "
                "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_for(self, nodes: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.alive() >= nodes:
                return
            time.sleep(1)
        logs = "\n".join((self.root / f).read_text()[-800:] for f in os.listdir(self.root) if f.endswith(".log"))
        raise RuntimeError(f"the Ray cluster did not reach {nodes} nodes:\n{logs}")

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        """The node's whole process group (its raylet, workers, object store), by its own pid."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def stop(self) -> None:
        """Each node's process group, then whatever it started that left the group (Ray's task workers make their
        own), all by the pids this fixture started or found under them."""
        import psutil

        descendants = []
        for p in self.nodes:
            with contextlib.suppress(psutil.Error):
                descendants += psutil.Process(p.pid).children(recursive=True)
        for p in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.nodes):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill(p)
        for d in descendants:
            with contextlib.suppress(psutil.Error):
                d.kill()


def running_cluster(head: dict[str, int] | None = None, worker: dict[str, int] | None = None
                    ) -> Iterator[RayCluster]:
    """Head (1 CPU) and one worker (1 CPU) joined to it, with these custom resources, stopped afterwards (a module
    fixture's body). The nodes take this process's environment (EDGEKIT_HOME: their devices.yaml) as it is now."""
    if not RAY.exists():
        if os.environ.get("EDGEKIT_REQUIRE_SYSTEM_DEPS"):
            pytest.fail("ray is not installed (pip install 'edgekit[ray]'; scripts/setup.sh installs it)")
        pytest.skip("ray is not installed (pip install 'edgekit[ray]')")
    root = Path(tempfile.mkdtemp(prefix="ekr", dir="/tmp"))  # short: Ray's socket paths are capped at 107 bytes
    cluster = RayCluster(root)
    try:
        cluster.start_head(head)
        cluster.add_worker(worker)
        cluster.wait_for(2)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
