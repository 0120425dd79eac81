"""Shared fixtures: the bundled model and its generated data, test-built models, and a CLI runner."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# Caches (build stages, sensitivities) and the device list of the tests' own: a fresh one per run, never
# the user's ~/.cache/edgekit or ~/.config/edgekit.
os.environ["EDGEKIT_HOME"] = tempfile.mkdtemp(prefix="edgekit-test-home-")
atexit.register(shutil.rmtree, os.environ["EDGEKIT_HOME"], True)  # the run leaves nothing behind in /tmp
BUNDLED_ONNX = REPO / "examples" / "defects" / "defectnet.onnx"
BUNDLED_PREPROCESS = REPO / "examples" / "defects" / "preprocess.yaml"
# tests/ mirrors edgekit/; the shared model builders (models.py, conftest) and the helpers other tests reuse
# (backends' small models and fake tools, quantize's hostile model) import by name from anywhere.
for _folder in ("", "backends", "quantize", "profiling"):
    sys.path.insert(0, str(Path(__file__).parent / _folder))

def require_tools(*paths: str, install: str) -> None:
    """Skip when a system program is absent, unless scripts/test.sh (and so CI) installed the system
    dependencies: then a missing one is a failure, never a silent skip."""
    missing = [p for p in paths if not (Path(p).exists() if p.startswith("/") else shutil.which(p))]
    if not missing:
        return
    message = f"needs {', '.join(missing)} ({install}; scripts/system-deps.sh installs it)"
    if os.environ.get("EDGEKIT_REQUIRE_SYSTEM_DEPS"):
        pytest.fail(message)
    pytest.skip(message)


def _host_saturates() -> bool:
    from edgekit.targets import load_target

    return load_target("host-cpu").int8_dot_saturates


# This host's INT8 as the planner sets it: 7-bit weights on an x86 CPU without VNNI (u8*s8 saturates there).
# Tests that build INT8 settings by hand use it, so they hold on AVX2-only and VNNI hosts alike.
HOST_REDUCE_RANGE = _host_saturates()

# Short timing in tests: speed goals live in bench/, tests only need valid measurements.
FAST = ["--profile-seconds", "0.1", "--min-runs", "10", "--no-memory"]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("edgekit: error")]
        assert len(lines) == 1, f"expected one error line, got:\n{self.stderr}"
        return lines[0]


def build_bundled(out: Path, data: Path, precision: str, *extra: str | Path) -> Path:
    """The bundled DefectNet built on ONNX Runtime into `out` (the fixture packages several test files share)."""
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", precision,
                "--calib", data / "calib", "--val", data / "val", "--preprocess", BUNDLED_PREPROCESS,
                *extra, "--out", out, *FAST)
    assert r.code == 0, r.stderr
    return out


def run_cli(*args: str | Path, cwd: Path | None = None) -> CliResult:
    """The real command in a fresh process, as a user runs it."""
    # EDGEKIT_DEBUG: an internal error (exit 3) prints its traceback, so a failure on CI says where it was
    env = {**os.environ, "COLUMNS": "200", "EDGEKIT_DEBUG": "1"}
    p = subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd or REPO, env=env, timeout=900)
    return CliResult(p.returncode, p.stdout, p.stderr)


def read_manifest(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())


@pytest.fixture(scope="session")
def defects_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model's calibration and validation folders, generated as the README does."""
    from edgekit.zoo.defects_data import generate

    return generate(tmp_path_factory.mktemp("defects"), n_train=0, n_calib=200, n_val=400)


@pytest.fixture(scope="session")
def mobilenet_opset11(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A public-style mobile model: opset 11, dynamic batch and spatial dims, hardswish and SE blocks."""
    from models import export_dynamic, mobilenet_like

    return export_dynamic(mobilenet_like(), tmp_path_factory.mktemp("m") / "mobilenet_opset11.onnx", opset=11)


@pytest.fixture(scope="session")
def mobilenet_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("d") / "calib.npz"
    np.savez(path, images=rng.standard_normal((120, 3, 64, 64)).astype(np.float32))
    return path
