"""TensorRT backend (Jetson and NVIDIA GPUs).

An engine is tied to one GPU architecture and TensorRT version, so the portable artifact is the ONNX
TensorRT will compile plus the exact command that compiles it on the device:
- fp32 / fp16: the canonical ONNX; FP16 is a builder setting, with layers outside the FP16 range (or
  named by the plan) held in FP32 by precision constraints.
- int8: explicit quantization, never the implicit calibrators (deprecated since TensorRT 10.1): a Q/DQ
  ONNX following TensorRT's rules (symmetric INT8, per-output-channel weight scales, per-tensor
  activation scales, Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul and on both inputs of
  residual Adds, opset >= 13) produced by ONNX Runtime's quantizer from the user's calibration data.
  TensorRT 8.x builds it weakly typed with --int8 --fp16 (layers outside Q/DQ in FP16); TensorRT 10
  builds it --stronglyTyped, so the graph itself carries FP16 outside the Q/DQ regions.
The package carries model.onnx, build_engine.sh (trtexec, or build_engine.py with TensorRT's Python API
when it imports), and engine.json (what the engine will be tied to). Where tensorrt imports and this
machine's GPU is the target's, the engine is built here too. Verification runs the same ONNX in ONNX
Runtime (FP16 simulated by casting the float graph), and latency off the device is a cost-model
estimate, marked as one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.backends.onnxruntime import OnnxRuntimeBackend, OrtSession
from edgekit.backends.tensorrt import build_engine as trt_build
from edgekit.backends.tensorrt.engine import (
    EngineSettings,
    TrtexecCannot,
    build_script,
    engine_json,
    int8_supported,
    local_engine_blocker,
    local_facts,
    no_int8_reason,
    parse_trtexec,
    timing_blocker,
    trtexec_command,
)
from edgekit.backends.tensorrt.qdq import qdq_for_tensorrt
from edgekit.console import note
from edgekit.errors import BadInput
from edgekit.quantize.fp16_range import fp16_unsafe_nodes

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan
    from edgekit.targets import Target

# TensorRT's ONNX parser (onnx-tensorrt operators.md): what it imports, in the default domain.
TENSORRT_ONNX_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Identity", "If", "InstanceNormalization", "IsInf",
    "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization",
    "LpPool", "LRN", "LSTM", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu",
    "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign",
    "Round", "ScaledTanh", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign",
    "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample",
    "Where", "Xor",
})

ORT_ONLY_REWRITES = ("WeightBiasQuantization",)  # ONNX Runtime transforms TensorRT does not do


@register
class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    int8_symmetric_only = True  # TensorRT takes symmetric INT8 only
    requires = ("onnxruntime",)  # to write and verify the ONNX; the engine needs TensorRT + a GPU
    install_hint = "TensorRT: JetPack on Jetson; `pip install tensorrt` with CUDA on x86"
    runs_on_accelerator = True
    runtime_distributions = ("tensorrt",)
    report_color = "#009E73"
    device_modules = ()  # trtexec builds and times the engine; build_engine.py is standard library
    needs_engine_build_on_device = True
    device_package_files = ("build_engine.sh",)

    def versions(self) -> dict[str, str]:
        v = {"onnxruntime": OnnxRuntimeBackend().versions()["onnxruntime"]}
        trt = trt_build.tensorrt_version()
        v["tensorrt"] = trt or "absent here (engine built on the device)"
        return v

    def measure_here(self) -> str | None:
        return timing_blocker(*local_facts())

    def default_options(self) -> dict[str, Any]:
        return {"dla_core": None}  # build for this DLA core (GPU fallback on); None: the GPU

    def plan_options(self, target: Target, requests: dict[str, Any] | None = None) -> dict[str, Any]:
        dla_core = {**self.default_options(), **(requests or {})}["dla_core"]
        return {"engine": EngineSettings.for_target(target, dla_core).to_dict()}

    def device_blocker(self, facts: dict[str, Any]) -> str | None:
        if not facts.get("trtexec"):
            return ("has no trtexec (on PATH or in /usr/src/tensorrt/bin): install TensorRT (JetPack on Jetson) and "
                    "put trtexec on PATH")
        return None

    def device_latency(self, result: dict[str, Any], where: str) -> dict[str, Any]:
        """GPU Compute Time from trtexec's summary is the model's cost (the runner's own figures include
        the host's enqueue and copies)."""
        if not result.get("trtexec_output"):
            return {}
        summary = parse_trtexec(result["trtexec_output"])
        rec: dict[str, Any] = {}
        if summary.gpu_compute.get("median"):
            rec.update({f: v for f, v in summary.to_latency_record(where).items()
                        if f in ("p50", "p90", "p99", "mean", "min")})
        rec["trtexec"] = {"throughput_qps": summary.throughput_qps, "latency": summary.latency,
                          "gpu_compute": summary.gpu_compute}
        return rec

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        return [OpIssue(self.name, n.op_type, n.name, "not in TensorRT's ONNX parser op set (needs a plugin)")
                for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in TENSORRT_ONNX_OPS]

    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path) -> Artifact:
        raw = plan.options.get("engine")
        if not raw:
            raise BadInput("a TensorRT artifact needs the target's engine settings (plan option 'engine')")
        settings = EngineSettings(**raw)
        if settings.dla_core is not None and plan.precision == "fp32":
            settings.dla_core = None  # the DLA runs FP16/INT8 only
        details: dict[str, Any] = {"engine": settings.to_dict(), "builder": "trtexec or TensorRT Python API"}
        notes: list[str] = []
        keep: list[str] = []
        out = root / "model.onnx"
        if plan.precision == "fp32":
            shutil.copyfile(spec.onnx_path, out)
        elif plan.precision == "fp16":
            shutil.copyfile(spec.onnx_path, out)  # TensorRT lowers to FP16 itself
            risks = fp16_unsafe_nodes(spec.load())
            keep = sorted(set(plan.keep_fp32) | {r.node for r in risks})
            notes += [f"{r.node} ({r.op_type}) kept in FP32 by precision constraints: {r.reason}" for r in risks]
            details["keep_fp32"] = keep
            if not int8_supported(settings):  # the plan's reason is in the manifest; say it where it is seen too
                why = no_int8_reason(settings)
                note(why)
                notes.append(why)
        elif plan.precision == "int8":
            if not int8_supported(settings):
                raise BadInput(no_int8_reason(settings))
            if calibration is None or len(calibration) == 0:
                raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
            details.update(qdq_for_tensorrt(spec, plan, calibration, out, fp16_outside=settings.strongly_typed))
            notes.append("explicit quantization (Q/DQ); " + ("strongly typed: FP16 outside the Q/DQ regions"
                                                             if settings.strongly_typed
                                                             else "--int8 --fp16: FP16 outside the Q/DQ regions"))
            used, wanted = details["calibration_samples"], details["calibration_samples_requested"]
            if used < wanted:
                notes.append(f"INT8 calibrated on the {used} samples available ({wanted} requested)")
            if details["stripped_opsets"]:
                notes.append(f"unused opset imports removed: {', '.join(details['stripped_opsets'])}")
        else:
            raise BadInput(f"{self.name} cannot build precision {plan.precision}")
        (root / "build_engine.sh").write_text(build_script(settings, plan.precision, keep))
        (root / "build_engine.sh").chmod(0o755)
        shutil.copyfile(trt_build.__file__, root / "build_engine.py")
        try:
            details["trtexec"] = " ".join(trtexec_command(settings, plan.precision, keep))
        except TrtexecCannot as e:
            details["trtexec"] = None
            notes.append(str(e))
        reason = local_engine_blocker(*local_facts(), settings)
        if reason is None:
            meta = trt_build.build_engine(out, root / "model.engine", plan.precision, settings.workspace_mb,
                                          plan.precision == "int8" and settings.strongly_typed, keep,
                                          settings.dla_core, str(root / "timing.cache"))
            details["engine_built"] = meta
        else:
            details["engine_built"] = None
            details["engine_not_built"] = reason
            notes.append(f"engine not built here ({reason.split(': ')[0]}): build_engine.sh builds it on the "
                         f"device (TensorRT {settings.tensorrt}, sm {settings.compute_capability or '?'}) on first "
                         "use")
        (root / "engine.json").write_text(engine_json(settings, plan.precision, keep, details, out))
        files = sorted(p.name for p in root.iterdir() if p.is_file())
        return Artifact(self.name, plan.precision, str(root), files, "model.onnx", details, notes)

    def load(self, artifact: Artifact, threads: int) -> OrtSession:
        """The artifact's ONNX in ONNX Runtime: Q/DQ as TensorRT will run it; FP16 simulated by the
        float graph cast to FP16 (the layers kept FP32 stay FP32), as TensorRT's FP16 mode computes.
        ONNX Runtime's own rewrite that quantizes biases to int32 is off: TensorRT keeps biases in float,
        and in an FP16 graph that rewrite's scale (input scale x weight scale) falls below FP16's normal
        range and wrecks the result (DefectNet on unnormalised images: cosine -0.82 with it, 0.999 without)."""
        if artifact.precision != "fp16":
            return OrtSession(artifact.entry_path, threads, ORT_ONLY_REWRITES)
        from onnxruntime.transformers.float16 import convert_float_to_float16

        keep = artifact.details.get("keep_fp32") or None
        fp16 = convert_float_to_float16(onnx.load(artifact.entry_path), keep_io_types=True, node_block_list=keep)
        tmp = Path(tempfile.mkdtemp(prefix="edgekit-trt-fp16-"))
        onnx.save(fp16, str(tmp / "fp16.onnx"))
        session = OrtSession(tmp / "fp16.onnx", threads, ORT_ONLY_REWRITES)
        shutil.rmtree(tmp, ignore_errors=True)  # the session holds the model in memory
        return session
