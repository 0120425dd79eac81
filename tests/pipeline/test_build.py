"""`edgekit build` end to end, through the CLI a user runs, on real runtimes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli

from edgekit.packaging.manifest import validate_manifest
from edgekit.zoo.defects_data import CLASSES


@pytest.fixture(scope="module")
def bundled_build(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("b") / "defectnet"
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--precision", "fp32,fp16,int8",
                "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS,
                "--out", out, "--profile-seconds", "0.3", "--min-runs", "20")
    assert r.code == 0, r.stderr
    return out, r


def test_bundled_int8_is_small_and_accurate(bundled_build) -> None:
    out, _ = bundled_build
    m = read_manifest(out)
    arts = {a["precision"]: a for a in m["artifacts"]}
    fp32, fp16, int8 = arts["fp32"], arts["fp16"], arts["int8"]
    assert int8["bytes"] <= 0.30 * fp32["bytes"]
    v = int8["verification"]
    assert v["samples"] == 400 and v["passed"]
    assert v["reference_accuracy"] >= 0.90  # the bundled model is a real, trained classifier
    assert (v["reference_accuracy"] - v["accuracy"]) * 100 <= 1.0
    assert fp16["verification"]["cosine_min"] >= 0.999
    assert fp32["verification"]["snr_db_min"] >= 100  # the FP32 artifact is the reference itself


def test_manifest_schema_and_fields(bundled_build) -> None:
    out, _ = bundled_build
    m = read_manifest(out)
    validate_manifest(m)
    assert m["schema"] == "edgekit-manifest/1" and m["target"] == "host-cpu" and m["passed"]
    assert m["source"]["sha256"] == hashlib.sha256(BUNDLED_ONNX.read_bytes()).hexdigest()
    assert m["source"]["params"] > 300_000 and m["source"]["macs"] > 0
    assert m["inputs"][0]["shape"] == [1, 3, 96, 96] and m["outputs"][0]["shape"] == [1, len(CLASSES)]
    assert m["preprocess"]["size"] == [96, 96] and m["labels"] == list(CLASSES)
    for a in m["artifacts"]:
        for f in a["files"]:
            data = (out / f["path"]).read_bytes()
            assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
        lat, ref = a["latency_ms"], a["reference_latency_ms"]
        assert lat["runs"] >= 20 and lat["runs"] == ref["runs"]  # interleaved: same number of rounds
        assert lat["p50"] <= lat["p90"] <= lat["p99"] and lat["threads"] == len(os.sched_getaffinity(0))
        assert lat["where"].startswith("local:")
        assert a["peak_memory_mb"] is not None and a["peak_memory_mb"] > 0
    assert (out / "report.md").read_text().count("| onnxruntime |") == 3
    assert (out / "labels.txt").read_text().split() == list(CLASSES)
    assert not list(out.parent.glob(".defectnet*"))  # no staging left behind


def test_console_table(bundled_build) -> None:
    _, r = bundled_build
    for word in ("precision", "bytes", "p50 ms", "speedup", "accuracy", "int8", "fp16", "fp32"):
        assert word in r.stdout


def test_opset11_dynamic_mobile_model_builds_int8(mobilenet_opset11: Path, mobilenet_npz: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    r = run_cli("build", mobilenet_opset11, "--target", "host-cpu", "--precision", "int8",
                "--calib", mobilenet_npz, "--input-shape", "images=1,3,64,64", "--out", out, *FAST)
    assert r.code == 0, r.stderr
    m = read_manifest(out)
    (a,) = m["artifacts"]
    assert a["precision"] == "int8" and a["verification"]["passed"] and a["verification"]["cosine_min"] > 0.99
    assert m["source"]["opset"] == 11 and any("opset 11 -> 17" in n for n in m["source"]["notes"])


def test_rejected_artifact_exits_1_and_leaves_no_package(mobilenet_opset11: Path, mobilenet_npz: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    r = run_cli("build", mobilenet_opset11, "--target", "host-cpu", "--precision", "int8",
                "--calib", mobilenet_npz, "--input-shape", "images=1,3,64,64", "--min-snr-db", "150",
                "--strict-tensors", "--recover", "none", "--out", out, *FAST)
    assert r.code == 1
    assert "rejected onnxruntime int8" in r.stderr and "SNR" in r.stderr
    assert not out.exists()
    m = read_manifest(tmp_path / "pkg.rejected")
    assert m["passed"] is False and m["artifacts"][0]["verification"]["failures"]


def test_jetson_nano_refuses_int8_and_auto_picks_fp16(mobilenet_opset11: Path, mobilenet_npz: Path,
                                                      tmp_path: Path) -> None:
    r = run_cli("build", mobilenet_opset11, "--target", "jetson-nano", "--precision", "int8",
                "--calib", mobilenet_npz, "--input-shape", "images=1,3,64,64", "--out", tmp_path / "a", *FAST)
    assert r.code == 2 and "does not support int8" in r.error_line()
    r = run_cli("build", mobilenet_opset11, "--target", "jetson-nano", "--calib", mobilenet_npz,
                "--input-shape", "images=1,3,64,64", "--out", tmp_path / "b", *FAST)
    assert r.code == 0, r.stderr
    m = read_manifest(tmp_path / "b")
    assert [a["precision"] for a in m["artifacts"]] == ["fp16"]
    assert any("no INT8 for jetson-nano" in reason for reason in m["plan_reasons"])
    a = m["artifacts"][0]
    assert a["backend"] == "tensorrt"
    if a["latency_ms"]["where"] == "estimate":  # honest about where: no GPU here
        assert any("cost-model estimate for jetson-nano" in n for n in a["notes"])
    else:
        assert any("not on jetson-nano" in n for n in a["notes"])


# ---------------------------------------------------------------- bad input


def _bad(tmp_path: Path, *args: str | Path) -> str:
    out = tmp_path / "out"
    r = run_cli("build", *args, "--out", out, *FAST)
    assert r.code == 2, r.stdout + r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")), "a failed build left files"
    return r.error_line()


def test_bad_inputs_give_one_line_and_no_output(tmp_path: Path, mobilenet_opset11: Path, defects_data: Path,
                                                mobilenet_npz: Path) -> None:
    common = ["--target", "host-cpu", "--calib", str(defects_data / "calib"), "--preprocess", str(BUNDLED_PREPROCESS)]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(BUNDLED_ONNX.read_bytes()[:5000])
    assert "not a readable ONNX model" in _bad(tmp_path, truncated, *common)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(os.urandom(4096))
    assert "corrupt.onnx" in _bad(tmp_path, corrupt, *common)
    assert "model file not found" in _bad(tmp_path, tmp_path / "missing.onnx", *common)
    line = _bad(tmp_path, BUNDLED_ONNX, "--target", "jetson-nanoo", "--calib", defects_data / "calib")
    assert "unknown target 'jetson-nanoo'" in line and "rpi4" in line
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((8, 3, 64, 64), np.float32))
    line = _bad(tmp_path, BUNDLED_ONNX, "--target", "host-cpu", "--calib", wrong)
    assert "[3, 64, 64]" in line and "[1, 3, 96, 96]" in line
    pre = tmp_path / "pre.yaml"
    pre.write_text("size: [96, 96]\nresize: stretch\nnormalize: true\n")
    assert "unknown key 'normalize'" in _bad(tmp_path, BUNDLED_ONNX, "--target", "host-cpu",
                                             "--calib", defects_data / "calib", "--preprocess", pre)
    line = _bad(tmp_path, mobilenet_opset11, "--target", "host-cpu", "--calib", mobilenet_npz)
    assert "dynamic dimensions" in line and "--input-shape images=" in line


def test_existing_output_folder_needs_force(tmp_path: Path, mobilenet_opset11: Path, mobilenet_npz: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("previous package")
    args = [mobilenet_opset11, "--target", "host-cpu", "--precision", "fp32", "--calib", mobilenet_npz,
            "--input-shape", "images=1,3,64,64", "--out", out, *FAST]
    r = run_cli("build", *args)
    assert r.code == 2 and "exists" in r.error_line() and "--force" in r.error_line()
    assert (out / "keep.txt").exists()
    # a --force build that fails on bad input leaves the previous folder untouched
    bad = run_cli("build", mobilenet_opset11, "--target", "host-cpu", "--calib", mobilenet_npz,
                  "--input-shape", "images=1,3,32,32", "--out", out, "--force", *FAST)
    assert bad.code == 2 and (out / "keep.txt").exists()
    # --force replaces only what edgekit wrote: a folder of the user's files stays, even with --force
    r = run_cli("build", *args, "--force")
    assert r.code == 2 and "--force replaces only" in r.error_line() and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert run_cli("build", *args, "--force").code == 0  # an empty folder is replaced
    first = read_manifest(out)
    r = run_cli("build", *args, "--force")  # and so is a package
    assert r.code == 0, r.stderr
    assert read_manifest(out)["passed"] and read_manifest(out)["created"] >= first["created"]


ALL_NINE = {(b, p) for b in ("onnxruntime", "openvino", "ncnn") for p in ("fp32", "fp16", "int8")}


def _check_every_artifact(m: dict, package: Path, model: Path) -> None:
    """All nine (backend, precision) pairs built; each verified (float: cosine and mean-centred cosine
    >= 0.999; INT8: within the thresholds), or rejected with the diverging layer named: a node of the
    model, the same one the per-layer table names."""
    assert {(a["backend"], a["precision"]) for a in m["artifacts"]} == ALL_NINE
    assert "failed_artifacts" not in m
    nodes = {n.name: n.op_type for n in onnx.load(model).graph.node}
    t = m["thresholds"]
    for a in m["artifacts"]:
        v = a["verification"]
        assert v["precision"] == a["precision"] and v["centred_cosine_min"] is not None, a["key"]
        if a["precision"] in ("fp32", "fp16"):
            assert v["passed"] and v["cosine_min"] >= 0.999 and v["centred_cosine_min"] >= 0.999, (a["key"], v)
        elif v["passed"] and v.get("task"):  # the task metric decided: within its budget, the tensors diagnostics
            assert v["task"]["drop_points"] <= v["task"]["max_drop"] and not v["integrity_failures"], (a["key"], v)
        elif v["passed"]:
            assert v["cosine_min"] >= t["min_cosine"] and v["snr_db_min"] >= t["min_snr_db"], (a["key"], v)
            assert v["centred_cosine_min"] >= t["min_centred_cosine"], (a["key"], v)
        else:
            d = v["diverging_layer"]
            assert d is not None and nodes.get(d["node"]) == d["op_type"], (a["key"], v)
            table = json.loads((package / "debug" / f"{a['key']}.json").read_text())
            assert table["first_divergence"]["node"] == d["node"]


def test_backend_all_builds_every_backend_into_one_package(defects_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "all", "--precision", "all",
                "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS,
                "--out", out, *FAST)
    package = out if r.code == 0 else tmp_path / "all.rejected"
    m = read_manifest(package)
    _check_every_artifact(m, package, BUNDLED_ONNX)
    for a in m["artifacts"]:
        v = a["verification"]
        assert v["samples"] == 400 and a["latency_ms"]["runs"] >= 10 and a["speedup_vs_onnxruntime_fp32"] > 0
        if a["precision"] == "int8" and v["passed"]:
            assert (v["reference_accuracy"] - v["accuracy"]) * 100 <= 1.0
    assert r.code == (0 if all(a["verification"]["passed"] for a in m["artifacts"]) else 1), r.stderr
    assert "vs ORT fp32" in r.stdout and "openvino" in r.stdout and "ncnn" in r.stdout
    assert m["reference"]["backend"] == "onnxruntime"


def _spread(model: Path, images: np.ndarray) -> list[float]:
    """Per output: std over samples (per element, averaged) / RMS. Near 0 = the output ignores its input."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outs = [np.concatenate(o) for o in zip(*(s.run(None, {"images": x[None]}) for x in images))]
    return [float(o.reshape(len(o), -1).std(axis=0).mean() / np.sqrt((o**2).mean())) for o in outs]


def test_test_models_depend_on_their_input(mobilenet_opset11: Path, mobilenet_npz: Path, tmp_path: Path) -> None:
    """The mobile and detector test models' outputs vary with the input as a trained model's do, so an
    INT8 conversion that loses the input-dependent part cannot pass (it did: spread 0.07%)."""
    from models import export_detector, tiny_detector

    (mobile,) = _spread(mobilenet_opset11, np.load(mobilenet_npz)["images"][:32])
    assert mobile > 0.5, mobile
    det = export_detector(tiny_detector(), tmp_path / "det.onnx", opset=12)
    scores, boxes = _spread(det, np.random.default_rng(3).uniform(-1, 1, (32, 3, 96, 96)).astype(np.float32))
    assert scores > 0.2 and boxes > 0.5, (scores, boxes)


def test_detector_style_model_through_every_backend(tmp_path: Path) -> None:
    from models import export_detector, tiny_detector

    src = export_detector(tiny_detector(), tmp_path / "det12.onnx", opset=12)
    rng = np.random.default_rng(0)
    calib, val = tmp_path / "calib.npz", tmp_path / "val.npz"
    np.savez(calib, images=rng.uniform(-1, 1, (80, 3, 96, 96)).astype(np.float32))
    np.savez(val, images=rng.uniform(-1, 1, (48, 3, 96, 96)).astype(np.float32))
    out = tmp_path / "det"
    r = run_cli("build", src, "--target", "host-cpu", "--backend", "all", "--precision", "all", "--calib", calib,
                "--val", val, "--input-shape", "images=1,3,96,96", "--out", out, *FAST)
    package = out if r.code == 0 else tmp_path / "det.rejected"
    m = read_manifest(package)
    for a in m["artifacts"]:
        assert [o["name"] for o in a["verification"]["outputs"]] == ["scores", "boxes"]
        assert a["verification"]["samples"] == 48
        if a["precision"] == "fp16":  # its folded BatchNorms leave ~1e-8 biases: harmless, nothing kept FP32
            assert a["details"]["keep_fp32"] == [], (a["key"], a["notes"])
    _check_every_artifact(m, package, src)
    assert r.code == (0 if all(a["verification"]["passed"] for a in m["artifacts"]) else 1), r.stderr


def test_all_ships_what_verifies_and_lists_the_rest(defects_data: Path, tmp_path: Path) -> None:
    """--precision all = everything the target can do, verified: an artifact that misses the thresholds is
    listed with its reason and not shipped; the build exits 0 with the others. --strict: all or nothing."""
    args = ["build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "all",
            "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS,
            "--val-samples", "100", "--min-snr-db", "60", "--strict-tensors", "--recover", "none", *FAST]
    r = run_cli(*args, "--out", tmp_path / "pkg")
    assert r.code == 0, r.stderr
    m = read_manifest(tmp_path / "pkg")
    assert m["passed"] and [a["key"] for a in m["artifacts"]] == ["onnxruntime-fp32", "onnxruntime-fp16"]
    assert all(a["verification"]["passed"] for a in m["artifacts"])
    (failed,) = m["failed_artifacts"]
    assert failed["key"] == "onnxruntime-int8" and failed["stage"] == "verification"
    assert "SNR" in failed["error"] and failed["verification"]["passed"] is False
    assert not (tmp_path / "pkg" / "onnxruntime-int8").exists()
    assert (tmp_path / "pkg" / "debug" / "onnxruntime-int8.json").is_file()  # its diagnosis is kept
    assert "left out (rejected) onnxruntime-int8" in r.stderr
    r = run_cli(*args, "--strict", "--out", tmp_path / "strict")
    assert r.code == 1 and not (tmp_path / "strict").exists()
    m = read_manifest(tmp_path / "strict.rejected")
    assert not m["passed"] and "onnxruntime-int8" in [a["key"] for a in m["artifacts"]]


def test_one_backend_that_cannot_convert_does_not_lose_the_others(tmp_path: Path) -> None:
    """A step-2 slice over channels: ncnn has nothing for it (pnnx warns, leaves a layer ncnn cannot load).
    --backend all ships the ONNX Runtime and OpenVINO artifacts and lists ncnn's with its one-line reason;
    an explicit list naming ncnn stays all-or-nothing."""
    from models import export_channel_stride

    model, data = export_channel_stride(tmp_path / "m.onnx", 40)
    args = ["build", model, "--target", "host-cpu", "--precision", "fp32", "--calib", data, *FAST]
    r = run_cli(*args, "--backend", "all", "--out", tmp_path / "pkg")
    assert r.code == 0, r.stderr
    m = read_manifest(tmp_path / "pkg")
    assert [a["key"] for a in m["artifacts"]] == ["onnxruntime-fp32", "openvino-fp32"] and m["passed"]
    (failed,) = m["failed_artifacts"]
    assert failed["key"] == "ncnn-fp32" and failed["stage"] == "export"
    assert "Slice" in failed["error"] and ".partial-" not in failed["error"]  # no staging path in the reason
    assert "not built ncnn-fp32" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(*args, "--backend", "onnxruntime,ncnn", "--out", tmp_path / "explicit")
    assert r.code == 2 and "Slice" in r.error_line()
    assert not (tmp_path / "explicit").exists() and not (tmp_path / "explicit.rejected").exists()


def test_model_whose_output_ignores_the_input_is_not_verified(tmp_path: Path) -> None:
    import torch

    class Untrained(torch.nn.Module):  # a head initialised to zero: logits are exactly 0 for every image
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)
            torch.nn.init.zeros_(self.fc.weight)
            torch.nn.init.zeros_(self.fc.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.onnx.export(Untrained().eval(), (torch.randn(1, 3, 16, 16),), str(tmp_path / "m.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"])
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    r = run_cli("build", tmp_path / "m.onnx", "--target", "host-cpu", "--backend", "onnxruntime", "--precision",
                "fp32,int8", "--calib", tmp_path / "d.npz", "--out", tmp_path / "pkg", *FAST)
    assert r.code == 1, r.stderr
    m = read_manifest(tmp_path / "pkg.rejected")
    assert not any(a["verification"]["passed"] for a in m["artifacts"])
    assert all("degenerate" in a["verification"]["failures"][-1] for a in m["artifacts"])
    assert any("same output for every validation sample" in w for w in m["data"]["warnings"])
    assert not (tmp_path / "pkg").exists()
    # no recovery rung can mend a degenerate reference: none is tried (the ladder, QAT included, took a minute)
    (int8,) = [a for a in m["artifacts"] if a["precision"] == "int8"]
    assert [row["step"] for row in int8["quantization"]["recovery"]] == ["planned", "skipped"]
