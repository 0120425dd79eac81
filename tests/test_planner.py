"""`edgekit plan` chooses by measurement under budgets; `edgekit build --plan` applies it exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from conftest import read_manifest, run_cli
from test_backend_onnxruntime import _conv_model

QUICK = ["--profile-seconds", "0.2", "--min-runs", "20"]


def test_plan_then_build_with_the_plan(tmp_path: Path) -> None:
    model = _conv_model(tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))
    r = run_cli("plan", model, "--target", "host-cpu", "--backend", "onnxruntime,ncnn", "--calib", calib,
                "--out", tmp_path / "plan.yaml", *QUICK)
    assert r.code == 0, r.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    ok = [c for c in plan["candidates"] if c["verdict"] == "ok"]
    chosen = [c for c in plan["candidates"] if c["chosen"]]
    assert len(plan["candidates"]) == 6 and len(chosen) == 1
    assert chosen[0]["measured_ms"] == min(c["measured_ms"] for c in ok)  # the measured-fastest that passes
    assert plan["cost_model"]["compared"] == 6 and plan["cost_model"]["mape_percent"] is not None
    assert len(plan["artifacts"]) == 1 and f"{plan['artifacts'][0]['backend']}-{plan['artifacts'][0]['precision']}" \
        == chosen[0]["key"]
    assert "fastest of" in r.stdout and "mean absolute percentage error" in r.stdout

    hashes = []
    for i in range(2):
        out = tmp_path / f"pkg{i}"
        r = run_cli("build", model, "--target", "host-cpu", "--plan", tmp_path / "plan.yaml", "--calib", calib,
                    "--out", out, *QUICK, "--no-memory")
        assert r.code == 0, r.stderr
        m = read_manifest(out)
        assert [a["key"] for a in m["artifacts"]] == [chosen[0]["key"]]
        assert any("applied as written" in reason for reason in m["plan_reasons"])
        hashes.append([f["sha256"] for a in m["artifacts"] for f in a["files"]])
    if chosen[0]["key"].startswith("onnxruntime"):  # ORT's writer is deterministic: same plan, same bytes
        assert hashes[0] == hashes[1]

    other = _conv_model(tmp_path / "other.onnx", weight_scale=2.0)
    r = run_cli("build", other, "--target", "host-cpu", "--plan", tmp_path / "plan.yaml", "--calib", calib,
                "--out", tmp_path / "x")
    assert r.code == 2 and "made for another model" in r.error_line()
    r = run_cli("build", model, "--target", "rpi4", "--plan", tmp_path / "plan.yaml", "--calib", calib,
                "--out", tmp_path / "y")
    assert r.code == 2 and "is for target host-cpu" in r.error_line()


def test_quantization_hostile_layer_is_planned_in_float(tmp_path: Path) -> None:
    from test_sensitivity import _hostile_model

    model = _hostile_model(tmp_path / "hostile.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32))
    r = run_cli("plan", model, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "int8",
                "--calib", calib, "--out", tmp_path / "plan.yaml", *QUICK)
    assert r.code == 0, r.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    (ap,) = plan["artifacts"]
    floats = ap["quantization"]["exclude_nodes"]
    assert floats and floats[0] == "hostile" and len(floats) <= 2  # the hostile layer first, few others
    assert any("mixed precision" in reason for reason in ap["reasons"])
    (chosen,) = [c for c in plan["candidates"] if c["chosen"]]
    assert chosen["float_nodes"] == len(floats) and chosen["verdict"] == "ok"
    # Uniform INT8 misses what the plan meets: build it and see it rejected.
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "int8",
                "--calib", calib, "--out", tmp_path / "uniform", *QUICK, "--no-memory")
    assert r.code == 1
    r = run_cli("build", model, "--target", "host-cpu", "--plan", tmp_path / "plan.yaml", "--calib", calib,
                "--out", tmp_path / "mixed", *QUICK, "--no-memory")
    assert r.code == 0, r.stderr
    assert read_manifest(tmp_path / "mixed")["artifacts"][0]["details"]["excluded_nodes"] == floats
