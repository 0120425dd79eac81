"""TensorRT without a GPU: the Q/DQ ONNX follows TensorRT's rules and is verified in ONNX Runtime,
build_engine.sh holds the right trtexec call per TensorRT version, trtexec's summary parses, and the
engine-build code path says plainly that it needs a GPU.

NVIDIA's trtexec and nvidia-smi are absent here. write_fake_nvidia_tools() writes FAKE stand-ins (shell
scripts, named so) used only to test edgekit's own plumbing around them: build_engine.sh's reuse /
rebuild / refuse decisions, the device runner and the host's parsing. No TensorRT runs in these tests."""

from __future__ import annotations

import ast
import json
import os
import shutil
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
from edgekit.backends.tensorrt import build_engine as tensorrt_build
from edgekit.backends.tensorrt.engine import (
    EngineSettings,
    local_engine_blocker,
    parse_trtexec,
    timing_blocker,
    trtexec_command,
)
from edgekit.backends.tensorrt.qdq import strip_unused_opsets
from edgekit.ingest import ingest
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
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
        from edgekit.verify.verifier import Thresholds, run_all
        from edgekit.verify.verifier import verify_outputs as compare

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
    from edgekit.verify.verifier import Thresholds, run_all
    from edgekit.verify.verifier import verify_outputs as compare

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
    # auto precision says why not INT8 on the console, and in the artifact's notes
    said = [ln for ln in r.stderr.splitlines() if "no INT8 for TensorRT" in ln]
    assert said and "sm 5.3" in said[0] and "--precision fp16" in r.stderr, r.stderr
    assert any("no INT8 for TensorRT" in n for n in m["artifacts"][0]["notes"])
    assert "--fp16" in (tmp_path / "nano" / "tensorrt-fp16" / "build_engine.sh").read_text()


def test_tensorrt_op_check_names_the_node(tmp_path: Path) -> None:
    m = onnx.load(_conv_model(tmp_path / "m.onnx"))
    m.graph.node.append(onnx.helper.make_node("MagicNMS", ["y"], ["z"], name="vendor_nms", domain="com.vendor"))
    issues = TRT.unsupported_nodes(m)
    assert [(i.op_type, i.node) for i in issues] == [("MagicNMS", "vendor_nms")]
    assert "plugin" in str(issues[0])


def test_device_measurement_of_a_tensorrt_artifact_uses_trtexec_gpu_compute_time() -> None:
    from types import SimpleNamespace

    from edgekit.profiling.device import _latencies

    device = SimpleNamespace(where="ssh://nvidia@orin:22")
    out = {"conditions": {"power_mode": "15W"}, "results": {"tensorrt-int8": {
        "p50": 0.95, "p90": 1.0, "p99": 1.2, "mean": 0.96, "min": 0.9, "runs": 3157, "threads": 1,
        "trtexec_output": TRTEXEC_10}}}
    rec = _latencies(device, out)["tensorrt-int8"]
    assert (rec["p50"], rec["p99"], rec["runs"]) == (0.84, 0.95, 3157)  # GPU Compute Time, runs from the trace
    assert rec["trtexec"]["throughput_qps"] == pytest.approx(1052.31) and rec["where"] == device.where


# ---------------------------------------------------------------- FAKE NVIDIA tools (plumbing tests only)

PY36 = Path.home() / ".pyenv" / "versions" / "3.6.15" / "bin" / "python"
DEVICE_PYTHON = str(PY36) if PY36.exists() else sys.executable  # JetPack 4.6's python3 is 3.6

FAKE_TRTEXEC = r"""#!/bin/sh
# FAKE trtexec written by edgekit's tests: NVIDIA's tool is absent here, so this stands in for it only
# to test edgekit's plumbing. It prints trtexec's banner and, like TensorRT 10, its device information
# and performance summary; --saveEngine writes a (fake) engine file; every call is logged to LOG.
V=${FAKE_TRT_VERSION:-100300}
if [ "$V" -ge 10000 ]; then DOTTED="$((V / 10000)).$((V / 100 % 100)).$((V % 100))"
else DOTTED="$((V / 1000)).$((V / 100 % 10)).$((V % 100))"; fi
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$V] [b26] # trtexec $*"
echo "$*" >> "@LOG@"
SAVE= LOAD= TIMES=
for a in "$@"; do
  case "$a" in
    --help) echo "=== Model Options ==="; echo "  --onnx=<file>               ONNX model"; exit 0 ;;
    --saveEngine=*) SAVE=${a#--saveEngine=} ;;
    --loadEngine=*) LOAD=${a#--loadEngine=} ;;
    --exportTimes=*) TIMES=${a#--exportTimes=} ;;
  esac
done
T="[11/23/2026-10:00:00] [I]"
echo "$T === Device Information ==="
echo "$T Selected Device: Orin"
echo "$T Compute Capability: ${FAKE_GPU_CC:-8.7}"
echo "$T TensorRT version: $DOTTED"
if [ -n "$SAVE" ]; then
  printf 'FAKE-TENSORRT-ENGINE %s\n' "$*" > "$SAVE"
  echo "$T Engine built in 1.23 sec."
  echo "&&&& PASSED TensorRT.trtexec [TensorRT v$V] # trtexec $*"
  exit 0
fi
if [ -n "$LOAD" ]; then
  if ! grep -q FAKE-TENSORRT-ENGINE "$LOAD" 2>/dev/null; then
    echo "[E] Error[1]: IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion failed)"
    echo "&&&& FAILED TensorRT.trtexec [TensorRT v$V] # trtexec $*"; exit 1
  fi
  echo "$T Timing trace has 20 queries over 3.00171 s"
  cat <<'SUMMARY'
@SUMMARY@SUMMARY
  if [ -n "$TIMES" ]; then
    r='{"startEnqMs": 0.1, "endEnqMs": 0.12, "startComputeMs": 0.12, "endComputeMs": 0.96, "computeMs": 0.84, '
    printf '[%s"latencyMs": 0.94}' "$r" > "$TIMES"
    i=1; while [ $i -lt 20 ]; do printf ',%s"latencyMs": 0.9%s}' "$r" "$((i % 10))" >> "$TIMES"; i=$((i + 1)); done
    echo ']' >> "$TIMES"
  fi
  echo "&&&& PASSED TensorRT.trtexec [TensorRT v$V] # trtexec $*"
  exit 0
fi
echo "&&&& FAILED TensorRT.trtexec [TensorRT v$V] # trtexec $*"; exit 1
"""

FAKE_NVIDIA_SMI = r"""#!/bin/sh
# FAKE nvidia-smi written by edgekit's tests (no NVIDIA GPU here): answers edgekit's queries as an Orin.
case "$*" in
  *compute_cap*) echo "Orin (nvgpu), ${FAKE_GPU_CC:-8.7}" ;;
  *--query-gpu*) echo "Orin (nvgpu), 540.4.0, 7620 MiB" ;;
  *) echo "fake nvidia-smi" ;;
esac
"""


def write_fake_nvidia_tools(bin_dir: Path, log: Path) -> Path:
    """FAKE `trtexec` and `nvidia-smi` in bin_dir (see the module docstring); each trtexec call is a line
    in `log`. Returns bin_dir, to put first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC.replace("@LOG@", str(log)).replace("@SUMMARY@", TRTEXEC_10))
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    for tool in ("trtexec", "nvidia-smi"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def trtexec_calls(log: Path, kind: str) -> int:
    """How many fake-trtexec calls of one kind ("--saveEngine" builds, "--loadEngine" timings) ran."""
    return sum(kind in line for line in log.read_text().splitlines()) if log.exists() else 0


# ---------------------------------------------------------------- engine reuse and local builds


def test_trtexec_and_jetson_versions_parse() -> None:
    v = tensorrt_build.parse_trtexec_version
    assert v("&&&& RUNNING TensorRT.trtexec [TensorRT v8201] # trtexec --help") == "8.2.1"  # JetPack 4.6
    assert v("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b17] # trtexec") == "10.3.0"  # JetPack 6.1
    assert v("&&&& RUNNING TensorRT.trtexec [TensorRT v101602] [b10] # trtexec") == "10.16.2"
    assert v("[I] TensorRT version: 8.6.1\n&&&& RUNNING TensorRT.trtexec [TensorRT v8601]") == "8.6.1"
    assert v("no banner") is None
    compatible = "nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00"  # Orin Nano
    assert tensorrt_build.jetson_compute_capability(compatible) == "8.7"
    assert tensorrt_build.jetson_compute_capability("nvidia,p3450-0000\x00nvidia,tegra210\x00") == "5.3"  # Nano
    assert tensorrt_build.jetson_compute_capability("raspberrypi,5-model-b\x00brcm,bcm2712\x00") is None
    assert tensorrt_build.same_tensorrt("10.3.0.30", "10.3.0") and not tensorrt_build.same_tensorrt("10.3", "10.0")
    assert tensorrt_build.trtexec_flag_family("8.2.1") != tensorrt_build.trtexec_flag_family("8.6.1") \
        != tensorrt_build.trtexec_flag_family("10.3")


def test_engine_is_built_here_only_for_the_targets_gpu_and_tensorrt() -> None:
    orin, nano = _settings("jetson-orin-nano"), _settings("jetson-nano")  # TensorRT 10.3 sm 8.7 / 8.2.1 sm 5.3
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    orin_gpu = {"name": "Orin (nvgpu)", "compute_capability": "8.7"}
    assert "needs an NVIDIA GPU" in local_engine_blocker(None, None, orin)
    assert "needs an NVIDIA GPU" in local_engine_blocker("10.3.0", None, orin)
    why = local_engine_blocker("10.3.0", h100, orin)  # a datacenter GPU: its engine would not run on the Orin
    assert "sm 9.0" in why and "sm 8.7" in why and "would not run there" in why
    why = local_engine_blocker("10.5.0", orin_gpu, orin)
    assert "10.5.0" in why and "10.3" in why and "would not load there" in why
    assert local_engine_blocker("10.3.0.30", orin_gpu, orin) is None  # major.minor and compute capability match
    assert local_engine_blocker("8.2.1.8", {"name": "NVIDIA Tegra X1", "compute_capability": "5.3"}, nano) is None
    assert "cannot tell" in local_engine_blocker("10.3.0", {"name": "Orin", "compute_capability": None}, orin)


def test_tensorrt_latency_is_never_onnxruntime_timing() -> None:
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert "needs an NVIDIA GPU" in timing_blocker(None, None)
    assert "needs an NVIDIA GPU" in timing_blocker("10.3.0", None)
    # TensorRT and a GPU here, but the build's timing process runs load(), i.e. ONNX Runtime on the CPU:
    # it must not be timed (and labelled TensorRT); the cost-model estimate stays.
    why = timing_blocker("10.3.0", gpu)
    assert why is not None and "ONNX Runtime" in why and "trtexec on the device" in why
    assert timing_blocker("10.3.0", gpu, engine_session=True) is None  # only a real engine session would do
    assert TRT.measure_here() is not None


def test_engine_reuse_decision() -> None:
    want = {"tied_to": {"tensorrt": "10.3", "compute_capability": "8.7"},
            "build": {"precision": "fp16", "keep_fp32": ["a"], "dla_core": None, "strongly_typed": False}}
    built = {"tensorrt": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"}, "compute_capability": "8.7",
             "precision": "fp16", "keep_fp32": ["a"], "dla_core": None, "strongly_typed": False, "onnx_sha256": "s"}
    orin = {"name": "Orin", "compute_capability": "8.7"}
    mismatches = tensorrt_build.engine_mismatches
    assert mismatches(built, want, "10.3.0", orin, "s") == []
    assert mismatches(built, want, "10.3.1", orin, "s") == ["built with TensorRT 10.3.0, this device has 10.3.1"]
    assert mismatches(built, want, "10.3.0", {"name": "X", "compute_capability": "7.2"}, "s") == \
        ["built for sm 8.7, this device's GPU is sm 7.2"]
    assert mismatches(built, want, "10.3.0", orin, "other") == ["built from another model.onnx"]
    assert mismatches({**built, "precision": "fp32"}, want, "10.3.0", orin, "s")[0].startswith("built with precision")
    assert mismatches({**built, "keep_fp32": []}, want, "10.3.0", orin, "s") == ["built with other layers kept in FP32"]
    assert "cannot tell this device's TensorRT" in mismatches(built, want, None, orin, "s")[0]
    assert mismatches({"built_by": "trtexec", "precision": "fp16"}, want, "10.3.0", orin, "s")  # an old, bare one
    assert tensorrt_build.refusal(want, "10.3.0", orin) is None
    assert "runtimes.tensorrt: \"8.6\"" in tensorrt_build.refusal(want, "8.6.1", orin)
    int8 = {**want, "build": {**want["build"], "precision": "int8"}}
    assert "--precision fp16" in tensorrt_build.refusal(int8, "10.3.0", {"name": "Nano", "compute_capability": "5.3"})


def _tiny_artifact(tmp_path: Path, target: str = "jetson-orin-nano", precision: str = "fp16") -> Path:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    plan = ArtifactPlan("tensorrt", precision, QuantizationSettings(samples=32) if precision == "int8" else None,
                        options=TRT.plan_options(load_target(target)))
    return Path(TRT.export(spec, plan, _calib(32) if precision == "int8" else None, _mk(tmp_path / "art")).root)


def _build_engine_sh(folder: Path, fake_bin: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The package's build_engine.sh by its absolute path from another working directory, as the runner
    runs it, with the FAKE trtexec/nvidia-smi first on PATH and the device's Python."""
    e = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "PYTHON": DEVICE_PYTHON, **env}
    return subprocess.run(["sh", str(folder / "build_engine.sh"), *args], capture_output=True, text=True,
                          env=e, cwd=folder.parent.parent, timeout=120)


def test_build_engine_sh_reuses_only_a_matching_engine(tmp_path: Path) -> None:
    art = _tiny_artifact(tmp_path)
    log = tmp_path / "trtexec.log"
    fake = write_fake_nvidia_tools(tmp_path / "fakebin", log)
    want = json.loads((art / "engine.json").read_text())
    assert want["build"]["onnx_sha256"] == tensorrt_build.file_sha256(art / "model.onnx")
    assert not (art / "model.engine").exists()  # no TensorRT/GPU here: nothing to ship

    r = _build_engine_sh(art, fake)
    assert r.returncode == 0 and "edgekit-engine: built model.engine" in r.stdout, r.stderr
    meta = json.loads((art / "model.engine.json").read_text())
    assert (meta["built_by"], meta["tensorrt"], meta["compute_capability"]) == ("trtexec", "10.3.0", "8.7")
    assert meta["onnx_sha256"] == want["build"]["onnx_sha256"] and meta["precision"] == "fp16"
    assert trtexec_calls(log, "--saveEngine") == 1

    r = _build_engine_sh(art, fake)  # same package, same device: reused
    assert r.returncode == 0 and "reused model.engine" in r.stdout and trtexec_calls(log, "--saveEngine") == 1

    meta["tensorrt"] = "10.0.1"  # as if built before a JetPack upgrade
    (art / "model.engine.json").write_text(json.dumps(meta))
    r = _build_engine_sh(art, fake)
    assert r.returncode == 0 and "built with TensorRT 10.0.1, this device has 10.3.0" in r.stderr
    assert "built model.engine" in r.stdout and trtexec_calls(log, "--saveEngine") == 2

    r = _build_engine_sh(art, fake, FAKE_GPU_CC="7.2")  # the same card moved to a Xavier: another GPU
    assert r.returncode == 0 and "built for sm 8.7, this device's GPU is sm 7.2" in r.stderr
    assert trtexec_calls(log, "--saveEngine") == 3

    (art / "model.engine.json").unlink()  # an engine nobody can vouch for
    r = _build_engine_sh(art, fake)
    assert "no model.engine.json says" in r.stderr and trtexec_calls(log, "--saveEngine") == 4

    r = _build_engine_sh(art, fake, "--force")
    assert r.returncode == 0 and trtexec_calls(log, "--saveEngine") == 5

    # A device whose TensorRT takes other build flags: refused, saying what to do; nothing built.
    r = _build_engine_sh(art, fake, FAKE_TRT_VERSION="8601")
    assert r.returncode == 4 and "made for TensorRT 10.3 and this device has TensorRT 8.6.1" in r.stderr
    assert 'runtimes.tensorrt: "8.6"' in r.stderr and trtexec_calls(log, "--saveEngine") == 5


def test_build_engine_sh_engine_cache(tmp_path: Path) -> None:
    art = _tiny_artifact(tmp_path)
    log, cache = tmp_path / "trtexec.log", tmp_path / "cache" / "sha-fp16"
    fake = write_fake_nvidia_tools(tmp_path / "fakebin", log)
    pristine = Path(shutil.copytree(art, tmp_path / "pristine"))  # the package as it arrives on the device
    r = _build_engine_sh(art, fake, "--cache", str(cache))
    assert r.returncode == 0 and "built model.engine" in r.stdout, r.stderr
    assert (cache / "model.engine").read_bytes() == (art / "model.engine").read_bytes()
    assert json.loads((cache / "model.engine.json").read_text())["tensorrt"] == "10.3.0"
    fresh = Path(shutil.copytree(pristine, tmp_path / "fresh"))  # the next measurement's copy: no engine
    r = _build_engine_sh(fresh, fake, "--cache", str(cache))
    assert r.returncode == 0 and "reused the engine cached in" in r.stdout, r.stderr
    assert (fresh / "model.engine").exists() and trtexec_calls(log, "--saveEngine") == 1
    # After a TensorRT upgrade the cached engine no longer loads: rebuilt, and the cache replaced.
    r = _build_engine_sh(Path(shutil.copytree(pristine, tmp_path / "upgraded")), fake, "--cache", str(cache),
                         FAKE_TRT_VERSION="100301")
    assert r.returncode == 0 and "this device has 10.3.1" in r.stderr and trtexec_calls(log, "--saveEngine") == 2
    assert json.loads((cache / "model.engine.json").read_text())["tensorrt"] == "10.3.1"


def test_nano_fp16_says_why_not_int8(tmp_path: Path) -> None:
    art = TRT.export(ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w"),
                     ArtifactPlan("tensorrt", "fp16", options=TRT.plan_options(load_target("jetson-nano"))), None,
                     _mk(tmp_path / "a"))
    assert any("no INT8 for TensorRT" in n and "sm 5.3" in n and "--precision fp16" in n for n in art.notes)
    # (the console line is checked through the CLI in test_build_for_jetson_orin_nano_int8_and_nano_fp16)


def _nano_int8(tmp_path: Path) -> str:
    r = run_cli("build", _conv_model(tmp_path / "m.onnx"), "--target", "jetson-nano", "--precision", "int8",
                "--calib", tmp_path, "--out", tmp_path / "x")
    assert r.code == 2 and not (tmp_path / "x").exists()
    return r.error_line()


def test_nano_int8_is_refused_with_the_reason(tmp_path: Path) -> None:
    line = _nano_int8(tmp_path)
    assert "does not support int8" in line and "sm_53" in line


def test_nano_int8_refusal_says_what_to_run_instead(tmp_path: Path) -> None:
    assert "--precision fp16" in _nano_int8(tmp_path)


def test_int8_qdq_has_no_stray_opsets_and_reports_samples_used(tmp_path: Path) -> None:
    m = onnx.load(_conv_model(tmp_path / "m.onnx"))
    m.opset_import.extend([onnx.helper.make_opsetid("org.pytorch.aten", 1),
                           onnx.helper.make_opsetid("ai.onnx.training", 1)])  # a converter's leftovers
    onnx.save(m, tmp_path / "stray.onnx")
    spec = ingest(str(tmp_path / "stray.onnx"), tmp_path / "w")
    assert {o.domain for o in spec.load().opset_import} >= {"org.pytorch.aten", "ai.onnx.training"}
    plan = ArtifactPlan("tensorrt", "int8", QuantizationSettings(samples=300, symmetric_activations=True),
                        options=TRT.plan_options(load_target("jetson-orin-nano")))
    art = TRT.export(spec, plan, _calib(48), _mk(tmp_path / "a"))
    q = onnx.load(art.entry_path)
    assert {o.domain for o in q.opset_import} <= {"", "ai.onnx"} | {n.domain for n in q.graph.node}
    assert {"org.pytorch.aten", "ai.onnx.training"} <= set(art.details["stripped_opsets"])
    assert art.details["calibration_samples"] == 48 and art.details["calibration_samples_requested"] == 300
    assert any("48 samples available (300 requested)" in n for n in art.notes)
    # a domain a node uses stays
    m.graph.node.append(onnx.helper.make_node("Gelu", ["y"], ["z"], domain="com.microsoft"))
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    assert strip_unused_opsets(m) == ["org.pytorch.aten", "ai.onnx.training"]
    assert [o.domain for o in m.opset_import] == ["", "com.microsoft"]


def test_qdq_outputs_stay_float_and_the_ort_proxy_is_faithful_on_unnormalised_inputs(tmp_path: Path) -> None:
    """Images fed in [0, 1] without the model's normalisation make small activation scales. ONNX Runtime's
    own bias-to-int32 rewrite then computes bias scales below FP16's normal range in the strongly typed
    graph and wrecks the result (cosine -0.82 measured) although TensorRT keeps biases in float: the
    verification proxy must not apply it. And no Q/DQ may clip the model's outputs."""
    from edgekit.data import prepare_data
    from edgekit.verify.verifier import Thresholds, run_all
    from edgekit.verify.verifier import verify_outputs as compare
    from edgekit.zoo.defects_data import generate

    spec = ingest(str(BUNDLED_ONNX), tmp_path / "w")
    data_dir = generate(tmp_path / "d", n_train=0, n_calib=64, n_val=64)
    data = prepare_data(spec, str(data_dir / "calib"), str(data_dir / "val"), None)  # no preprocess spec
    plan = ArtifactPlan("tensorrt", "int8", QuantizationSettings(samples=64, symmetric_activations=True),
                        options=TRT.plan_options(load_target("jetson-orin-nano")))
    art = TRT.export(spec, plan, data.calibration, _mk(tmp_path / "trt"))
    model = onnx.load(art.entry_path)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = producer[model.graph.output[0].name]
    feeding = producer[out.input[0]] if out.op_type == "Cast" else out
    assert feeding.op_type == "Gemm" and art.details["float_outputs"]  # no Q/DQ between the Gemm and the output
    batches = data.validation.batches(spec)
    ort = backends.get("onnxruntime")
    ref = run_all(ort.load(ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, _mk(tmp_path / "ref")), 1),
                  batches)
    v = compare(ref, run_all(TRT.load(art, 1), batches), ["logits"], None, Thresholds(), "int8")
    assert v.cosine_min > 0.995 and v.passed, v.failures
