"""ONNX Runtime backend: FP32 as canonicalised, FP16 by ORT's float16 converter, INT8 by
onnxruntime.quantization's static Q/DQ quantizer with the user's calibration data."""

from __future__ import annotations

import shutil
import tempfile
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.errors import BadInput, EdgekitError
from edgekit.quantize.attention import attention_nodes
from edgekit.quantize.calibration import CalibrationReader, EntropyCalibrator, reference_ranges
from edgekit.quantize.fp16_range import fp16_unsafe_nodes
from edgekit.quantize.qdq_model import prequantized

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan

PROVIDER = "CPUExecutionProvider"


@cache
def _cpu_kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == PROVIDER:
            kernels.setdefault((k.domain or "", k.op_name), []).append(tuple(k.version_range))
    return kernels


# Set only in edgekit's dedicated timing process (see prepare_timing_process).
_shared_pool_threads: int | None = None


class OrtSession:
    def __init__(self, path: Path, threads: int, disabled_optimizers: tuple[str, ...] = (),
                 config: dict[str, str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if _shared_pool_threads == threads:
            opts.use_per_session_threads = False
        else:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        for key, value in (config or {}).items():  # session config entries (e.g. an ORT-format file's)
            opts.add_session_config_entry(key, value)
        self.threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(str(path), opts, providers=[PROVIDER],
                                            **({"disabled_optimizers": list(disabled_optimizers)}
                                               if disabled_optimizers else {}))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        values, order = intermediates_of(onnx.load(self.path), feeds)
        return [([name], values[name]) for name in order]


# Q/DQ and Cast nodes only re-encode a tensor that is compared under its own name.
_ENCODING_OPS = {"QuantizeLinear", "DequantizeLinear", "Cast"}


def intermediates_of(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every floating-point node output of the model (as float32), in topological order.

    A tensor followed by QuantizeLinear -> DequantizeLinear is reported as the dequantized value: that
    is what the next layer consumes (and the quantizer may have folded a ReLU into the Q/DQ pair)."""
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(model)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.output]
             if v.type.tensor_type.elem_type in floats}
    consumers = {i: n for n in model.graph.node for i in n.input}
    dequantized = {}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        dq = consumers.get(q.output[0])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.output[0] in typed:
            dequantized[q.input[0]] = dq.output[0]
    order = [o for n in model.graph.node if n.op_type not in _ENCODING_OPS for o in n.output if o in typed]
    fetch = list(dict.fromkeys([dequantized.get(o, o) for o in order]))
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(typed[name] for name in fetch if name not in existing)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    # No graph fusions: a fused node would not produce the tensors asked for.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=[PROVIDER])
    values = dict(zip(fetch, session.run(fetch, feeds)))
    return {o: np.asarray(values[dequantized.get(o, o)], np.float32) for o in order}, order


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = ("fp32", "fp16", "int8")
    requires = ("onnxruntime",)
    int8_reduce_range = True  # x86 u8*s8 kernels without VNNI
    takes_qdq_onnx = True  # a Q/DQ ONNX is what its own INT8 is
    install_hint = "pip install onnxruntime"
    runtime_distributions = ("onnxruntime",)
    device_modules = ("onnxruntime", "numpy")
    verifies_under_emulation = True
    # onnxruntime 1.20-1.26's aarch64 wheels import under qemu-user 7.2; 1.28-1.32's crash there (signal 11).
    emulation_fallbacks: ClassVar[dict[str, tuple[str, ...]]] = {"onnxruntime": ("1.26.0", "1.24.1", "1.22.0")}
    report_color = "#0072B2"

    def versions(self) -> dict[str, str]:
        return {d: metadata.version(d) for d in ("onnxruntime", "onnx")}

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        opsets = {imp.domain or "": imp.version for imp in model.opset_import}
        kernels = _cpu_kernels()
        issues = []
        for node in model.graph.node:
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            try:
                schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
                since = schema.since_version
                # Ops defined as a function of other ops (HardSwish, ...) run through their expansion.
                if schema.has_function or schema.has_context_dependent_function:
                    continue
            except onnx.defs.SchemaError:
                since = None
            ranges = kernels.get((domain, node.op_type))
            if ranges and (since is None or any(lo <= since <= hi for lo, hi in ranges)):
                continue
            why = "no CPU kernel" if not ranges else f"no CPU kernel for opset version {since}"
            issues.append(OpIssue(self.name, node.op_type, node.name, why))
        return issues

    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path) -> Artifact:
        out = root / "model.onnx"
        details: dict[str, Any] = {}
        notes: list[str] = []
        if plan.precision == "fp32":
            shutil.copyfile(spec.onnx_path, out)
        elif plan.precision == "fp16":
            details, notes = self._fp16(spec, plan, out)
        elif plan.precision == "int8" and plan.quantization is not None and plan.quantization.qdq_model:
            # quantization-aware training's Q/DQ ONNX is the artifact, run as it is (no calibration)
            src, quantizer = prequantized(plan.quantization.qdq_model)
            shutil.copyfile(src, out)
            details = {"quantizer": quantizer, "format": "QDQ", "qdq_model": "model.onnx"}
        elif plan.precision == "int8":
            if calibration is None or len(calibration) == 0:
                raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
            details = self._int8(spec, plan, calibration, out)
        else:
            raise BadInput(f"{self.name} cannot build precision {plan.precision}")
        return Artifact(self.name, plan.precision, str(root), ["model.onnx"], "model.onnx", details, notes)

    def load(self, artifact: Artifact, threads: int) -> OrtSession:
        return OrtSession(artifact.entry_path, threads)

    def prepare_timing_process(self, threads: int) -> None:
        """One intra-op pool shared by every session of the timing process.

        Sessions timed side by side with their own pools interfere: each pool's workers spin-wait
        after a run and take the cores from the next session (p90 0.5 -> 5 ms on 2 cores, measured).
        With one shared pool, N interleaved sessions time like one, as an app with one model runs.
        A global pool binds every later session of the process, hence a process of its own.
        """
        global _shared_pool_threads
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        C.set_global_thread_pool_sizes(threads, 1)
        _shared_pool_threads = threads

    # ------------------------------------------------------------ precisions

    def _fp16(self, spec: ModelSpec, plan: ArtifactPlan, out: Path) -> tuple[dict[str, Any], list[str]]:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = spec.load()
        risks = fp16_unsafe_nodes(model)
        keep = sorted(set(plan.keep_fp32) | {r.node for r in risks})
        notes = [f"{r.node} ({r.op_type}) kept in FP32: {r.reason}" for r in risks]
        # keep_io_types: the app feeds and reads float32, as with the FP32 model.
        fp16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep or None)
        onnx.save(fp16, str(out))
        return {"keep_fp32": keep, "fp16_risks": [r.__dict__ for r in risks]}, notes

    def _int8(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset, out: Path) -> dict[str, Any]:
        from onnxruntime.quantization import QuantType

        q = plan.quantization
        assert q is not None, "an int8 artifact plan carries quantization settings"
        batches = calibration_batches(spec, calibration, q.samples)
        extra: dict[str, Any] = {
            "ActivationSymmetric": q.symmetric_activations,
            "WeightSymmetric": True,
            "CalibPercentile": q.percentile,
        }
        with tempfile.TemporaryDirectory(prefix="edgekit-ort-q-") as tmp:
            pre = Path(tmp) / "pre.onnx"
            pre_process(spec.onnx_path, pre)
            if q.per_channel and (flat := per_tensor_weights(onnx.load(str(pre)))):
                extra["TensorQuantOverrides"] = flat
            ranges = kl_calibration_ranges(pre, batches, q.symmetric_activations, Path(tmp)) if q.method == "entropy" \
                else None
            # transformer: attention (its activation x activation MatMuls and Softmax) stays in float; ORT's
            # MatMulConstBOnly does this for the QOperator format only, in Q/DQ they are excluded by name
            attention = attention_nodes(onnx.load(str(pre))) if q.model_type == "transformer" else []
            quantize_qdq(
                pre, out, batches, q.method, ranges,
                per_channel=q.per_channel,
                reduce_range=q.reduce_range,
                activation_type=QuantType.QInt8 if q.symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=[*q.exclude_nodes, *attention] or None,
                extra_options=extra,
            )
        return {
            "quantizer": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "calibration": q.method,
            **({"calibration_algorithm": "ncnn2table's KL on 2048-bin |x| histograms (zeros left out) -> 128 levels; "
                "model inputs and outputs at their full range"} if ranges else {}),
            "calibration_samples": len(batches) * max(1, spec.inputs[0].shape[0]),
            "per_channel": q.per_channel,
            "reduce_range": q.reduce_range,
            "activations": "int8 symmetric" if q.symmetric_activations else "uint8 asymmetric",
            "weights": "int8 symmetric",
            "excluded_nodes": list(q.exclude_nodes),
            **({"attention_nodes_in_float": len(attention)} if attention else {}),
        }


# ---------------------------------------------------------------- ONNX Runtime's quantizer (also TensorRT's Q/DQ)


def calibration_batches(spec: ModelSpec, calibration: Dataset, samples: int) -> list[dict[str, np.ndarray]]:
    """The calibration batches holding `samples` samples (at least one batch)."""
    return calibration.batches(spec)[: max(1, samples // max(1, spec.inputs[0].shape[0]))]


def quantize_qdq(src: Path, dst: Path, batches: list[dict[str, np.ndarray]], method: str, ranges: Path | None,
                 what: str = "", **kwargs: Any) -> None:
    """onnxruntime.quantization.quantize_static to the Q/DQ format, calibrated on the batches by `method`
    (minmax | entropy | percentile), or from the ranges in a calibration cache (kl_calibration_ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    try:
        quantize_static(str(src), str(dst), CalibrationReader(batches),
                        **({"calibration_cache_path": str(ranges)} if ranges else {}),
                        quant_format=QuantFormat.QDQ, calibrate_method=methods[method], **kwargs)
    except Exception as e:
        raise EdgekitError(f"onnxruntime quantize_static{what} failed: {type(e).__name__}: {e}") from None


def pre_process(src: str, dst: Path) -> None:
    """quant_pre_process, falling back past its symbolic shape inference (it asserts on some models)."""
    from onnxruntime.quantization import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            quant_pre_process(src, str(dst), skip_symbolic_shape=skip_symbolic)
            return
        except Exception:
            continue
    shutil.copyfile(src, dst)


# Ops whose weight ONNX Runtime's QDQ quantizer, asked for per-channel, quantizes along axis 1: the scale of
# a normalization (input 1) and a MatMul's constant operand. A 1-D weight (LayerNormalization's gamma) has
# no axis 1: ORT logs "Axis 1 is out-of-range for weight ..." once per use and falls back to per-tensor.
_AXIS_1_WEIGHTS = {"LayerNormalization": slice(1, 2), "InstanceNormalization": slice(1, 2),
                   "BatchNormalization": slice(1, 2), "MatMul": slice(0, 2)}


def per_tensor_weights(model: onnx.ModelProto, op_types: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The weights per-channel quantization cannot apply to (rank < 2 where ORT wants axis 1), as
    TensorQuantOverrides saying "per-tensor, defaults otherwise" up front: the bytes ORT's fallback gives,
    without its warnings. Weights with a channel axis (Conv, Gemm, 2-D MatMul) stay per-channel."""
    rank = {i.name: len(i.dims) for i in model.graph.initializer}
    flat, elsewhere = set(), set()
    for node in model.graph.node:
        picked = _AXIS_1_WEIGHTS.get(node.op_type) if op_types is None or node.op_type in op_types else None
        chosen = set(node.input[picked]) if picked is not None else set()
        flat |= {i for i in chosen if i in rank and rank[i] < 2}
        elsewhere |= {i for i in node.input if i not in chosen}
    # a weight shared with another use (a Conv's bias) keeps ORT's own handling there
    return {name: [{}] for name in sorted(flat - elsewhere)}


def kl_calibration_ranges(model: Path, batches: list[dict[str, np.ndarray]], symmetric: bool, tmp: Path) -> Path | None:
    """Entropy (KL) ranges, handed to quantize_static as ONNX Runtime's calibration cache (onnxruntime
    >= 1.22; older ones keep their own entropy calibrator).

    ONNX Runtime's own entropy calibrator is unusable here: through quantize_static it keeps 128 bins for
    128 levels (nothing to search: minmax's ranges byte for byte), and with 2048 bins its histograms of
    post-ReLU tensors are dominated by the zeros, which pulls thresholds to a tenth of the range (DefectNet:
    86% instead of 96.5%). So the thresholds are ncnn2table's KL (edgekit.quantize.calibration's
    EntropyCalibrator, zeros left out of the |x| histogram, 2048 bins -> 128 levels); the model's inputs and
    outputs keep their full range, since clipping a logit or a box coordinate is an error the application
    sees directly."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return None
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    ranges = {name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
              for name, (lo, hi) in reference_ranges(model, batches, EntropyCalibrator, tmp, symmetric).items()}
    out = tmp / "entropy-ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.Entropy, ranges), out)
    return out
