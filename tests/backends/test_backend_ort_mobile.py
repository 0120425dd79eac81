"""ort-mobile: the ONNX Runtime backend's ONNX converted to ORT format by onnxruntime's own converter,
with the reduced-operator config; real converter and runtime, the bundled model through the real CLI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli
from onnx import helper, numpy_helper

from edgekit import backends
from edgekit.backends.base import Artifact

PRECISIONS = ("fp32", "int8")


@pytest.fixture(scope="module")
def package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # onnxruntime is built in the same run from the same data: its model.onnx is the ONNX each .ort
    # must be a conversion of (same quantizer, same settings, same calibration samples).
    out = tmp_path_factory.mktemp("ortm") / "pkg"
    r = run_cli("build", BUNDLED_ONNX, "--target", "android-arm64", "--backend", "ort-mobile,onnxruntime",
                "--precision", "fp32,int8", "--calib", defects_data / "calib", "--val", defects_data / "val",
                "--preprocess", BUNDLED_PREPROCESS, "--out", out, *FAST)
    assert r.code == 0, r.stderr[-4000:]
    return out


def _artifact(manifest: dict, key: str) -> dict:
    return next(a for a in manifest["artifacts"] if a["key"] == key)


def _config_ops(path: Path) -> dict[str, set[str]]:
    """domain -> op types, read as the format says (`domain;opset[,opset];Op1,Op2`, '#' comments)."""
    ops: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, _, names = line.split(";")
            ops.setdefault(domain, set()).update(names.split(","))
    return ops


def _ort_graph_ops(path: Path) -> Counter:
    """Op types of the graph stored in an ORT format file, read with onnxruntime's flatbuffer schema."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs

    graph = fbs.InferenceSession.InferenceSession.GetRootAs(path.read_bytes(), 0).Model().Graph()
    nodes = (graph.Nodes(i) for i in range(graph.NodesLength()))
    return Counter((n.Domain().decode() or "ai.onnx", n.OpType().decode()) for n in nodes)


def test_artifacts_are_ort_files_with_config_and_pass_verification(package: Path) -> None:
    m = read_manifest(package)
    assert m["passed"]
    for p in PRECISIONS:
        a = _artifact(m, f"ort-mobile-{p}")
        assert a["entry"] == f"ort-mobile-{p}/model.ort"
        assert sorted(f["path"] for f in a["files"]) == [f"ort-mobile-{p}/model.ort",
                                                         f"ort-mobile-{p}/required_operators.config"]
        assert (package / a["entry"]).read_bytes()[4:8] == b"ORTM"  # ORT format flatbuffer identifier
        d = a["details"]
        assert d["optimization_style"] == "Runtime" and d["target_platform"] == "arm"
        assert d["ort_version"] == ort.__version__
        assert d["config"] == "required_operators.config"
        assert d["runtime_options"] == {"session.enable_saved_runtime_optimizations": "1"}
        assert "--minimal_build extended --include_ops_by_config required_operators.config" in d["reduced_build"]
        assert "onnxruntime-android" in d["app_runtime"] and "onnxruntime-mobile" in d["app_runtime"]
        assert a["verification"]["passed"]
        assert a["latency_ms"]["p50"] > 0 and a["latency_ms"]["where"] != "estimate"
    fp32 = _artifact(m, "ort-mobile-fp32")["verification"]
    assert fp32["cosine_min"] >= 0.9999
    int8 = _artifact(m, "ort-mobile-int8")["verification"]
    assert int8["reference_accuracy"] - int8["accuracy"] <= 0.01  # within 1 point of FP32
    assert _artifact(m, "ort-mobile-int8")["details"]["quantizer"] == "onnxruntime.quantization.quantize_static"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_config_lists_exactly_the_ops_the_model_uses(package: Path, precision: str) -> None:
    root = package / f"ort-mobile-{precision}"
    config = _config_ops(root / "required_operators.config")
    onnx_ops = {n.op_type for n in onnx.load(package / f"onnxruntime-{precision}" / "model.onnx").graph.node}
    # The stored graph is the ONNX graph, standard ops only: nothing fused for this machine's CPU.
    stored = _ort_graph_ops(root / "model.ort")
    assert {domain for domain, _ in stored} == {"ai.onnx"}
    assert {op for _, op in stored} == onnx_ops
    # The config adds exactly what the CPU EP's saved runtime optimizations create on the device.
    if precision == "fp32":
        assert config == {"ai.onnx": onnx_ops, "com.microsoft": {"FusedConv"}}  # Conv + Relu
    else:
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= onnx_ops
        # NHWC QLinearConv takes a Transpose at each layout boundary.
        assert config["ai.onnx"] == onnx_ops | {"Transpose"}
        fused = {"QLinear" + op for op in onnx_ops & {"Conv", "Add", "AveragePool", "GlobalAveragePool"}}
        assert config["com.microsoft"] == fused | {"QGemm"}
        assert set(config) == {"ai.onnx", "com.microsoft"}
    details = read_manifest(package)
    recorded = _artifact(details, f"ort-mobile-{precision}")["details"]["operators"]
    assert {k: set(v) for k, v in recorded.items()} == config


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ort_file_outputs_equal_the_onnx_in_onnxruntime(package: Path, precision: str) -> None:
    m = read_manifest(package)
    a = _artifact(m, f"ort-mobile-{precision}")
    art = Artifact("ort-mobile", precision, str(package / f"ort-mobile-{precision}"), [], "model.ort", a["details"])
    feeds = {"image": np.random.default_rng(3).standard_normal((1, 3, 96, 96)).astype(np.float32)}
    onnx_session = ort.InferenceSession(str(package / f"onnxruntime-{precision}" / "model.onnx"),
                                        providers=["CPUExecutionProvider"])
    expected = onnx_session.run(None, feeds)[0]
    got = backends.get("ort-mobile").load(art, 1).run(feeds)[0]  # runtime optimizations replayed
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The stored graph alone (a runtime without replay, or another EP) computes the same; INT8 then
    # runs Q/DQ in float, whose rounding differs from the integer kernels by a few output steps.
    plain = ort.InferenceSession(str(package / a["entry"]), providers=["CPUExecutionProvider"])
    step = _output_scale(package / f"onnxruntime-{precision}" / "model.onnx") if precision == "int8" else 0.0
    np.testing.assert_allclose(plain.run(None, feeds)[0], expected, rtol=1e-5, atol=1e-5 + 4 * step)


def _output_scale(path: Path) -> float:
    """The quantization step of a Q/DQ model's output (its last DequantizeLinear's scale)."""
    model = onnx.load(path)
    last = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    assert last.op_type == "DequantizeLinear"
    scale = next(i for i in model.graph.initializer if i.name == last.input[1])
    return float(numpy_helper.to_array(scale))


def test_backend_all_on_android_includes_ort_mobile(defects_data: Path, tmp_path: Path) -> None:
    r = run_cli("build", BUNDLED_ONNX, "--target", "android-arm64", "--backend", "all", "--precision", "fp32",
                "--calib", defects_data / "calib", "--preprocess", BUNDLED_PREPROCESS, "--out", tmp_path / "pkg",
                *FAST)
    assert r.code == 0, r.stderr[-4000:]
    usable = {"ncnn", "ort-mobile", "onnxruntime"} - {n for n in ("ncnn",) if backends.get(n).missing()}
    assert {a["backend"] for a in read_manifest(tmp_path / "pkg")["artifacts"]} == usable
    assert "ort-mobile" in r.stdout


def test_fp16_is_refused_naming_the_backend(defects_data: Path, tmp_path: Path) -> None:
    r = run_cli("build", BUNDLED_ONNX, "--target", "android-arm64", "--backend", "ort-mobile", "--precision", "fp16",
                "--calib", defects_data / "calib", "--out", tmp_path / "pkg")
    assert r.code == 2
    assert "ort-mobile cannot build fp16" in r.error_line()


def test_unsupported_nodes_are_the_onnxruntime_cpu_kernels() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MagicNMS", ["r"], ["y"], name="vendor_nms", domain="com.vendor")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.vendor", 1)])
    issues = backends.get("ort-mobile").unsupported_nodes(model)
    assert [(i.backend, i.op_type, i.node) for i in issues] == [("ort-mobile", "MagicNMS", "vendor_nms")]
