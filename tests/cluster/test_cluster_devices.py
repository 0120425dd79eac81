"""Issue 16, the device pool on a real Ray cluster: two sshd "devices" on loopback, dev-a the resource
`edgekit-device:dev-a` of the head node and dev-b of the worker node (as `ray start --resources "$(edgekit devices
resources)"` gives them). `edgekit profile P... --devices dev-a,dev-b --cluster ADDRESS` runs each measurement on the
node that offers its device: never two on one device (the runner's own timestamps), both nodes busy at once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, read_manifest, require_tools, run_cli
from ray_cluster import RayCluster, running_cluster
from test_device_pool import POOLP, _no_overlap_per_device, _overlap_across, _packages, build_tiny_package
from test_devices import SSHD, Sshd, _add


@pytest.fixture(scope="module")
def pool_cluster(built: Path) -> Iterator[tuple[RayCluster, Path]]:
    require_tools(str(SSHD), "ssh-keygen", "ssh", install="apt-get install openssh-server openssh-client")
    root = Path(tempfile.mkdtemp(prefix="ekd", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in ("EDGEKIT_HOME", "EDGEKIT_PROFILES")}
    os.environ["EDGEKIT_HOME"], os.environ["EDGEKIT_PROFILES"] = str(root / "home"), str(root / "profiles")
    servers = []
    try:
        for name in ("a", "b"):
            (root / f"sshd-{name}").mkdir()
            servers.append(Sshd(root / f"sshd-{name}"))
            _add(servers[-1], root, f"dev-{name}")
        r = run_cli("devices", "resources")
        assert r.code == 0 and json.loads(r.stdout) == {"edgekit-device:dev-a": 1, "edgekit-device:dev-b": 1}
        yield from ((c, root) for c in running_cluster({"edgekit-device:dev-a": 1}, {"edgekit-device:dev-b": 1}))
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_package(tmp_path_factory.mktemp("poolpkg"))


def test_a_device_pool_on_the_cluster_runs_each_device_on_its_own_node(pool_cluster: tuple[RayCluster, Path],
                                                                       built: Path) -> None:
    cluster, root = pool_cluster
    pkgs = _packages(built, root, 3)
    r = run_cli("profile", *pkgs, "--devices", "dev-a,dev-b", "--cluster", cluster.address, *POOLP, "--json")
    assert r.code == 0, r.stderr[-3000:]
    run = json.loads(r.stdout)["run"]
    assert run["where"] == f"cluster {cluster.address}"
    assert len(run["jobs"]) == 6 and all(j["error"] is None and len(j["measured"]) == 4 for j in run["jobs"])
    spans = _no_overlap_per_device(run["jobs"])
    assert _overlap_across(spans), "the two nodes never measured at the same time"
    nodes = {d: {j["ran_on"] for j in run["jobs"] if j["device"] == d} for d in ("dev-a", "dev-b")}
    assert all(len(n) == 1 for n in nodes.values()), nodes  # a device is always reached from its own node
    assert nodes["dev-a"] != nodes["dev-b"], "both devices were measured from one node"
    for p in pkgs:  # recorded by the driver, as a local pool does
        assert set(read_manifest(p)["artifacts"][0]["device_latencies_ms"]) == {"dev-a", "dev-b"}
    missing = run_cli("profile", pkgs[0], "--devices", "dev-a,dev-c", "--cluster", cluster.address, *POOLP)
    assert missing.code == 2 and "no node of the cluster offers device dev-c" in missing.error_line()


def test_losing_the_node_of_a_device_mid_run_moves_its_job_to_the_other(pool_cluster: tuple[RayCluster, Path],
                                                                         built: Path) -> None:
    """Kills the worker node (dev-b's) while it measures: dev-b leaves the pool, the package goes to dev-a. Last in
    the module: the cluster has one node afterwards."""
    import psutil

    cluster, root = pool_cluster
    pkgs = _packages(built, root / "lost", 4)
    p = subprocess.Popen([sys.executable, "-m", "edgekit", "profile", *map(str, pkgs), "--devices", "dev-a,dev-b",
                          "--once", "--cluster", cluster.address, *POOLP, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=os.environ.copy())
    node = psutil.Process(cluster.nodes[1].pid)
    killed = False
    deadline = time.monotonic() + 300
    while not killed and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        procs = node.children(recursive=True)
        with contextlib.suppress(psutil.Error):
            killed = any("ray::_measure" in " ".join(q.cmdline()) for q in procs)
        if killed:
            for q in [node, *procs]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    q.kill()
    stdout, stderr = p.communicate(timeout=600)
    assert killed, "no measurement ran on the worker node before the run ended"
    assert p.returncode == 0, stderr[-3000:]
    run = json.loads(stdout)["run"]
    assert set(run["lost"]) == {"dev-b"}, run["lost"]
    assert len(run["jobs"]) == 4
    assert all(j["error"] is None for j in run["jobs"]), run["jobs"]
    moved = [j for j in run["jobs"] if j["attempts"]]
    assert moved and all(j["device"] == "dev-a" and j["attempts"][-1]["device"] == "dev-b" for j in moved)
    _no_overlap_per_device(run["jobs"])
