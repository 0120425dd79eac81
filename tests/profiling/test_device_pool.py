"""The device pool (`edgekit profile PKG... --devices A,B | --target-devices T`), against two real sshd "devices" on
127.0.0.1: measurements on one device never overlap (checked from the runner's own wall-clock timestamps), both
devices work at once, per-device figures and the spread land in the manifest; a device lost mid-run leaves the
pool, its job goes to the other, and the run's record says so; through a real two-node Ray cluster, each device
is the resource of one node and the same holds."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, read_manifest, require_tools, run_cli
from test_devices import SSHD, Sshd, _add

# One runtime thread per runner: the two loopback "devices" share this machine's 2 cores, and two runners spinning
# 2 threads each (ONNX Runtime, ncnn's OpenMP) on them slow each other down by orders of magnitude.
POOLP = ["--seconds", "0.1", "--min-runs", "10", "--warmup", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def two_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sshd, Sshd]]:
    require_tools(str(SSHD), "ssh-keygen", "ssh", install="apt-get install openssh-server openssh-client")
    a, b = Sshd(tmp_path_factory.mktemp("sshd-a")), Sshd(tmp_path_factory.mktemp("sshd-b"))
    yield a, b
    for s in (a, b):
        with contextlib.suppress(Exception):
            s.stop()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_package(tmp_path_factory.mktemp("poolpkg"))


def build_tiny_package(root: Path) -> Path:
    """ONNX Runtime and NCNN, fp32 and int8, of a small conv model, built by the CLI."""
    from test_backend_onnxruntime import _conv_model

    model = _conv_model(root / "tiny.onnx")
    calib = root / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32))
    out = root / "tiny"
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "onnxruntime,ncnn", "--precision", "fp32,int8",
                "--calib", calib, "--out", out, *FAST)
    assert r.code == 0, r.stderr
    return out


def _packages(built: Path, root: Path, n: int) -> list[Path]:
    return [Path(shutil.copytree(built, root / f"pkg{i}")) for i in range(n)]


def _home(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEKIT_HOME", str(root / "home"))
    monkeypatch.setenv("EDGEKIT_PROFILES", str(root / "profiles"))
    return root


def _no_overlap_per_device(jobs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    spans: dict[str, list[tuple[float, float]]] = {}
    for j in jobs:
        if j["started"] is not None:
            assert j["finished"] > j["started"]
            spans.setdefault(j["device"], []).append((j["started"], j["finished"]))
    for device, s in spans.items():
        s.sort()
        for (_, end), (start, _) in itertools.pairwise(s):
            assert start >= end, f"two measurements overlapped on {device}: {s}"
    return spans


def _overlap_across(spans: dict[str, list[tuple[float, float]]]) -> bool:
    sa, sb = list(spans.values())[:2]
    return any(x0 < y1 and y0 < x1 for x0, x1 in sa for y0, y1 in sb)


def test_a_pool_of_two_devices_measures_every_package_on_each_never_two_at_once(
        two_sshd: tuple[Sshd, Sshd], built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _home(tmp_path, monkeypatch)
    a, b = two_sshd
    _add(a, home, "dev-a")
    _add(b, home, "dev-b")
    pkgs = _packages(built, tmp_path, 3)
    r = run_cli("profile", *pkgs, "--target-devices", "host-cpu", *POOLP, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    run = doc["run"]
    assert run["mode"] == "each" and sorted(run["devices"]) == ["dev-a", "dev-b"]
    assert len(run["jobs"]) == 6 and all(j["error"] is None and len(j["measured"]) == 4 for j in run["jobs"])
    spans = _no_overlap_per_device(run["jobs"])
    assert sorted(spans) == ["dev-a", "dev-b"] and all(len(s) == 3 for s in spans.values())
    assert _overlap_across(spans), "the two devices never measured at the same time: the pool ran one job at a time"
    for p in pkgs:
        m = read_manifest(p)
        for art in m["artifacts"]:
            by_device = art["device_latencies_ms"]
            assert set(by_device) == {"dev-a", "dev-b"} and all(v["target"] == "host-cpu" for v in by_device.values())
            p50 = {d: v["p50"] for d, v in by_device.items()}
            sp = art["device_spread"]
            assert sp["devices"] == 2 and sp["slowest"] == max(p50, key=p50.get)
            assert sp["ratio"] == pytest.approx(max(p50.values()) / min(p50.values()), rel=1e-3) and sp["ratio"] >= 1
            assert art["latency_ms"]["p50"] == max(p50.values()), "the headline is the slowest board's figure"
            assert art["host_latency_ms"]["where"].startswith("local:")
        assert doc["spread"][str(p)][m["artifacts"][0]["key"]]["ratio"] >= 1
        for dev in ("dev-a", "dev-b"):
            assert len(list((tmp_path / "profiles" / dev).glob("*.json"))) == 4
    assert "p50 ms by device" not in r.stdout  # --json: one document
    table = run_cli("profile", pkgs[0], "--devices", "dev-a,dev-b", *POOLP)
    assert table.code == 0 and "spread" in table.stdout and "dev-a" in table.stdout and "x (2 boards)" in table.stdout


def test_an_unknown_device_or_target_is_one_line_and_exit_2(two_sshd: tuple[Sshd, Sshd], built: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _home(tmp_path, monkeypatch)
    _add(two_sshd[0], home, "dev-a")
    before = (built / "manifest.json").read_bytes()
    r = run_cli("profile", built, "--devices", "dev-a,nope", *POOLP)
    assert r.code == 2 and "nope" in r.error_line()
    r = run_cli("profile", built, "--target-devices", "rpi5", *POOLP)
    assert r.code == 2 and "no device of target rpi5" in r.error_line() and "dev-a (host-cpu)" in r.error_line()
    assert (built / "manifest.json").read_bytes() == before


def _kill_when_busy(sshd: Sshd, lock: Path, done: threading.Event) -> None:
    """Once the device's lock says a measurement holds it, kill its sshd and every session under it."""
    import psutil

    while not done.is_set():
        if lock.exists() and lock.read_text().startswith("pid"):
            time.sleep(0.5)  # into the measurement: the probe or the copy or the run
            kids = psutil.Process(sshd.proc.pid).children(recursive=True)
            sshd.proc.kill()
            for k in kids:
                with contextlib.suppress(psutil.Error):
                    k.kill()
            return
        time.sleep(0.05)


def test_a_device_lost_mid_run_leaves_the_pool_and_its_job_moves_to_the_other(
        built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tools(str(SSHD), "ssh-keygen", "ssh", install="apt-get install openssh-server openssh-client")
    home = _home(tmp_path, monkeypatch)
    (tmp_path / "sa").mkdir()
    (tmp_path / "sb").mkdir()
    a, b = Sshd(tmp_path / "sa"), Sshd(tmp_path / "sb")
    try:
        _add(a, home, "dev-a")
        _add(b, home, "dev-b")
        pkgs = _packages(built, tmp_path, 4)
        done = threading.Event()
        lock = home / "home" / "locks" / "device-dev-b.lock"
        watcher = threading.Thread(target=_kill_when_busy, args=(b, lock, done))
        watcher.start()
        r = run_cli("profile", *pkgs, "--devices", "dev-a,dev-b", "--once", *POOLP, "--json")
        done.set()
        watcher.join()
        assert r.code == 0, r.stderr
        run = json.loads(r.stdout)["run"]
        assert set(run["lost"]) == {"dev-b"} and "dev-b" in run["lost"]["dev-b"]
        assert len(run["jobs"]) == 4 and all(j["error"] is None for j in run["jobs"])  # each package once, all done
        moved = [j for j in run["jobs"] if j["attempts"]]
        assert moved and all(j["device"] == "dev-a" and j["attempts"][0]["device"] == "dev-b" for j in moved)
        assert run["retried"] and run["retried"][0]["device"] == "dev-b"
        _no_overlap_per_device(run["jobs"])
        for p in pkgs:
            assert read_manifest(p)["artifacts"][0]["device_latencies_ms"]  # every package measured somewhere
    finally:
        for s in (a, b):
            with contextlib.suppress(Exception):
                s.stop()
