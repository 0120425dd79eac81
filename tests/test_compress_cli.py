"""`edgekit prune`, `edgekit distill` and `edgekit build --prune --distill` through the real command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FAST, read_manifest, run_cli


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small exported mobile network and labelled arrays it classifies (teacher-made labels)."""
    import torch
    from models import export_dynamic, mobilenet_like

    root = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    model = mobilenet_like().eval()
    onnx_path = export_dynamic(model, root / "mobile.onnx", opset=13)
    x = np.random.default_rng(0).standard_normal((96, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(root / "data.npz", images=x, labels=labels)
    return onnx_path, root / "data.npz"


def test_prune_then_distill_verbs_write_models_the_next_stage_takes(labelled, tmp_path: Path) -> None:
    model, data = labelled
    r = run_cli("prune", model, "--target", "rpi4", "--prune", "0.5", "--input-shape", "images=1,3,64,64",
                "--val", data, "--out", tmp_path / "pruned", "--layer-ratio", "bogus.layer=0.2")
    assert r.code == 2 and "no layer named bogus.layer" in r.error_line()
    r = run_cli("prune", model, "--target", "rpi4", "--prune", "0.5", "--input-shape", "images=1,3,64,64",
                "--val", data, "--out", tmp_path / "pruned")
    assert r.code == 0, r.stderr
    report = json.loads((tmp_path / "pruned" / "compress.json").read_text())
    assert report["prune"]["macs_ratio"] <= 0.55 and report["prune"]["round_to"] == 4  # rpi4 (ARMv8.0) fp32
    assert all(la["channels_after"] % 4 == 0 for la in report["prune"]["layers"] if la["kind"] == "conv")
    assert set(report["accuracy"]) == {"original", "pruned"}
    onnx.checker.check_model(str(tmp_path / "pruned" / "model.onnx"))

    r = run_cli("distill", tmp_path / "pruned" / "model.onnx", "--teacher", model, "--input-shape",
                "images=1,3,64,64", "--train", data, "--epochs", "2", "--checkpoint", tmp_path / "ck.pt",
                "--out", tmp_path / "distilled")
    assert r.code == 0, r.stderr
    report = json.loads((tmp_path / "distilled" / "compress.json").read_text())
    assert list(report["accuracy"]) == ["original", "student", "fine-tuned (hard labels)", "distilled"]
    assert report["distill"]["epochs_run"] >= 1 and (tmp_path / "distilled" / "model.onnx").exists()
    assert (tmp_path / "ck.pt").exists()  # an interrupted run would resume from it

    r = run_cli("prune", model, "--target", "rpi4", "--importance", "taylor", "--input-shape", "images=1,3,64,64",
                "--val", data, "--out", tmp_path / "x", "--prune", "0.3")
    assert r.code == 2 and "Taylor importance needs data" in r.error_line()


def test_build_with_prune_and_distill_records_compression(labelled, tmp_path: Path) -> None:
    model, data = labelled
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "fp32,int8",
                "--input-shape", "images=1,3,64,64", "--calib", data, "--prune", "0.5", "--distill", "--train", data,
                "--epochs", "2", "--max-accuracy-drop", "100", "--out", tmp_path / "pkg", *FAST)
    assert r.code == 0, r.stderr
    m = read_manifest(tmp_path / "pkg")
    c = m["compression"]
    assert c["macs_ratio"] <= 0.55 and c["macs_after"] < c["macs_before"] and c["speedup_fp32"] > 0
    assert {"original", "pruned", "fine-tuned (hard labels)", "distilled"} <= set(c["accuracy"])
    assert c["latency_before_ms"]["runs"] > 0 and c["passed"]
    assert [a["key"] for a in m["artifacts"]] == ["onnxruntime-fp32", "onnxruntime-int8"]
    assert all(a["verification"]["passed"] for a in m["artifacts"])  # quantized vs the compressed FP32
