"""The build cache: a second identical build reuses every stage and gives the same bytes; a changed input
reruns exactly what depends on it. (How much faster is a benchmark: bench/bench_rebuild.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli


def _hashes(m: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for a in m["artifacts"] for f in a["files"]}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))  # an empty cache
    return tmp_path / "home"


def test_second_build_reuses_every_stage_and_a_changed_input_reruns_its_dependents(
        tmp_path: Path, home: Path, defects_data: Path) -> None:
    args = [BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime,openvino", "--precision", "fp32,int8",
            "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS, "--val-samples", "100",
            *FAST, "--profile-seconds", "0.1"]
    first = run_cli("build", *args, "--calib", defects_data / "calib", "--out", tmp_path / "a")
    assert first.code == 0, first.stderr
    a = read_manifest(tmp_path / "a")
    assert "timing" not in a["cache"]["reused"] and not any(r.startswith("export") for r in a["cache"]["reused"])

    second = run_cli("build", *args, "--calib", defects_data / "calib", "--out", tmp_path / "b")
    assert second.code == 0, second.stderr
    b = read_manifest(tmp_path / "b")
    reused = set(b["cache"]["reused"])
    keys = [x["key"] for x in b["artifacts"]]
    assert {"ingest", "timing", "per-layer times"} <= reused
    assert {f"export {k}" for k in keys} <= reused and {f"outputs {k}" for k in keys} <= reused
    assert _hashes(a) == _hashes(b)
    assert [x["latency_ms"] for x in a["artifacts"]] == [x["latency_ms"] for x in b["artifacts"]]
    assert "stages reused from the build cache" in second.stdout

    # Fewer calibration images: the INT8 artifacts depend on them, FP32 does not; timing covers all.
    calib = tmp_path / "calib-half"
    for cls in sorted(p for p in (defects_data / "calib").iterdir() if p.is_dir()):
        (calib / cls.name).mkdir(parents=True)
        for img in sorted(cls.iterdir())[::2]:
            shutil.copyfile(img, calib / cls.name / img.name)
    third = run_cli("build", *args, "--calib", calib, "--out", tmp_path / "c")
    assert third.code == 0, third.stderr
    c = read_manifest(tmp_path / "c")
    reused = set(c["cache"]["reused"])
    assert {"export onnxruntime-fp32", "export openvino-fp32", "ingest"} <= reused
    assert not {"export onnxruntime-int8", "export openvino-int8", "timing"} & reused
    changed = {k for k, v in _hashes(c).items() if _hashes(a)[k] != v}
    assert changed and all("int8" in k for k in changed)

    # --no-cache: everything again, the same bytes where the backend is deterministic (ONNX Runtime).
    fresh = run_cli("build", *args, "--calib", defects_data / "calib", "--out", tmp_path / "d", "--no-cache")
    assert fresh.code == 0, fresh.stderr
    d = read_manifest(tmp_path / "d")
    assert d["cache"]["reused"] == [] and not d["cache"]["enabled"]
    ort = {k: v for k, v in _hashes(a).items() if k.startswith("onnxruntime-")}
    assert ort == {k: v for k, v in _hashes(d).items() if k.startswith("onnxruntime-")}


def test_remeasure_times_again(tmp_path: Path, home: Path, defects_data: Path) -> None:
    args = [BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "fp32",
            "--calib", defects_data / "calib", "--preprocess", BUNDLED_PREPROCESS, "--calib-samples", "40",
            "--val-samples", "40", *FAST]
    assert run_cli("build", *args, "--out", tmp_path / "a").code == 0
    r = run_cli("build", *args, "--out", tmp_path / "b", "--remeasure")
    assert r.code == 0, r.stderr
    reused = read_manifest(tmp_path / "b")["cache"]["reused"]
    assert "export onnxruntime-fp32" in reused and "timing" not in reused
