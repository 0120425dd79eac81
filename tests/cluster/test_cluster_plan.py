"""Issue 16: `edgekit plan --cluster ADDRESS` on a real Ray cluster (a head and a worker process on loopback, started
by the fixture): each candidate a Ray task, the plan the same as the local one, and a worker lost mid-plan costs a
retry, not the plan. `--objective size` makes the choice a function of the artifacts alone (timing noise between
two runs could otherwise swap two candidates of near-equal latency)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, REPO
from ray_cluster import RayCluster, running_cluster

FAST_PLAN = ["--profile-seconds", "0.1", "--min-runs", "10"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    yield from running_cluster()


def _plan(defects_data: Path, out: Path, home: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgekit", "plan", str(BUNDLED_ONNX), "--target", "host-cpu", "--backend",
           "onnxruntime,openvino", "--calib", str(defects_data / "calib"), "--val", str(defects_data / "val"),
           "--preprocess", str(BUNDLED_PREPROCESS), "--objective", "size", "--out", str(out), "--json",
           *FAST_PLAN, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**env, "EDGEKIT_HOME": str(home)})


def _done(p: subprocess.Popen) -> dict:
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr[-3000:]
    return json.loads(stdout)


def _summary(result: dict) -> list[tuple]:
    return [(c["key"], c["verdict"], round(c["cosine"], 5), c["accuracy"]) for c in result["candidates"]]


@pytest.fixture(scope="module")
def local_plan(defects_data: Path, tmp_path_factory: pytest.TempPathFactory, ray_cluster) -> dict:
    tmp = tmp_path_factory.mktemp("local-plan")
    return _done(_plan(defects_data, tmp / "plan.yaml", tmp / "home", ray_cluster.env))


def test_a_plan_on_the_cluster_equals_the_local_plan(ray_cluster, local_plan: dict, defects_data: Path,
                                                     tmp_path: Path) -> None:
    import yaml

    result = _done(_plan(defects_data, tmp_path / "plan.yaml", tmp_path / "home", ray_cluster.env, "--cluster",
                         ray_cluster.address))
    assert result["chosen"] == local_plan["chosen"]
    assert _summary(result) == _summary(local_plan)
    run = yaml.safe_load((tmp_path / "plan.yaml").read_text())["run"]
    tasks = [t for r in run["rounds"] for t in r["tasks"]]
    assert sorted(t["key"] for t in tasks) == sorted(c["key"] for c in local_plan["candidates"])
    assert len({t["node"] for t in tasks}) == 2  # both nodes evaluated candidates
    assert run["cluster"] == ray_cluster.address and not any(r["retried"] for r in run["rounds"])
    assert "side by side on one measurer" in run["measured_by"]


def test_killing_a_worker_mid_plan_still_completes_the_plan_with_the_same_choice(
        ray_cluster, local_plan: dict, defects_data: Path, tmp_path: Path) -> None:
    import yaml

    doomed = ray_cluster.add_worker()
    ray_cluster.wait_for(3)
    p = _plan(defects_data, tmp_path / "plan.yaml", tmp_path / "home", ray_cluster.env, "--cluster",
              ray_cluster.address)
    node = psutil.Process(doomed.pid)
    killed_while = None
    deadline = time.monotonic() + 600
    while killed_while is None and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        procs = node.children(recursive=True)
        for proc in procs:
            try:
                if "ray::_evaluate" in " ".join(proc.cmdline()):
                    killed_while = proc.pid
            except psutil.Error:
                continue
        if killed_while is not None:  # the node's raylet, its workers, its object store: by their own pids
            for proc in [node, *procs]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
    assert killed_while is not None, "no candidate ran on the worker before the plan ended"
    result = _done(p)
    assert result["chosen"] == local_plan["chosen"] and _summary(result) == _summary(local_plan)
    run = yaml.safe_load((tmp_path / "plan.yaml").read_text())["run"]
    retried = [r for rnd in run["rounds"] for r in rnd["retried"]]
    assert retried and all(r["attempt"] == 1 for r in retried), run
    assert all(r["error"].split(":")[0] in ("NodeDiedError", "WorkerCrashedError", "ObjectLostError",
                                              "OwnerDiedError", "RaySystemError") for r in retried), retried
    # Every candidate in the record ran to the end, the retried ones on a node that survived.
    lost = {r["key"] for r in retried}
    assert lost <= {t["key"] for rnd in run["rounds"] for t in rnd["tasks"]}


def test_a_second_build_on_the_cluster_reuses_the_build_cache(ray_cluster, tmp_path: Path) -> None:
    """The cache is keyed by content, and on one machine (or with EDGEKIT_HOME on a path every node mounts) the
    nodes share it: the second build's exports come from it, whichever node evaluates them."""
    import numpy as np
    from test_backend_onnxruntime import _conv_model

    model = _conv_model(tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32))
    manifests = []
    for i in range(2):
        out = tmp_path / f"pkg{i}"
        cmd = [sys.executable, "-m", "edgekit", "build", str(model), "--target", "host-cpu", "--backend",
               "onnxruntime,openvino", "--precision", "fp32,int8", "--calib", str(tmp_path / "calib.npz"), "--out",
               str(out), "--cluster", ray_cluster.address, "--profile-seconds", "0.1", "--min-runs", "10",
               "--no-memory"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                           env={**ray_cluster.env, "EDGEKIT_HOME": str(tmp_path / "home")})
        assert r.returncode == 0, r.stderr[-3000:]
        manifests.append(json.loads((out / "manifest.json").read_text()))
    first, second = (m["cache"]["reused"] for m in manifests)
    exports = [k for k in second if k.startswith("export")]
    assert len(exports) == 4 and not any(k.startswith("export") for k in first), (first, second)
    assert [a["files"] for a in manifests[0]["artifacts"]] == [a["files"] for a in manifests[1]["artifacts"]]
