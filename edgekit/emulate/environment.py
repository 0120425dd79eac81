"""The aarch64 emulator: Debian's qemu-user running an arm64 Python with the host's runtimes as aarch64 wheels.

Set up once under $EDGEKIT_HOME/cache/emulators/aarch64-bookworm (about 75 MB of userland plus the wheels):
`mmdebstrap --variant=extract` unpacks python3-minimal and the C++/OpenMP runtime libraries without running
anything, and each runtime is the aarch64 wheel of the version the host has (`pip download --platform`),
unpacked into a folder of its own on PYTHONPATH. Each runtime is imported once under qemu before it is kept:
a wheel that crashes there falls back to the newest release its backend lists that runs
(Backend.emulation_fallbacks), and the record says which version verified."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekit.console import note
from edgekit.errors import EdgekitError
from edgekit.home import cache_dir

ARCH = "aarch64"
SUITE = "bookworm"  # its python3.11 matches the cp311 wheels
USERLAND = ("python3-minimal", "libpython3.11-stdlib", "libstdc++6", "libgomp1")
PYTHON = "usr/bin/python3.11"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
INSTALL_HINT = "apt-get install qemu-user mmdebstrap (Debian/Ubuntu)"
# Board CPUs qemu-user 7.2 has no model of, and the model with the same ISA features ncnn and ONNX Runtime
# choose their kernels by (ARMv8.2 fp16 arithmetic and dot product for the A55/A75/A78 class; ARMv8.0 for A73).
STAND_INS = {"cortex-a55": "cortex-a76", "cortex-a75": "cortex-a76", "cortex-a77": "cortex-a76",
             "cortex-a78": "cortex-a76", "cortex-x1": "cortex-a76", "cortex-a73": "cortex-a72"}


class EmulatorUnavailable(EdgekitError):
    """The emulator cannot run here (qemu missing, no network for the first setup): what to do, on one line."""


@dataclass
class Emulator:
    """A ready aarch64 userland and the runtimes in it (distribution -> version actually installed)."""

    home: Path
    qemu: str
    runtimes: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # distribution -> why its version differs from the host's
    broken: dict[str, str] = field(default_factory=dict)  # distribution -> why no version runs under qemu

    @property
    def root(self) -> Path:
        return self.home / "rootfs"

    def site(self, dist: str, version: str) -> Path:
        return self.home / "site" / f"{dist}-{version}"

    def command(self, cpu: str, argv: list[str], dists: list[str]) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that run `python3.11 ARGV` on the emulated `cpu` with these runtimes."""
        paths = [str(self.site(d, self.runtimes[d])) for d in ["numpy", *dists] if d in self.runtimes]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_", "LD_"))}
        env.update(QEMU_CPU=cpu, PYTHONPATH=os.pathsep.join(paths), PYTHONDONTWRITEBYTECODE="1",
                   OMP_NUM_THREADS="1")
        return [self.qemu, "-L", str(self.root), str(self.root / PYTHON), *argv], env

    def to_dict(self) -> dict[str, Any]:
        return {"home": str(self.home), "qemu": self.qemu, "qemu_version": qemu_version(self.qemu),
                "runtimes": self.runtimes, "notes": self.notes, "broken": self.broken}


def emulator_home() -> Path:
    return cache_dir("emulators") / f"{ARCH}-{SUITE}"


def qemu_binary() -> str | None:
    return shutil.which(f"qemu-{ARCH}") or shutil.which(f"qemu-{ARCH}-static")


def qemu_version(qemu: str) -> str:
    try:
        first = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return first.replace(f"qemu-{ARCH} version ", "").strip()


def qemu_cpu(wanted: str, qemu: str | None = None) -> tuple[str, str | None]:
    """The qemu CPU model for a board's CPU, and a note when it is a stand-in with the same ISA features."""
    qemu = qemu or qemu_binary()
    listed: set[str] = set()
    if qemu:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            text = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=10).stdout
            listed = {w for line in text.splitlines()[1:] for w in line.split()}
    if wanted in listed or not listed:
        return wanted, None
    stand_in = STAND_INS.get(wanted)
    if stand_in in listed:
        return stand_in, (f"qemu {qemu_version(qemu)} has no {wanted} model: {stand_in} stands in (the same ISA "
                          "features ncnn and ONNX Runtime choose kernels by; core-specific tuning may differ)")
    raise EmulatorUnavailable(f"qemu-{ARCH} has no CPU model {wanted} (it has {', '.join(sorted(listed))}): set the "
                              "target's isa.cpu to one of them")


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one setup at a time: parallel builds share the emulator
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _status_file(home: Path) -> Path:
    return home / "runtimes.json"


def _read_status(home: Path) -> dict[str, Any]:
    try:
        return json.loads(_status_file(home).read_text())
    except (OSError, ValueError):
        return {}


def ensure_emulator(dists: tuple[str, ...] | list[str], fallbacks: dict[str, tuple[str, ...]] | None = None
                    ) -> Emulator:
    """The emulator with these runtime distributions (and numpy), set up on first use; EmulatorUnavailable when
    it cannot be (qemu missing, the first download impossible). fallbacks: per distribution, releases to try
    (newest first) when the host's does not run under qemu (Backend.emulation_fallbacks)."""
    qemu = qemu_binary()
    if qemu is None:
        raise EmulatorUnavailable(f"ARM verification under emulation needs qemu-user: {INSTALL_HINT}")
    home = emulator_home()
    with _locked(home):
        if not (home / "rootfs.done").exists():
            _make_rootfs(home)
        status = _read_status(home)
        emu = Emulator(home, qemu)
        for dist in ["numpy", *dists]:
            host = _host_version(dist)
            entry = status.get(f"{dist}=={host}")
            if entry is None:
                entry = _install(emu, dist, host, (fallbacks or {}).get(dist, ()))
                status[f"{dist}=={host}"] = entry
                _status_file(home).write_text(json.dumps(status, indent=1))
            if entry.get("version"):
                emu.runtimes[dist] = entry["version"]
                if entry["version"] != host:
                    emu.notes[dist] = entry.get("why", "")
            else:
                emu.broken[dist] = entry.get("why", "no version runs under qemu")
    return emu


def emulator_status() -> dict[str, Any]:
    """What is set up, without setting anything up."""
    home = emulator_home()
    qemu = qemu_binary()
    return {"home": str(home), "qemu": qemu, "qemu_version": qemu_version(qemu) if qemu else None,
            "mmdebstrap": shutil.which("mmdebstrap"), "rootfs": (home / "rootfs.done").exists(),
            "runtimes": _read_status(home), "install_hint": None if qemu else INSTALL_HINT}


def _host_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError as e:
        raise EmulatorUnavailable(f"{dist} is not installed on the host, so there is no version to match") from e


def _make_rootfs(home: Path) -> None:
    """An arm64 Debian userland, unpacked (nothing of it runs during setup), staged then moved into place."""
    if shutil.which("mmdebstrap") is None:
        raise EmulatorUnavailable(f"setting up the ARM emulator needs mmdebstrap: {INSTALL_HINT}")
    note(f"emulator: unpacking an arm64 Debian {SUITE} userland ({', '.join(USERLAND)}) into {home}")
    shutil.rmtree(home / "rootfs", ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=home, prefix=".rootfs-") as tmp:
        staged = Path(tmp) / "rootfs"
        try:
            r = subprocess.run(["mmdebstrap", "--variant=extract", "--architectures=arm64",
                                f"--include={','.join(USERLAND)}", SUITE, str(staged)],
                               capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            raise EmulatorUnavailable("mmdebstrap took over 30 minutes to unpack the arm64 userland") from None
        if r.returncode != 0 or not (staged / PYTHON).exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EmulatorUnavailable(f"mmdebstrap could not unpack the arm64 userland ({tail[0]}): it needs "
                                      "Debian's package mirror; retry with network access")
        staged.rename(home / "rootfs")
    (home / "rootfs.done").write_text(SUITE + "\n")


def _install(emu: Emulator, dist: str, host: str, fallbacks: tuple[str, ...]) -> dict[str, Any]:
    """The host's version of `dist` as an aarch64 wheel, kept if it imports under qemu; else a fallback."""
    tried, imported = [], False
    for version in (host, *[v for v in fallbacks if _older(v, host)]):
        note(f"emulator: {dist} {version} for {ARCH}")
        why = _unpack_wheel(emu, dist, version)
        if why is None:
            imported = True
            why = _imports(emu, dist, version)
        if why is None:
            entry: dict[str, Any] = {"version": version}
            if version != host:
                entry["why"] = f"the host's {dist} {host} does not run under qemu ({'; '.join(tried)}): {version} does"
            return entry
        tried.append(f"{version}: {why}")
        shutil.rmtree(emu.site(dist, version), ignore_errors=True)
    if not imported:  # nothing could even be downloaded (no network?): not recorded, tried again next time
        raise EmulatorUnavailable(f"the aarch64 {dist} wheel could not be fetched ({'; '.join(tried)}): the first "
                                  "ARM build needs PyPI")
    return {"version": None, "why": f"no {dist} release runs under qemu-{ARCH} here ({'; '.join(tried)})"}


def _older(a: str, b: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())
    return parts(a) < parts(b)


def _unpack_wheel(emu: Emulator, dist: str, version: str) -> str | None:
    dest = emu.site(dist, version)
    if dest.exists():
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dist}-") as tmp:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                                "--only-binary=:all:", "--platform", WHEEL_PLATFORM, "--python-version", "3.11",
                                "--implementation", "cp", "--no-deps", f"{dist}=={version}", "-d", tmp],
                               capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return "pip download took over 900 s"
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if not x.startswith("WARNING")]
            return f"no {WHEEL_PLATFORM} wheel could be downloaded ({(lines[-1:] or ['no output'])[0]})"
        staged = Path(tmp) / "site"
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(staged)
        except zipfile.BadZipFile:
            return f"the downloaded {wheels[0].name} is not a valid wheel"
        staged.rename(dest)
    return None


def _imports(emu: Emulator, dist: str, version: str) -> str | None:
    runtimes = dict(emu.runtimes)
    runtimes[dist] = version
    probe = Emulator(emu.home, emu.qemu, runtimes)
    argv, env = probe.command("cortex-a76", ["-c", f"import {dist.replace('-', '_')}"], [dist])
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "import timed out under qemu"
    if r.returncode == 0:
        return None
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
    return f"import fails under qemu ({tail[0][:160]})"
