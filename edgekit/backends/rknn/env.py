"""The isolated Python environment that runs Rockchip's rknn-toolkit2.

rknn-toolkit2 2.5.0 pins numpy<=1.26.4, onnx<=1.18, protobuf<=4.25.4 and torch<=2.4, none of which can live
beside edgekit's own numpy 2 / onnx 1.2x stack. So edgekit builds a venv of its own for it, once, under
$EDGEKIT_HOME/envs (else ~/.cache/edgekit/envs), and talks to it only through worker.py (JSON in, JSON out).

Every package goes in with --no-deps at an exact pin: pip's resolver would otherwise pull torch 2.4 and its
CUDA wheels. The pins below are the smallest set `from rknn.api import RKNN` plus load_onnx, build,
hybrid quantization, accuracy_analysis and the simulator actually import. torch stays at edgekit's own pin
(2.13.0, the CPU build): the toolkit imports it at module level but runs no torch code for ONNX models.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgekit.errors import EdgekitError

TOOLKIT_VERSION = "2.5.0"
ENV_NAME = f"rknn-toolkit2-{TOOLKIT_VERSION}"
PYTHON = (3, 11)  # the pins are the cp311 wheels that were tried together (torch 2.13.0's CPU build is cp311)

# Exact pins, installed with --no-deps. Why each is here:
PINS = (
    f"rknn-toolkit2=={TOOLKIT_VERSION}",
    "numpy==1.26.4",  # rknn-toolkit2: numpy<=1.26.4
    "onnx==1.18.0",  # rknn-toolkit2: onnx>=1.16.1,<=1.18.0
    "protobuf==4.25.4",  # rknn-toolkit2: protobuf>=4.21.6,<=4.25.4 (and onnx 1.18 needs >=4.25.1)
    "onnxruntime==1.19.2",  # the toolkit's float reference (it asks >=1.17); tried with numpy 1.26
    "scipy==1.13.1",  # accuracy_analysis' cosine distance; works with numpy 1.26
    "ruamel.yaml==0.18.6",  # hybrid quantization writes and reads the .quantization.cfg with it
    "opencv-python-headless==4.10.0.84",  # cv2 is imported at module level; tried with numpy 1.26
    "fast-histogram==0.14",  # kl_divergence calibration
    "psutil==7.2.2",  # declared by the toolkit (not imported by the flows tried; cheap)
    "tqdm==4.70.1",  # its progress bars
    "typing_extensions==4.16.0",  # torch and onnx import it at module level
    "torch==2.13.0",  # imported by rknn.api at module level; this pin takes the local CPU build
    "setuptools==69.5.1",  # the toolkit imports pkg_resources; pinned below 70
)
STAMP = ".edgekit-complete.json"  # written last: an env without it was interrupted and is rebuilt
CHECK = ("import importlib.metadata as m, json, sys\n"
         "from rknn.api import RKNN\n"
         "names = ('rknn-toolkit2', 'numpy', 'onnx', 'onnxruntime', 'protobuf', 'torch', 'scipy')\n"
         "v = {n: m.version(n) for n in names}\n"
         "v['python'] = sys.version.split()[0]\n"
         "print(json.dumps(v))\n")


class RknnEnvError(EdgekitError, RuntimeError):
    """The isolated rknn-toolkit2 environment could not be made; the message says what to do."""


def env_dir() -> Path:
    """Where the environment lives: one folder per toolkit version, shared by every edgekit run."""
    home = os.environ.get("EDGEKIT_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "edgekit"
    return base / "envs" / ENV_NAME


def env_python(root: Path | None = None) -> Path:
    return (root or env_dir()) / "bin" / "python"


def _read_stamp(root: Path) -> dict | None:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _complete(root: Path) -> dict | None:
    """The stamp, when the env at root is whole and was made from today's pins."""
    stamp = _read_stamp(root)
    if stamp is None or stamp.get("pins") != list(PINS) or not env_python(root).exists():
        return None
    return stamp


def env_status() -> dict:
    """What is there, without creating or running anything (for `edgekit doctor`-style reports)."""
    root = env_dir()
    stamp = _read_stamp(root) or {}
    return {"path": str(root), "python": str(env_python(root)), "exists": env_python(root).exists(),
            "complete": _complete(root) is not None, "versions": stamp.get("versions", {}),
            "created": stamp.get("created"), "pins": list(PINS)}


def _clean_env() -> dict[str, str]:
    """The subprocess environment: none of this interpreter's path settings may leak into the other env."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _base_python() -> str:
    """A real CPython 3.11 to make the venv from: this one (its base if it is itself a venv), else python3.11."""
    if sys.version_info[:2] == PYTHON:
        base = getattr(sys, "_base_executable", None) or sys.executable
        if base and Path(base).exists():
            return base
    found = shutil.which(f"python{PYTHON[0]}.{PYTHON[1]}")
    if found:
        return found
    raise RknnEnvError(f"rknn-toolkit2 {TOOLKIT_VERSION} needs CPython {PYTHON[0]}.{PYTHON[1]} for its isolated "
                       f"environment and none was found: install python{PYTHON[0]}.{PYTHON[1]} (with venv) and "
                       "run again")


def _check_host() -> None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RknnEnvError(f"rknn-toolkit2 {TOOLKIT_VERSION} converts models on x86-64 Linux only (this is "
                           f"{sys.platform}/{platform.machine()}): run the rknn build on an x86-64 Linux host")


@contextlib.contextmanager
def _locked(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """An exclusive fcntl lock: two edgekit runs never build (or remove) the same env at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another edgekit run to finish the rknn-toolkit2 environment ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str, timeout: float) -> str:
    """Run one step, its output appended to log; a failure raises with the step's last line and the log."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=_clean_env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RknnEnvError(f"{what} took over {int(timeout)} s and was stopped (log: {log}); check the "
                               "network access to PyPI and run again") from None
        except OSError as e:
            raise RknnEnvError(f"{what} could not start ({e}); check the Python installation and run again") \
                from None
        f.write(r.stdout)
    if r.returncode != 0:
        lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip() and "is ignored" not in ln]
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise RknnEnvError(f"{what} failed (exit {r.returncode}): {last[:300]} — see {log}; check the network "
                           "access to PyPI (or free disk space) and run again")
    return r.stdout


def _create(root: Path, say: Callable[[str], None]) -> dict:
    """Make the venv at root, install the pins, prove the toolkit imports, then stamp it."""
    base = _base_python()
    log = root.parent / f"{ENV_NAME}.log"
    log.write_text(f"edgekit: creating {root} from {base} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    say(f"creating the isolated rknn-toolkit2 {TOOLKIT_VERSION} environment at {root} (one time, about a minute)")
    t0 = time.monotonic()
    _run([base, "-m", "venv", str(root)], log, "creating the rknn-toolkit2 venv", 300)
    py = str(env_python(root))
    _run([py, "-m", "pip", "install", "--no-deps", "--no-input", "--progress-bar", "off", *PINS], log,
         f"installing rknn-toolkit2 {TOOLKIT_VERSION} and its pinned dependencies", 1800)
    out = _run([py, "-I", "-c", CHECK], log, "importing rknn-toolkit2 in its environment", 300)
    try:
        versions = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RknnEnvError(f"rknn-toolkit2 imported but did not report its versions (log: {log}); remove {root} "
                           "and run again") from None
    stamp = {"pins": list(PINS), "versions": versions, "base_python": base,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.monotonic() - t0, 1)}
    tmp = root / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=1))
    os.replace(tmp, root / STAMP)
    say(f"rknn-toolkit2 environment ready in {stamp['seconds']} s")
    return stamp


def ensure_env(say: Callable[[str], None] = print) -> Path:
    """The isolated env's python, creating the env first if it is missing, partial or from other pins."""
    root = env_dir()
    if _complete(root):
        return env_python(root)
    _check_host()
    with _locked(root.parent / f"{ENV_NAME}.lock", say):
        if _complete(root):  # another run finished it while this one waited
            return env_python(root)
        if root.exists() or root.is_symlink():
            say(f"removing the incomplete rknn-toolkit2 environment at {root}")
            if root.is_symlink() or not root.is_dir():
                root.unlink()
            else:
                shutil.rmtree(root)
        try:
            _create(root, say)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # no stamp: the next run would rebuild it anyway
            raise
    return env_python(root)


def unusable_here() -> str | None:
    """Why the environment cannot be made on this machine (another OS or CPU, no CPython 3.11), else None. Whether
    PyPI is reachable shows only when it is made (on first use)."""
    if _complete(env_dir()) is not None:
        return None
    try:
        _check_host()
        _base_python()
    except RknnEnvError as e:
        return str(e)
    return None
