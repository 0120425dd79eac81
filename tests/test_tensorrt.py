"""TensorRT without a GPU: the Q/DQ ONNX follows TensorRT's rules and is verified in ONNX Runtime,
build_engine.sh holds the right trtexec call per TensorRT version, trtexec's summary parses, and the
engine-build code path says plainly that it needs a GPU."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli
from onnx import TensorProto, numpy_helper
from test_backend_onnxruntime import _calib, _conv_model, _mk

from edgekit import backends
from edgekit.backends import tensorrt_build
from edgekit.backends.tensorrt import EngineSettings, parse_trtexec, trtexec_command
from edgekit.ingest import ingest
from edgekit.plan import ArtifactPlan, QuantizationSettings
from edgekit.targets import load_target

TRT = backends.get("tensorrt")
NO_GPU = tensorrt_build.tensorrt_version() is None or tensorrt_build.gpu_facts() is None


def check_tensorrt_qdq_rules(model: onnx.ModelProto) -> int:
    """TensorRT's explicit-quantization rules, walked over the graph; returns the quantized layers."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13

    def zero_point_is_int8_zero(node: onnx.NodeProto) -> None:
        assert len(node.input) == 3, f"{node.name}: zero point missing (TensorRT needs int8 zero points)"
        zp = inits[node.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), node.name

    for node in model.graph.node:  # every Q/DQ is symmetric int8
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point_is_int8_zero(node)
    quantized = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            x, w = producer.get(node.input[0]), producer.get(node.input[1])
            assert x is not None and x.op_type == "DequantizeLinear", f"{node.name}: activation input not Q/DQ"
            assert numpy_helper.to_array(inits[x.input[1]]).size == 1, f"{node.name}: activation scale per-tensor"
            assert w is not None and w.op_type == "DequantizeLinear", f"{node.name}: weight not Q/DQ"
            weights = inits[w.input[0]]
            assert weights.data_type == TensorProto.INT8
            scales = numpy_helper.to_array(inits[w.input[1]])
            axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
            out_axis = 1 if node.op_type == "ConvTranspose" else 0
            assert axis == out_axis and scales.size == weights.dims[out_axis], f"{node.name}: per-output-channel"
            assert np.abs(numpy_helper.to_array(weights)).max() <= 127  # [-127, 127]: symmetric
            quantized += 1
        if node.op_type == "Add" and not set(node.input) & set(inits):
            feeding = [producer.get(i) for i in node.input]
            if all(f is not None and f.op_type not in ("Constant",) for f in feeding):
                assert all(f.op_type == "DequantizeLinear" for f in feeding), f"residual {node.name}: both inputs Q/DQ"
    return quantized


def _settings(target: str, **kw) -> EngineSettings:
    return EngineSettings.for_target(load_target(target), **kw)


def test_qdq_for_tensorrt_follows_the_rules_and_agrees(tmp_path: Path) -> None:
    spec = ingest(str(BUNDLED_ONNX), tmp_path / "w")
    from edgekit.data import Preprocess, prepare_data
    from edgekit.zoo.defects_data import generate

    data_dir = generate(tmp_path / "d", n_train=0, n_calib=64, n_val=64)
    data = prepare_data(spec, str(data_dir / "calib"), str(data_dir / "val"), Preprocess.from_file(BUNDLED_PREPROCESS))
    for target, float_regions in (("jetson-orin-nano", TensorProto.FLOAT16), ("jetson-xavier-nx", TensorProto.FLOAT)):
        plan = ArtifactPlan("tensorrt", "int8", QuantizationSettings(samples=64, symmetric_activations=True),
                            options=TRT.plan_options(load_target(target)))
        art = TRT.export(spec, plan, data.calibration, _mk(tmp_path / target))
        model = onnx.load(art.entry_path)
        assert check_tensorrt_qdq_rules(model) == 14  # 13 convs + the classifier Gemm
        residual_adds = [n for n in model.graph.node if n.op_type == "Add"]
        assert len(residual_adds) == 4
        # TensorRT 10 builds strongly typed: the graph carries FP16 outside Q/DQ; 8.x lowers it itself.
        floats = {i.data_type for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT,
                                                                                 TensorProto.FLOAT16)}
        assert floats == {float_regions}, (target, floats)
        assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the app feeds float32
        from edgekit.verify import Thresholds, compare, run_all

        batches = data.validation.batches(spec)
        ort = backends.get("onnxruntime")
        ref = run_all(ort.load(ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None,
                                          _mk(tmp_path / f"ref-{target}")), 1), batches)
        v = compare(ref, run_all(TRT.load(art, 1), batches), ["output"], data.validation.batch_labels(spec),
                    Thresholds())
        assert v.passed and v.cosine_min > 0.99, (target, v.failures)
        script = (Path(art.root) / "build_engine.sh").read_text()
        assert ("--stronglyTyped" in script) == (target == "jetson-orin-nano")
        assert ("--int8 --fp16" in script) == (target == "jetson-xavier-nx")


def test_trtexec_commands_follow_the_tensorrt_version() -> None:
    nano = trtexec_command(_settings("jetson-nano"), "fp16")
    assert "--fp16" in nano and "--workspace=1024" in nano and "--stronglyTyped" not in nano  # TRT 8.2
    orin = trtexec_command(_settings("jetson-orin-nano"), "int8")
    assert "--stronglyTyped" in orin and "--int8" not in orin and "--memPoolSize=workspace:2048" in orin
    xavier = trtexec_command(_settings("jetson-xavier-nx", dla_core=1), "int8")
    assert xavier[-4:] == ["--int8", "--fp16", "--useDLACore=1", "--allowGPUFallback"]
    kept = trtexec_command(_settings("jetson-orin-nano"), "fp16", ["tiny_conv"])
    assert "--layerPrecisions=tiny_conv:fp32" in kept and "--precisionConstraints=obey" in kept
    with pytest.raises(Exception, match="no INT8"):
        trtexec_command(_settings("jetson-nano"), "int8")
    with pytest.raises(Exception, match="DLA"):
        _settings("jetson-orin-nano", dla_core=0)  # Orin Nano has no DLA


def test_fp16_keeps_out_of_range_layers_and_simulated_fp16_agrees(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx", weight_scale=1e-8)), tmp_path / "w")
    plan = ArtifactPlan("tensorrt", "fp16", options=TRT.plan_options(load_target("jetson-orin-nano")))
    art = TRT.export(spec, plan, None, _mk(tmp_path / "a"))
    assert art.details["keep_fp32"] == ["tiny_conv"]
    assert "--layerPrecisions=tiny_conv:fp32" in (Path(art.root) / "build_engine.sh").read_text()
    assert {"model.onnx", "build_engine.sh", "build_engine.py", "engine.json"} <= set(art.files)
    from edgekit.verify import Thresholds, compare, run_all

    ort = backends.get("onnxruntime")
    batches = _calib(8).batches(spec)
    ref = run_all(ort.load(ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, _mk(tmp_path / "r")), 1),
                  batches)
    assert compare(ref, run_all(TRT.load(art, 1), batches), ["y"], None, Thresholds()).cosine_min > 0.999
    # TensorRT 8.2's trtexec has no per-layer precision: the script says so and uses the Python API.
    old = TRT.export(spec, ArtifactPlan("tensorrt", "fp16", options=TRT.plan_options(load_target("jetson-nano"))),
                     None, _mk(tmp_path / "nano"))
    assert old.details["trtexec"] is None and any("8.4" in n for n in old.notes)
    assert "--keep-fp32 tiny_conv" in (Path(old.root) / "build_engine.sh").read_text()


TRTEXEC_10 = """\
[11/23/2026-10:00:01] [I] === Performance summary ===
[11/23/2026-10:00:01] [I] Throughput: 1052.31 qps
[11/23/2026-10:00:01] [I] Latency: min = 0.912598 ms, max = 1.60547 ms, mean = 0.947266 ms, median = 0.94043 ms, \
percentile(90%) = 0.960938 ms, percentile(95%) = 0.972656 ms, percentile(99%) = 1.05078 ms
[11/23/2026-10:00:01] [I] Enqueue Time: min = 0.0183 ms, max = 0.0622 ms, mean = 0.0207 ms, median = 0.0201 ms, \
percentile(90%) = 0.0227 ms, percentile(95%) = 0.0239 ms, percentile(99%) = 0.0295 ms
[11/23/2026-10:00:01] [I] H2D Latency: min = 0.0151 ms, max = 0.0293 ms, mean = 0.0163 ms, median = 0.0161 ms, \
percentile(90%) = 0.0171 ms, percentile(95%) = 0.0176 ms, percentile(99%) = 0.0212 ms
[11/23/2026-10:00:01] [I] GPU Compute Time: min = 0.8 ms, max = 1.4 ms, mean = 0.85 ms, median = 0.84 ms, \
percentile(90%) = 0.86 ms, percentile(95%) = 0.87 ms, percentile(99%) = 0.95 ms
[11/23/2026-10:00:01] [I] D2H Latency: min = 0.006 ms, max = 0.01 ms, mean = 0.007 ms, median = 0.007 ms, \
percentile(90%) = 0.008 ms, percentile(95%) = 0.008 ms, percentile(99%) = 0.009 ms
[11/23/2026-10:00:01] [I] Total Host Walltime: 3.00171 s
[11/23/2026-10:00:01] [I] Total GPU Compute Time: 2.68 s
"""

TRTEXEC_80 = """\
[I] Host Latency: min = 5.9 ms, max = 9.1 ms, mean = 6.2 ms, median = 6.1 ms, percentile: 8.4 ms at 99%
[I] Latency: min = 5.2 ms, max = 7.9 ms, mean = 5.5 ms, median = 5.4 ms, percentile: 7.1 ms at 99%
[I] GPU Compute Time: min = 5.1 ms, max = 7.8 ms, mean = 5.4 ms, median = 5.3 ms, percentile: 7.0 ms at 99%
"""


def test_trtexec_summary_parses_into_a_measurement() -> None:
    s = parse_trtexec("[I] Timing trace has 3157 queries over 3.00171 s\n" + TRTEXEC_10)
    assert s.throughput_qps == pytest.approx(1052.31) and s.queries == 3157
    assert s.latency["median"] == pytest.approx(0.94043) and s.latency["p95"] == pytest.approx(0.972656)
    assert s.gpu_compute == {"min": 0.8, "max": 1.4, "mean": 0.85, "median": 0.84, "p90": 0.86, "p95": 0.87,
                             "p99": 0.95}
    rec = s.to_latency_record("ssh://nvidia@orin:22")
    assert rec["p50"] == 0.84 and rec["p99"] == 0.95 and rec["runs"] == 3157 and rec["where"].startswith("ssh://")
    old = parse_trtexec(TRTEXEC_80)
    assert old.gpu_compute["p99"] == 7.0 and old.latency["median"] == 5.4
    with pytest.raises(Exception, match="no latency"):
        parse_trtexec("[E] Engine deserialization failed").to_latency_record("x")


def test_engine_builder_is_python36_and_says_what_needs_a_gpu(tmp_path: Path) -> None:
    ast.parse(Path(tensorrt_build.__file__).read_text(), feature_version=(3, 6))  # JetPack 4.6's python3
    if not NO_GPU:
        pytest.skip("this machine has TensorRT and a GPU: the engine is really built in the build tests")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        tensorrt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "fp16", 256)
    script = tmp_path / "build_engine.py"  # as the package ships it
    script.write_text(Path(tensorrt_build.__file__).read_text())
    r = subprocess.run([sys.executable, script, "--onnx", "m.onnx", "--engine", "m.engine", "--precision", "fp16"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 3 and "needs an NVIDIA GPU" in r.stderr


def test_build_for_jetson_orin_nano_int8_and_nano_fp16(defects_data: Path, tmp_path: Path) -> None:
    common = ["--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS,
              "--val-samples", "100", *FAST]
    r = run_cli("build", BUNDLED_ONNX, "--target", "jetson-orin-nano", "--precision", "int8", "--out",
                tmp_path / "orin", *common)
    assert r.code == 0, r.stderr
    m = read_manifest(tmp_path / "orin")
    (a,) = m["artifacts"]
    assert a["key"] == "tensorrt-int8" and a["verification"]["passed"]
    assert {f["path"] for f in a["files"]} >= {"tensorrt-int8/model.onnx", "tensorrt-int8/build_engine.sh"}
    assert check_tensorrt_qdq_rules(onnx.load(tmp_path / "orin" / a["entry"])) == 14
    if NO_GPU:
        assert a["latency_ms"]["where"] == "estimate" and a["latency_ms"]["p50"] > 0
        assert a["speedup_vs_onnxruntime_fp32"] is None  # an estimate for Orin vs a measurement here
        assert any("cost-model estimate" in n for n in a["notes"])
        assert any("needs an NVIDIA GPU" in n for n in a["notes"])
        assert "est." in r.stdout
    assert m["toolchain"]["tensorrt"]
    engine = (tmp_path / "orin" / "tensorrt-int8" / "engine.json").read_text()
    assert '"tensorrt": "10.3"' in engine and '"compute_capability": "8.7"' in engine

    r = run_cli("build", BUNDLED_ONNX, "--target", "jetson-nano", "--out", tmp_path / "nano", *common)
    assert r.code == 0, r.stderr
    m = read_manifest(tmp_path / "nano")
    assert [a["key"] for a in m["artifacts"]] == ["tensorrt-fp16"]
    assert any("no INT8 for jetson-nano" in reason and "sm_53" in reason for reason in m["plan_reasons"])
    assert "--fp16" in (tmp_path / "nano" / "tensorrt-fp16" / "build_engine.sh").read_text()


def test_tensorrt_op_check_names_the_node(tmp_path: Path) -> None:
    m = onnx.load(_conv_model(tmp_path / "m.onnx"))
    m.graph.node.append(onnx.helper.make_node("MagicNMS", ["y"], ["z"], name="vendor_nms", domain="com.vendor"))
    issues = TRT.unsupported_nodes(m)
    assert [(i.op_type, i.node) for i in issues] == [("MagicNMS", "vendor_nms")]
    assert "plugin" in str(issues[0])


def test_device_measurement_of_a_tensorrt_artifact_uses_trtexec_gpu_compute_time() -> None:
    from types import SimpleNamespace

    from edgekit.remote.profile import _latencies

    device = SimpleNamespace(where="ssh://nvidia@orin:22")
    out = {"conditions": {"power_mode": "15W"}, "results": {"tensorrt-int8": {
        "p50": 0.95, "p90": 1.0, "p99": 1.2, "mean": 0.96, "min": 0.9, "runs": 3157, "threads": 1,
        "trtexec_output": TRTEXEC_10}}}
    rec = _latencies(device, out)["tensorrt-int8"]
    assert (rec["p50"], rec["p99"], rec["runs"]) == (0.84, 0.95, 3157)  # GPU Compute Time, runs from the trace
    assert rec["trtexec"]["throughput_qps"] == pytest.approx(1052.31) and rec["where"] == device.where
