"""Devices over SSH, against a real sshd on 127.0.0.1 with throwaway keys: the device list, `devices check`,
`edgekit profile` and `build --device` end to end, and failures that must say one clear thing and leave
nothing behind on either side (the "device" is this machine, so its /tmp is checked directly)."""

from __future__ import annotations

import ast
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, REPO, read_manifest, require_tools, run_cli

from edgekit.errors import BadInput
from edgekit.packaging.manifest import validate_manifest
from edgekit.profiling.devices import Device, missing_runtime, parse_url

SSHD = Path("/usr/sbin/sshd")
RUNNER = REPO / "edgekit" / "profiling" / "runner.py"


@pytest.fixture
def needs_sshd_tools() -> None:
    require_tools(str(SSHD), "ssh-keygen", "ssh", install="apt-get install openssh-server openssh-client")


needs_sshd = pytest.mark.usefixtures("needs_sshd_tools")
TMP = Path("/tmp")
FASTP = ["--seconds", "0.05", "--min-runs", "5", "--warmup", "2"]


# ---------------------------------------------------------------- no sshd needed


def test_runner_is_python36_syntax() -> None:
    src = RUNNER.read_text()
    tree = ast.parse(src, feature_version=(3, 6))
    allowed_late = {"numpy", "onnxruntime", "ncnn", "openvino", "importlib.util", "openvino.runtime", "rknnlite.api"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module != "__future__", "no `from __future__ import annotations` (3.7+)"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert name in sys.stdlib_module_names or name.split(".")[0] in sys.stdlib_module_names \
                    or name in allowed_late, f"runner imports {name}: standard library and device runtimes only"
        if isinstance(node, ast.keyword):
            assert node.arg not in ("capture_output", "text"), "subprocess capture_output=/text= are Python 3.7+"
        assert not isinstance(node, ast.AnnAssign), "no variable annotations in the runner"
        if isinstance(node, ast.FunctionDef):
            assert node.returns is None and all(a.annotation is None for a in node.args.args)
        if isinstance(node, ast.JoinedStr):  # f-strings are 3.6, the `=` specifier is 3.8
            assert "=}" not in ast.get_source_segment(src, node).replace(" ", "")
    assert "dataclass" not in src and "breakpoint(" not in src


def test_runner_probe_runs_on_python36_when_available() -> None:
    py36 = Path.home() / ".pyenv" / "versions" / "3.6.15" / "bin" / "python"
    if not py36.exists():
        pytest.skip("no Python 3.6 interpreter here (pyenv 3.6.15); the syntax test above still holds")
    r = subprocess.run([str(py36), "-", "--probe"], input=RUNNER.read_bytes(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    facts = json.loads(r.stdout)
    assert facts["python"].startswith("3.6") and facts["cpu"]["cores"] >= 1


def test_urls_and_messages() -> None:
    assert parse_url("ssh://pi@pi5.local") == ("pi", "pi5.local", 22)
    assert parse_url("ssh://root@[::1]:2222") == ("root", "::1", 2222)
    for bad in ("pi@pi5", "http://pi@pi5", "ssh://pi5", "ssh://pi:secret@pi5", "ssh://pi@pi5/x", "ssh://-oProxy@x"):
        with pytest.raises(BadInput):
            parse_url(bad)
    dev = Device("pi5", "pi", "pi5.local", 22, "rpi5")
    assert dev.where == "ssh://pi@pi5.local:22"
    facts = {"python": "3.11.2", "runtimes": {"numpy": {"version": "1.26"}, "onnxruntime": {"version": None}}}
    assert missing_runtime(dev, facts, "onnxruntime") == \
        "device pi5 has no onnxruntime for Python 3.11: pip install onnxruntime"
    assert "trtexec" in missing_runtime(dev, facts, "tensorrt")


def test_host_and_runner_ask_the_same_runtimes() -> None:
    """TensorRT artifacts need trtexec, not numpy, on both sides; the others need their module and numpy."""
    from edgekit.profiling.runner import BACKEND_NEEDS

    dev = Device("orin", "nvidia", "orin.local", 22, "jetson-orin-nano")
    bare = {"python": "3.6.9", "trtexec": "/usr/src/tensorrt/bin/trtexec", "runtimes": {}}  # JetPack: no numpy
    assert missing_runtime(dev, bare, "tensorrt") is None and BACKEND_NEEDS["tensorrt"] == ()
    for backend, modules in BACKEND_NEEDS.items():
        if not modules:
            continue
        assert "numpy" in modules
        only_numpy = {**bare, "runtimes": {"numpy": {"version": "1.19"}}}
        assert f"has no {modules[0]} " in missing_runtime(dev, only_numpy, backend)
        no_numpy = {**bare, "runtimes": {modules[0]: {"version": "1"}}}
        assert "has no numpy " in missing_runtime(dev, no_numpy, backend)


# ---------------------------------------------------------------- a real sshd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgekit-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


class Sshd:
    def __init__(self, root: Path, sftp: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.root, self.port, self.user = root, _free_port(), getpass.getuser()
        host_pub = _keygen(root / "host_ed25519")
        (root / "authorized_keys").write_text(_keygen(root / "user_ed25519") + "\n")
        self.key = root / "user_ed25519"
        kt, kb = host_pub.split()[:2]
        self.known_hosts_line = f"[127.0.0.1]:{self.port} {kt} {kb}\n"
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_ed25519'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", f"PidFile {root / 'sshd.pid'}",
            "UsePAM no", "StrictModes no", "PermitRootLogin yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            *(["Subsystem sftp internal-sftp"] if sftp else []), *extra, "LogLevel ERROR", "",
        ]))
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation folder
        with open(root / "sshd.log", "w") as log:  # -D: stays in the foreground, stopped by stop()
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stderr=log)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("sshd did not listen within 20 s")

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def known_hosts(self, path: Path, line: str | None = None) -> Path:
        path.write_text(self.known_hosts_line if line is None else line)
        return path

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    require_tools(str(SSHD), "ssh-keygen", "ssh", install="apt-get install openssh-server openssh-client")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $EDGEKIT_HOME and profiles root for each test; the user's real ones are never touched."""
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGEKIT_PROFILES", str(tmp_path / "profiles"))
    return tmp_path


def _add(sshd: Sshd, home: Path, name: str = "dev", *extra: str, python: str = sys.executable,
         known_hosts: Path | None = None, url: str | None = None, target: str = "host-cpu") -> None:
    kh = known_hosts or sshd.known_hosts(home / f"known_hosts-{name}")
    r = run_cli("devices", "add", name, url or sshd.url, "--target", target, "--identity", sshd.key,
                "--known-hosts", kh, "--python", python, *extra)
    assert r.code == 0, r.stderr


def _leftovers() -> set[str]:
    """The runner's folders on the 'device' (this machine's /tmp)."""
    return {p.name for p in TMP.glob("edgekit-*") if p.is_dir() and len(p.name) == len("edgekit-XXXXXX")}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small package with ONNX Runtime and NCNN artifacts (fp32 and int8), built by the CLI."""
    from test_backend_onnxruntime import _conv_model

    root = tmp_path_factory.mktemp("pkg")
    model = _conv_model(root / "tiny.onnx")
    calib = root / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((48, 3, 16, 16)).astype(np.float32))
    out = root / "tiny"
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "onnxruntime,ncnn", "--precision", "fp32,int8",
                "--calib", calib, "--out", out, *FAST)
    assert r.code == 0, r.stderr
    return out


@pytest.fixture()
def pkg(package: Path, tmp_path: Path) -> Path:
    """A copy each test may change."""
    return Path(shutil.copytree(package, tmp_path / "pkg"))


@needs_sshd
def test_devices_add_list_check_remove(sshd: Sshd, home: Path) -> None:
    _add(sshd, home)
    assert (home / "home" / "devices.yaml").exists()
    r = run_cli("devices", "list")
    assert r.code == 0 and "dev" in r.stdout and f"127.0.0.1:{sshd.port}" in r.stdout and "host-cpu" in r.stdout
    dup = run_cli("devices", "add", "dev", sshd.url, "--target", "host-cpu")
    assert dup.code == 2 and "exists" in dup.error_line()
    r = run_cli("devices", "check", "dev")
    assert r.code == 0, r.stderr
    import onnxruntime

    for word in ("reachable", "yes", sys.version.split()[0], "onnxruntime", onnxruntime.__version__, "ncnn", "cores",
                 "governor", "runs onnxruntime", "copy (scp)"):
        assert word in r.stdout, word
    if _scp_speaks_sftp():
        assert "yes (SFTP)" in r.stdout  # the copy check: a real file, by the protocol it used
    r = run_cli("devices", "remove", "dev")
    assert r.code == 0
    assert "no devices" in run_cli("devices", "list").stdout
    assert run_cli("devices", "check", "dev").code == 2


@needs_sshd
def test_profile_onnxruntime_and_ncnn_end_to_end(sshd: Sshd, home: Path, pkg: Path) -> None:
    _add(sshd, home)
    before_manifest, before_tmp = read_manifest(pkg), _leftovers()
    r = run_cli("profile", pkg, "--device", "dev", *FASTP)
    assert r.code == 0, r.stderr
    m = read_manifest(pkg)
    validate_manifest(m)
    where = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    sha12 = m["source"]["sha256"][:12]
    assert {a["key"] for a in m["artifacts"]} == {"onnxruntime-fp32", "onnxruntime-int8", "ncnn-fp32", "ncnn-int8"}
    for a, old in zip(m["artifacts"], before_manifest["artifacts"]):
        d = a["device_latency_ms"]
        assert d["where"] == where and d["p50"] > 0 and d["runs"] >= 5 and d["threads"] >= 1
        assert d["p50"] <= d["p90"] <= d["p99"] and d["min"] <= d["p50"]
        assert set(d["conditions"]) >= {"power_mode", "clocks_locked", "cpu_governor", "temperature_c"}
        assert a["latency_ms"] == d  # the device's measurement is the artifact's latency now
        assert a["host_latency_ms"] == old["latency_ms"]  # and the host's is kept beside it
        rec = json.loads((home / "profiles" / "dev" / f"host-cpu-{sha12}-{a['backend']}-{a['precision']}.json")
                         .read_text())
        assert rec["device"] == "dev" and rec["target"] == "host-cpu" and rec["model_sha256"] == m["source"]["sha256"]
        assert (rec["backend"], rec["precision"]) == (a["backend"], a["precision"])
        assert rec["latency_ms"] == d and rec["where"] == where and rec["runtime"]["python"]
    assert "Measured on the device" in (pkg / "report.md").read_text()
    assert "ncnn-int8" in r.stdout and "p50 ms" in r.stdout
    assert _leftovers() <= before_tmp
    # only some artifacts: the others keep what they had
    r = run_cli("profile", pkg, "--device", "dev", "--artifact", "ncnn-fp32", *FASTP)
    assert r.code == 0, r.stderr
    bad = run_cli("profile", pkg, "--device", "dev", "--artifact", "openvino-fp32")
    assert bad.code == 2 and "no artifact openvino-fp32" in bad.error_line()


@needs_sshd
def test_local_and_device_measurers_answer_alike(sshd: Sshd, home: Path, pkg: Path) -> None:
    """The Measurer protocol: this host and the device over SSH measure the same artifacts with the same
    settings, interleaved (the same runs for every artifact), each saying where it measured."""
    from edgekit.backends.base import Artifact
    from edgekit.profiling.devices import get_device
    from edgekit.profiling.measurer import DeviceMeasurer, LocalMeasurer, Measurer
    from edgekit.profiling.timing import ProfileSettings

    _add(sshd, home)
    m = read_manifest(pkg)
    arts = {}
    for a in m["artifacts"]:
        folder = Path(a["entry"]).parent
        arts[a["key"]] = Artifact(a["backend"], a["precision"], str(pkg / folder),
                                  [str(Path(f["path"]).relative_to(folder)) for f in a["files"]],
                                  str(Path(a["entry"]).relative_to(folder)), dict(a.get("details") or {}))
    feeds = {t["name"]: np.random.default_rng(0).standard_normal([max(int(d), 1) for d in t["shape"]])
             .astype(np.float32) for t in m["inputs"]}
    settings = ProfileSettings(warmup_runs=2, min_runs=8, seconds=0.05)
    measurers: list[Measurer] = [LocalMeasurer(threads=1), DeviceMeasurer(get_device("dev"), pkg, threads=1)]
    for measurer in measurers:
        lat = measurer.measure(arts, feeds, settings)
        assert set(lat) == set(arts), measurer
        assert len({v.runs for v in lat.values()}) == 1, lat  # interleaved: every artifact the same runs
        for v in lat.values():
            assert v.where == measurer.where and v.runs >= 8 and v.threads == 1 and 0 < v.min <= v.p50 <= v.p99
    assert measurers[1].where == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    assert read_manifest(pkg)["artifacts"][0]["device_latency_ms"]["where"] == measurers[1].where


@needs_sshd
def test_build_with_device_records_device_latency(sshd: Sshd, home: Path, tmp_path: Path) -> None:
    from test_backend_onnxruntime import _conv_model

    _add(sshd, home)
    out, calib = tmp_path / "built", tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32))
    r = run_cli("build", _conv_model(tmp_path / "m.onnx"), "--target", "host-cpu", "--backend", "onnxruntime",
                "--precision", "fp32", "--calib", calib, "--out", out, "--device", "dev", *FAST)
    assert r.code == 0, r.stderr
    (a,) = read_manifest(out)["artifacts"]
    assert a["device_latency_ms"]["where"].startswith("ssh://") and a["device_latency_ms"]["p50"] > 0
    assert a["latency_ms"] == a["device_latency_ms"]  # measured there instead of here
    assert a["host_latency_ms"]["where"].startswith("local:")
    assert "measured on dev" in r.stdout
    typo = run_cli("build", tmp_path / "m.onnx", "--target", "host-cpu", "--out", tmp_path / "x", "--device", "nope")
    assert typo.code == 2 and "unknown device 'nope'" in typo.error_line() and not (tmp_path / "x").exists()


def _unchanged(pkg: Path, before: dict, home: Path, tmp_before: set[str]) -> None:
    assert read_manifest(pkg) == before
    assert not list((home / "profiles").rglob("*.json"))
    assert _leftovers() <= tmp_before, f"left on the device: {_leftovers() - tmp_before}"
    assert not list(pkg.parent.glob(".*"))  # no local staging beside the package


@needs_sshd
def test_refused_connection(sshd: Sshd, home: Path, pkg: Path) -> None:
    closed = _free_port()
    _add(sshd, home, url=f"ssh://{sshd.user}@127.0.0.1:{closed}")
    before, tmp_before = read_manifest(pkg), _leftovers()
    for args in (("devices", "check", "dev"), ("profile", pkg, "--device", "dev", *FASTP)):
        r = run_cli(*args)
        assert r.code == 2 and "connection refused" in r.error_line(), r.stderr
    _unchanged(pkg, before, home, tmp_before)


@needs_sshd
def test_host_keys_strict_changed_and_accept_new(sshd: Sshd, home: Path, pkg: Path, tmp_path: Path) -> None:
    other = _keygen(tmp_path / "other_host").split()
    changed = sshd.known_hosts(tmp_path / "kh-changed", f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    _add(sshd, home, "changed", known_hosts=changed)
    before, tmp_before = read_manifest(pkg), _leftovers()
    r = run_cli("profile", pkg, "--device", "changed", *FASTP)
    assert r.code == 2 and "host key does not match" in r.error_line(), r.stderr
    assert run_cli("devices", "check", "changed").code == 2
    _unchanged(pkg, before, home, tmp_before)

    unknown = sshd.known_hosts(tmp_path / "kh-empty", "")
    _add(sshd, home, "strict", known_hosts=unknown)
    r = run_cli("devices", "check", "strict")
    assert r.code == 2 and "not in" in r.error_line() and "--accept-new" in r.error_line()
    assert unknown.read_text() == ""  # strict: nothing trusted

    _add(sshd, home, "tofu", "--accept-new", known_hosts=unknown)
    assert run_cli("devices", "check", "tofu").code == 0
    assert sshd.known_hosts_line.split()[2] in unknown.read_text()  # trusted on first use, as ssh does
    assert run_cli("devices", "check", "strict").code == 0  # and now known to the strict device too


@needs_sshd
def test_missing_runtime_names_what_to_install(sshd: Sshd, home: Path, pkg: Path, tmp_path: Path) -> None:
    # A device Python without onnxruntime (nor numpy): a bare venv, like a fresh board's system python3.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    probe = subprocess.run([str(bare / "bin" / "python"), "-c", "import onnxruntime"], capture_output=True)
    assert probe.returncode != 0, "the bare venv must lack onnxruntime"
    _add(sshd, home, python=str(bare / "bin" / "python"))
    before, tmp_before = read_manifest(pkg), _leftovers()
    r = run_cli("profile", pkg, "--device", "dev", "--artifact", "onnxruntime-fp32", *FASTP)
    short = ".".join(sys.version.split(".")[:2])
    assert r.code == 2
    want = f"device dev has no onnxruntime for Python {short}: pip install onnxruntime"
    assert r.error_line() == f"edgekit: error: {want}"
    r = run_cli("profile", pkg, "--device", "dev", "--artifact", "ncnn-int8", *FASTP)
    assert r.code == 2 and "has no ncnn" in r.error_line() and "pip install ncnn" in r.error_line()
    _unchanged(pkg, before, home, tmp_before)

    _add(sshd, home, "nopy", python="/nonexistent/python3")
    r = run_cli("profile", pkg, "--device", "nopy", *FASTP)
    assert r.code == 2 and "has no Python at '/nonexistent/python3'" in r.error_line()
    check = run_cli("devices", "check", "nopy")
    assert check.code == 0 and "not found" in check.stdout  # reachable, python missing: said in the table
    _unchanged(pkg, before, home, tmp_before)


@needs_sshd
def test_timeout_stops_the_runner_and_removes_its_folder(sshd: Sshd, home: Path, pkg: Path) -> None:
    _add(sshd, home)
    before, tmp_before = read_manifest(pkg), _leftovers()
    t0 = time.time()
    r = run_cli("profile", pkg, "--device", "dev", "--seconds", "60", "--max-runs", "100000000", "--timeout", "3")
    assert r.code == 3 and "timed out after 3 s" in r.error_line(), r.stderr
    assert time.time() - t0 < 30
    _unchanged(pkg, before, home, tmp_before)
    time.sleep(0.5)
    assert not _runners_under(sshd.proc.pid)  # (pid, command) of runners still alive


def _runners_under(root_pid: int) -> list[tuple[int, str]]:
    """Runner processes started through this test's sshd (other sshds may run other tests' runners)."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [ln.split(None, 2) for ln in ps.splitlines() if ln.strip()]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    mine, todo = set(), [root_pid]
    while todo:
        p = todo.pop()
        mine.add(p)
        todo += children.get(p, [])
    return [(int(r[0]), r[2]) for r in rows if len(r) == 3 and int(r[0]) in mine and "edgekit-runner.py" in r[2]
            and "ssh" not in r[2].split()[0] and not r[2].startswith(("sh ", "bash ", "/bin/sh"))]


@needs_sshd
def test_runner_killed_mid_run(sshd: Sshd, home: Path, pkg: Path) -> None:
    """The OOM killer (or `pkill -9`) takes the runner: one line saying so, the folder still removed."""
    _add(sshd, home)
    before, tmp_before = read_manifest(pkg), _leftovers()
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "profile", str(pkg), "--device", "dev",
                             "--seconds", "60", "--max-runs", "100000000", "--artifact", "onnxruntime-fp32"],
                            cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runner = None
    deadline = time.time() + 60
    while runner is None and time.time() < deadline:  # the runner this test's sshd started
        runner = next(iter(_runners_under(sshd.proc.pid)), None)
        time.sleep(0.1)
    assert runner is not None, "the runner never started"
    time.sleep(1.0)  # let it load the model and start timing
    os.kill(runner[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("edgekit: error")]
    assert proc.returncode == 3 and len(lines) == 1 and "killed by SIGKILL" in lines[0], stderr
    _unchanged(pkg, before, home, tmp_before)


# ---------------------------------------------------------------- TensorRT over SSH (FAKE trtexec)


@pytest.fixture(scope="module")
def trt_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TensorRT package for a Jetson Orin Nano (FP16 and INT8), built by the CLI; no engine in it (no GPU
    here), so the device has to build one."""
    from test_backend_onnxruntime import _conv_model

    root = tmp_path_factory.mktemp("trtpkg")
    calib = root / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32))
    out = root / "tiny-orin"
    r = run_cli("build", _conv_model(root / "tiny.onnx"), "--target", "jetson-orin-nano", "--precision", "fp16,int8",
                "--calib", calib, "--out", out, *FAST)
    assert r.code == 0, r.stderr
    assert not list(out.rglob("*.engine"))
    return out


@needs_sshd
def test_profile_tensorrt_over_ssh_builds_once_then_reuses_the_cached_engine(
        sshd: Sshd, home: Path, trt_package: Path, tmp_path: Path) -> None:
    """The real sshd, the real runner on a numpy-less Python (3.6 where pyenv has it, as JetPack 4.6), the
    package's real build_engine.sh and build_engine.py; only NVIDIA's trtexec and nvidia-smi are FAKE
    scripts (tests/backends/test_tensorrt.py) on the device's PATH."""
    from test_tensorrt import DEVICE_PYTHON, trtexec_calls, write_fake_nvidia_tools

    pkg = Path(shutil.copytree(trt_package, tmp_path / "pkg"))
    log, cache = tmp_path / "trtexec.log", tmp_path / "device-cache"
    fake = write_fake_nvidia_tools(tmp_path / "fakebin", log)
    # The device's python3: its PATH has trtexec (as JetPack's /usr/src/tensorrt/bin) and its home's cache
    # is this test's folder. No numpy there: TensorRT artifacts must not need it.
    device_python = tmp_path / "device-python3"
    device_python.write_text(f'#!/bin/sh\nPATH="{fake}:$PATH" XDG_CACHE_HOME="{cache}" exec {DEVICE_PYTHON} "$@"\n')
    device_python.chmod(0o755)
    assert subprocess.run([str(device_python), "-c", "import numpy"], capture_output=True).returncode != 0
    _add(sshd, home, python=str(device_python), target="jetson-orin-nano")
    tmp_before, where = _leftovers(), f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    device_version = subprocess.run([DEVICE_PYTHON, "-c", "import platform; print(platform.python_version())"],
                                    capture_output=True, text=True).stdout.strip()
    host = {a["key"]: a["latency_ms"] for a in read_manifest(pkg)["artifacts"]}

    r = run_cli("profile", pkg, "--device", "dev", *FASTP)
    assert r.code == 0, r.stderr
    assert "2 TensorRT engine build(s)" in r.stderr  # the longer default timeout: nothing cached yet
    assert trtexec_calls(log, "--saveEngine") == 2 and trtexec_calls(log, "--loadEngine") == 2
    m = read_manifest(pkg)
    validate_manifest(m)
    sha12 = m["source"]["sha256"][:12]
    for a in m["artifacts"]:
        d = a["device_latency_ms"]
        assert d["where"] == where and a["latency_ms"] == d and a["host_latency_ms"] == host[a["key"]]
        assert host[a["key"]]["where"] == "estimate"
        # trtexec's GPU Compute Time (median 0.84, p99 0.95 in the fake's summary), not the runner's wall time
        assert (d["p50"], d["p90"], d["p99"], d["mean"], d["min"]) == (0.84, 0.86, 0.95, 0.85, 0.8)
        assert d["runs"] == 20 and d["trtexec"]["throughput_qps"] == pytest.approx(1052.31)
        rec = json.loads((home / "profiles" / "dev" / f"jetson-orin-nano-{sha12}-tensorrt-{a['precision']}.json")
                         .read_text())
        assert rec["latency_ms"] == d and rec["engine"]["source"] == "built"
        assert rec["runtime"]["tensorrt"] == "10.3.0" and "numpy" not in rec["runtime"]
        assert rec["runtime"]["python"] == device_version
    # ~/.cache/edgekit/engines/<model.onnx sha256>-<precision>/, kept after the temporary folder is gone
    entries = {e.name.split("-")[1]: e for e in cache.joinpath("edgekit", "engines").iterdir()}
    assert sorted(entries) == ["fp16", "int8"]
    for precision, entry in entries.items():
        onnx_sha = next(f["sha256"] for a in m["artifacts"] if a["precision"] == precision for f in a["files"]
                        if f["path"] == a["entry"])
        assert entry.name == f"{onnx_sha}-{precision}"
        assert json.loads((entry / "model.engine.json").read_text())["onnx_sha256"] == onnx_sha
    assert _leftovers() <= tmp_before, f"left on the device: {_leftovers() - tmp_before}"
    assert not list(pkg.rglob("*.engine"))  # engines stay on the device

    r = run_cli("profile", pkg, "--device", "dev", *FASTP)  # the next measurement: a fresh temporary folder
    assert r.code == 0, r.stderr
    assert "engine build" not in r.stderr  # cached: the short timeout again
    assert trtexec_calls(log, "--saveEngine") == 2 and trtexec_calls(log, "--loadEngine") == 4
    for a in read_manifest(pkg)["artifacts"]:
        rec = json.loads((home / "profiles" / "dev" / f"jetson-orin-nano-{sha12}-tensorrt-{a['precision']}.json")
                         .read_text())
        assert rec["engine"]["source"] == "cache" and a["device_latency_ms"]["p50"] == 0.84
    assert _leftovers() <= tmp_before, f"left on the device: {_leftovers() - tmp_before}"
    time.sleep(0.5)
    assert not _runners_under(sshd.proc.pid)


@needs_sshd
def test_runtime_older_than_the_package_is_refused(sshd: Sshd, home: Path, pkg: Path) -> None:
    """The toolchain lock on the device: a package verified with a newer onnxruntime than the device has
    is refused there with what to install, and nothing is left behind."""
    manifest = read_manifest(pkg)
    manifest["toolchain"]["onnxruntime"] = "99.1.0"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    _add(sshd, home)
    before, tmp_before = read_manifest(pkg), _leftovers()
    r = run_cli("profile", pkg, "--device", "dev", "--artifact", "onnxruntime-fp32", *FASTP)
    assert r.code != 0
    line = r.error_line()
    assert "older than 99.1.0" in line and "pip install 'onnxruntime>=99.1.0'" in line
    _unchanged(pkg, before, home, tmp_before)


@needs_sshd
def test_plan_measures_its_candidates_on_the_device(sshd: Sshd, home: Path, tmp_path: Path) -> None:
    """`edgekit plan --device`: every candidate is timed on the device, and the device's numbers decide."""
    import yaml
    from test_backend_onnxruntime import _conv_model

    model = _conv_model(tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((48, 3, 16, 16)).astype(np.float32))
    _add(sshd, home)
    r = run_cli("plan", model, "--target", "host-cpu", "--backend", "onnxruntime,ncnn", "--precision", "fp32,int8",
                "--calib", calib, "--device", "dev", "--out", tmp_path / "plan.yaml", "--profile-seconds", "0.05",
                "--min-runs", "5")
    assert r.code == 0, r.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    where = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    assert len(plan["candidates"]) == 4
    assert all(c["where"] == where and c["measured_ms"] for c in plan["candidates"])
    (chosen,) = [c for c in plan["candidates"] if c["chosen"]]
    assert chosen["measured_ms"] == min(c["measured_ms"] for c in plan["candidates"] if c["verdict"] == "ok")
    assert (home / "profiles" / "dev").is_dir()  # the device's measurements are recorded for the cost model
    r = run_cli("plan", model, "--target", "rpi4", "--calib", calib, "--device", "dev", "--out", tmp_path / "x.yaml")
    assert r.code == 2 and "is a host-cpu, not a rpi4" in r.error_line()


# ---------------------------------------------------------------- stopped runners, sshd without SFTP


def _scp_speaks_sftp() -> bool:
    from edgekit.profiling.devices import scp_speaks_sftp

    return scp_speaks_sftp()


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("edgekit: error")]


def _alive(pid: int) -> bool:
    """Running (a zombie, reaped any moment, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.fixture()
def decoys() -> Iterator[tuple[Path, int]]:
    """What edgekit did not create and must never touch: a folder named like its own in /tmp, whose .pid
    names a process of this test's whose command line has edgekit-runner.py in it. Both must survive."""
    import secrets

    while True:
        folder = TMP / f"edgekit-{secrets.token_hex(3)}"
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    (folder / "keep.txt").write_text("not edgekit's\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "edgekit-runner.py"])
    (folder / ".pid").write_text(f"{proc.pid}\n")
    try:
        yield folder, proc.pid
        assert proc.poll() is None, "edgekit killed a process it did not start"
        assert (folder / "keep.txt").read_text() == "not edgekit's\n", "edgekit removed a folder it did not create"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@needs_sshd
@pytest.mark.parametrize("ignores_term", [False, True], ids=["stopped", "stopped-and-ignoring-SIGTERM"])
def test_stopped_runner_is_killed_and_its_folder_removed(sshd: Sshd, home: Path, pkg: Path, tmp_path: Path,
                                                         decoys: tuple[Path, int], ignores_term: bool) -> None:
    """A runner stopped (SIGSTOP) during the measurement, and one that also ignores SIGTERM: the step times
    out, cleanup sends TERM (and CONT), then KILL after the grace period, and removes only its folder."""
    python = sys.executable
    if ignores_term:  # an ignored signal stays ignored across exec: the runner's Python ignores TERM
        stubborn = tmp_path / "device-python3"
        stubborn.write_text(f"#!/bin/sh\ntrap '' TERM\nexec {sys.executable} \"$@\"\n")
        stubborn.chmod(0o755)
        python = str(stubborn)
    _add(sshd, home, python=python)
    before, tmp_before = read_manifest(pkg), _leftovers()
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "profile", str(pkg), "--device", "dev",
                             "--seconds", "60", "--max-runs", "100000000", "--artifact", "onnxruntime-fp32",
                             "--timeout", "8"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pid = None
    try:
        deadline = time.time() + 60
        while pid is None and time.time() < deadline:
            pid = next((p for p, _ in _runners_under(sshd.proc.pid)), None)
            time.sleep(0.05)
        assert pid is not None, "the runner never started"
        folder = Path(os.readlink(f"/proc/{pid}/cwd"))  # the wrapper starts it in edgekit's folder
        assert folder.parent == TMP and len(folder.name) == len("edgekit-XXXXXX") and folder != decoys[0]
        assert (folder / ".pid").read_text().strip() == str(pid)  # what cleanup reads: the only pid it signals
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid is not None and _alive(pid):  # the runner this test's measurement started, if edgekit failed
            os.kill(pid, signal.SIGKILL)
    lines = _error_lines(stderr)
    assert proc.returncode == 3 and len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("edgekit: error: measuring on device dev timed out after 8 s"), line
    assert "on device dev on device" not in line and line.count("dev (ssh://") <= 1
    assert "the runner was stopped and its temporary folder removed" in line, stderr
    assert "raise --timeout" in line and "load" in line  # what to do about it
    assert "warning" not in stderr, stderr
    if ignores_term:  # TERM alone did nothing: KILL came after the grace period
        from edgekit.profiling.device import STOP_GRACE_S

        assert time.time() - t0 >= STOP_GRACE_S
    assert _wait_gone(pid), f"runner {pid} survived the cleanup"
    assert not folder.exists(), f"{folder} left on the device"
    _unchanged(pkg, before, home, tmp_before)
    assert not _runners_under(sshd.proc.pid)


@pytest.fixture(scope="module")
def sshd_nosftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """An sshd with no `Subsystem sftp` line, as on minimal device images without openssh-sftp-server."""
    require_tools(str(SSHD), "ssh-keygen", "ssh", "scp", install="apt-get install openssh-server openssh-client")
    server = Sshd(tmp_path_factory.mktemp("sshd-nosftp"), sftp=False)
    yield server
    server.stop()


def _plain_scp(sshd: Sshd, kh: Path, source: Path, remote_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scp", *extra, "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={kh}", "-i", str(sshd.key),
                           "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-P", str(sshd.port), str(source),
                           f"{sshd.user}@127.0.0.1:{remote_dir}/"], capture_output=True, text=True, timeout=60)


@needs_sshd
def test_no_sftp_subsystem_copies_with_legacy_scp(sshd_nosftp: Sshd, home: Path, pkg: Path, tmp_path: Path,
                                                  decoys: tuple[Path, int]) -> None:
    if not _scp_speaks_sftp():
        pytest.skip("this machine's scp is older than OpenSSH 9: it speaks the legacy protocol already")
    kh = sshd_nosftp.known_hosts(home / "known_hosts-nosftp")
    probe_file, landing = tmp_path / "probe.txt", tmp_path / "landing"
    probe_file.write_text("x\n")
    landing.mkdir()
    plain = _plain_scp(sshd_nosftp, kh, probe_file, str(landing))  # the failure edgekit has to get past
    assert plain.returncode != 0 and "subsystem request failed" in plain.stderr, plain.stderr
    assert _plain_scp(sshd_nosftp, kh, probe_file, str(landing), "-O").returncode == 0
    _add(sshd_nosftp, home, "nosftp", known_hosts=kh)
    before, tmp_before = read_manifest(pkg), _leftovers()

    r = run_cli("devices", "check", "nosftp")
    assert r.code == 0 and not _error_lines(r.stderr), r.stderr
    assert "copy (scp)" in r.stdout and "legacy SCP protocol (scp -O)" in r.stdout and "no SFTP" in r.stdout
    assert _leftovers() <= tmp_before, f"the copy check left {_leftovers() - tmp_before}"

    r = run_cli("profile", pkg, "--device", "nosftp", "--artifact", "onnxruntime-fp32", *FASTP)
    assert r.code == 0 and not _error_lines(r.stderr), r.stderr
    assert "no SFTP subsystem: copied with the legacy SCP protocol (scp -O)" in r.stderr
    (a,) = [a for a in read_manifest(pkg)["artifacts"] if a.get("device_latency_ms")]
    where = f"ssh://{sshd_nosftp.user}@127.0.0.1:{sshd_nosftp.port}"
    assert a["key"] == "onnxruntime-fp32" and a["device_latency_ms"]["where"] == where
    assert a["device_latency_ms"]["p50"] > 0
    assert read_manifest(pkg)["artifacts"] != before["artifacts"]
    assert _leftovers() <= tmp_before, f"left on the device: {_leftovers() - tmp_before}"
    assert not _runners_under(sshd_nosftp.proc.pid)


@pytest.fixture(scope="module")
def sshd_nocopy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """No SFTP subsystem, and no `scp` on the sessions' PATH (sh, mktemp, cat, rm and sleep only): nothing
    can copy files there, though ssh works."""
    require_tools(str(SSHD), "ssh-keygen", "ssh", "scp", install="apt-get install openssh-server openssh-client")
    root = tmp_path_factory.mktemp("sshd-nocopy")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "mktemp", "cat", "rm", "sleep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    server = Sshd(root, sftp=False, extra=(f"SetEnv PATH={bin_dir}",))
    yield server
    server.stop()


@needs_sshd
def test_device_that_cannot_copy_says_so_and_leaves_nothing(sshd_nocopy: Sshd, home: Path, pkg: Path,
                                                            decoys: tuple[Path, int]) -> None:
    if not _scp_speaks_sftp():
        pytest.skip("this machine's scp is older than OpenSSH 9: no SFTP attempt to fall back from")
    kh = sshd_nocopy.known_hosts(home / "known_hosts-nocopy")
    which = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={kh}", "-i", str(sshd_nocopy.key),
                            "-o", "IdentitiesOnly=yes", "-p", str(sshd_nocopy.port), f"{sshd_nocopy.user}@127.0.0.1",
                            "command -v scp"], capture_output=True, text=True, timeout=60)
    if which.returncode == 0:
        pytest.skip(f"the login shell's startup files put scp back on PATH ({which.stdout.strip()})")
    _add(sshd_nocopy, home, "nocopy", known_hosts=kh)
    before, tmp_before = read_manifest(pkg), _leftovers()
    want = "failed: its sshd has no SFTP subsystem and legacy scp (scp -O) failed too"
    r = run_cli("devices", "check", "nocopy")
    line = r.error_line()
    assert r.code == 3 and line.startswith("edgekit: error: copying a test file to device nocopy " + want), r.stderr
    assert "not found" in line and "install openssh-sftp-server" in line
    assert "copy (scp)" in r.stdout and "fails" in r.stdout  # the table still says what works
    assert _leftovers() <= tmp_before, f"the copy check left {_leftovers() - tmp_before}"

    r = run_cli("profile", pkg, "--device", "nocopy", "--artifact", "onnxruntime-fp32", *FASTP)
    line = r.error_line()
    assert r.code == 3 and line.startswith("edgekit: error: copying the package to device nocopy " + want), r.stderr
    assert "warning" not in r.stderr, r.stderr
    _unchanged(pkg, before, home, tmp_before)
