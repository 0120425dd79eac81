"""The interface around the pipeline: `--json` on every verb, documented exit codes, the Python API,
and one build for several targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli
from test_backend_onnxruntime import _conv_model

import edgekit
from edgekit.errors import BadInput


def _json(r) -> dict:
    """stdout must be exactly one JSON document, whatever the libraries printed."""
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("small")
    model = _conv_model(d / "m.onnx")
    np.savez(d / "calib.npz", x=np.random.default_rng(0).standard_normal((48, 3, 16, 16)).astype(np.float32))
    return model, d / "calib.npz"


def test_every_verb_prints_one_json_document(tmp_path: Path, small: tuple[Path, Path]) -> None:
    model, calib = small
    r = run_cli("targets", "--json")
    assert r.code == 0 and {t["name"] for t in _json(r)["targets"]} >= {"host-cpu", "rpi4", "jetson-nano"}
    r = run_cli("targets", "show", "rpi5", "--json")
    assert r.code == 0 and _json(r)["channel_multiple"]["fp16"] == 8
    r = run_cli("inspect", model, "--target", "rpi4", "--json")
    doc = _json(r)
    assert r.code == 0 and doc["macs"] > 0 and doc["op_support"]["ncnn"]["Conv"] == "yes"
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "openvino", "--precision", "fp32,int8",
                "--calib", calib, "--out", tmp_path / "pkg", *FAST, "--json")
    doc = _json(r)  # NNCF's progress bars and OpenVINO's logs went to stderr
    assert r.code == 0 and doc["passed"] and doc["package"] == str(tmp_path / "pkg")
    assert [a["key"] for a in doc["manifest"]["artifacts"]] == ["openvino-fp32", "openvino-int8"]
    r = run_cli("debug", model, "--target", "host-cpu", "--backend", "onnxruntime", "--calib", calib,
                "--out", tmp_path / "dbg", "--json")
    assert r.code == 0 and _json(r)["first_divergence"] is None
    r = run_cli("plan", model, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "fp32,fp16",
                "--calib", calib, "--out", tmp_path / "plan.yaml", "--profile-seconds", "0.1", "--min-runs", "10",
                "--json")
    doc = _json(r)
    assert r.code == 0 and doc["chosen"] in {"onnxruntime-fp32", "onnxruntime-fp16"} and len(doc["candidates"]) == 2
    r = run_cli("devices", "list", "--json")
    assert r.code == 0 and _json(r)["devices"] == []
    r = run_cli("report", tmp_path / "pkg", "--json")
    assert r.code == 0 and _json(r)["ok"]
    r = run_cli("package", tmp_path / "pkg", "--format", "zip", "--out", tmp_path / "pkg.zip", "--json")
    assert r.code == 0 and Path(_json(r)["archive"]).exists()


def test_errors_in_json_mode_are_json_with_the_exit_code(tmp_path: Path, small: tuple[Path, Path]) -> None:
    model, calib = small
    r = run_cli("build", model, "--target", "no-such-device", "--calib", calib, "--json")
    doc = _json(r)
    assert r.code == 2 and doc == {"ok": False, "exit_code": 2, "error": doc["error"]}
    assert "unknown target" in doc["error"]
    r = run_cli("build", tmp_path / "missing.onnx", "--target", "host-cpu", "--json")
    assert r.code == 2 and "not found" in _json(r)["error"]
    # A verification failure: exit 1, and the manifest of the rejected build in the document.
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "int8",
                "--calib", calib, "--min-snr-db", "200", "--recover", "none", "--out", tmp_path / "x", *FAST,
                "--json")
    doc = _json(r)
    assert r.code == 1 and not doc["passed"] and doc["package"].endswith("x.rejected")


def test_python_api_returns_the_manifest_and_plan(tmp_path: Path, small: tuple[Path, Path]) -> None:
    model, calib = small
    pkg = edgekit.build(model, target="host-cpu", backend="onnxruntime", precision="fp32,int8", calib=str(calib),
                        out=str(tmp_path / "pkg"), profile_seconds=0.1, min_runs=10, memory=False)
    assert isinstance(pkg, edgekit.Manifest) and pkg.passed and pkg.exit_code == 0
    assert pkg.path == tmp_path / "pkg" and pkg == read_manifest(tmp_path / "pkg")
    assert pkg.artifact("onnxruntime-int8")["bytes"] < pkg.artifact("onnxruntime-fp32")["bytes"]
    spec = edgekit.inspect(model)
    assert spec.macs == pkg["source"]["macs"]
    plan = edgekit.plan(model, "host-cpu", calib=str(calib), backend="onnxruntime", precision="fp32,int8",
                        out=tmp_path / "plan.yaml", profile_seconds=0.1, min_runs=10)
    assert plan.target == "host-cpu" and len(plan.candidates) == 2 and (tmp_path / "plan.yaml").exists()
    archive = edgekit.package(tmp_path / "pkg", out=tmp_path / "pkg.zip")
    assert Path(archive["archive"]).exists()
    edgekit.verify_package(tmp_path / "pkg.zip")
    with pytest.raises(BadInput, match="unknown target"):
        edgekit.build(model, target="nope", calib=str(calib))
    with pytest.raises(TypeError, match="unknown build option"):
        edgekit.build(model, target="host-cpu", calib=str(calib), colour="blue")


def test_one_build_for_several_targets_prints_one_table(tmp_path: Path, defects_data: Path) -> None:
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu,rpi4,jetson-orin-nano", "--precision", "fp32,int8",
                "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess",
                BUNDLED_PREPROCESS, "--calib-samples", "60", "--val-samples", "60", "--out", tmp_path / "pkgs",
                *FAST, "--json")
    doc = _json(r)
    assert r.code == 0, r.stderr
    assert [t["target"] for t in doc["targets"]] == ["host-cpu", "rpi4", "jetson-orin-nano"]
    for t in doc["targets"]:
        assert t["passed"] and Path(t["package"]) == tmp_path / "pkgs" / t["target"]
    assert read_manifest(tmp_path / "pkgs" / "rpi4")["artifacts"][0]["backend"] == "ncnn"
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu,jetson-nano", "--precision", "int8",
                "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess",
                BUNDLED_PREPROCESS, "--calib-samples", "60", "--val-samples", "60", "--out", tmp_path / "mixed",
                *FAST)
    # jetson-nano has no INT8: that target is reported in the table, the other still builds.
    assert r.code == 2 and "jetson-nano" in r.stdout and (tmp_path / "mixed" / "host-cpu" / "manifest.json").exists()
    assert "not built" in r.stdout
