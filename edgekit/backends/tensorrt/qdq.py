"""TensorRT's INT8 ONNX: explicit quantization (Q/DQ) following TensorRT's rules, produced by ONNX Runtime's
quantizer from the calibration data (symmetric INT8, per-output-channel weight scales, per-tensor
activation scales, Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul and on both inputs of residual
Adds), with FP16 outside the Q/DQ regions for a strongly typed build."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgekit.backends.onnxruntime import (
    calibration_batches,
    kl_calibration_ranges,
    per_tensor_weights,
    pre_process,
    quantize_qdq,
)
from edgekit.quantize.ops import WEIGHTED_OPS as QDQ_OPS

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan


def strip_unused_opsets(model: onnx.ModelProto) -> list[str]:
    """Drop opset imports no node uses (converters leave e.g. org.pytorch.aten, ai.onnx.training, and the
    quantizer com.microsoft): TensorRT's parser has no business with them. Returns the removed domains."""
    used: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for n in graph.node:
            used.add(n.domain or "")
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g)

    walk(model.graph)
    for f in model.functions:
        used.add(f.domain)
        used |= {n.domain or "" for n in f.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    removed = [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx") and o.domain not in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return removed


def tensorrt_qdq_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes TensorRT wants quantized: Conv/ConvTranspose/Gemm/MatMul, and Adds of two activations
    (residual joins: TensorRT fuses the Add into the conv only when both inputs are quantized)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in QDQ_OPS or (n.op_type == "Add" and not set(n.input) & constants)]


def _float_outputs(model: onnx.ModelProto) -> list[str]:
    """Drop a Q/DQ pair that only re-encodes a model output (optionally through a Cast): TensorRT needs
    none there, and the calibrated range would clip a logit or box coordinate the app reads directly."""
    outputs = {o.name for o in model.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    removed = []
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        after = users.get(dq.output[0], [])
        to_output = dq.output[0] in outputs or (len(after) == 1 and after[0].op_type == "Cast"
                                                and after[0].output[0] in outputs)
        q = producer.get(dq.input[0])
        if not to_output or q is None or q.op_type != "QuantizeLinear" or len(users.get(q.output[0], [])) != 1:
            continue
        if dq.output[0] in outputs:  # the output keeps its name: the quantized tensor's producer writes it
            producer[q.input[0]].output[list(producer[q.input[0]].output).index(q.input[0])] = dq.output[0]
            for u in users.get(q.input[0], []):
                if u is not q:
                    u.input[list(u.input).index(q.input[0])] = dq.output[0]
        else:
            after[0].input[0] = q.input[0]
        model.graph.node.remove(dq)
        model.graph.node.remove(q)
        removed.append(q.input[0])
    if removed:  # their scales and zero points
        used = {i for n in model.graph.node for i in n.input}
        for init in [i for i in model.graph.initializer if i.name not in used]:
            model.graph.initializer.remove(init)
    return removed


def qdq_for_tensorrt(spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset, out: Path,
                     fp16_outside: bool) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType

    q = plan.quantization
    assert q is not None, "an int8 artifact plan carries quantization settings"
    batches = calibration_batches(spec, calibration, q.samples)
    with tempfile.TemporaryDirectory(prefix="edgekit-trt-q-") as tmp:
        src = Path(tmp) / "pre.onnx"
        pre_process(spec.onnx_path, src)
        model = onnx.load(str(src))
        for i, node in enumerate(model.graph.node):  # nodes_to_quantize works by name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(model, str(src))
        wanted = [n for n in tensorrt_qdq_nodes(model) if n not in set(q.exclude_nodes)]
        qdq = Path(tmp) / "qdq.onnx"
        ranges = kl_calibration_ranges(src, batches, True, Path(tmp)) if q.method == "entropy" else None
        flat = per_tensor_weights(model, {*QDQ_OPS, "Add"})  # 1-D weights per-tensor up front, without ORT's warnings
        quantize_qdq(
            src, qdq, batches, q.method, ranges, " (TensorRT Q/DQ)", per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=[*QDQ_OPS, "Add"], nodes_to_quantize=wanted,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "CalibPercentile": q.percentile,
                           **({"TensorQuantOverrides": flat} if flat else {})},
        )
        result = onnx.load(str(qdq))
    float_outputs = _float_outputs(result)
    if fp16_outside:
        result = _float_regions_to_fp16(result)
    stripped = strip_unused_opsets(result)
    onnx.save(result, str(out))
    used = sum(int(next(iter(b.values())).shape[0]) for b in batches)  # what calibrated, not what was asked
    return {"quantizer": "onnxruntime.quantization.quantize_static (TensorRT rules)", "format": "QDQ",
            "calibration": q.method, "calibration_samples": used, "calibration_samples_requested": q.samples,
            "stripped_opsets": stripped, "float_outputs": float_outputs,
            "per_channel": True, "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel",
            "quantized_nodes": len(wanted), "excluded_nodes": list(q.exclude_nodes),
            "float_regions": "fp16" if fp16_outside else "fp32 (builder --fp16 lowers them)"}


def _float_regions_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """For a strongly typed build the graph states every precision: float tensors become FP16 (inputs
    and outputs stay FP32 for the app). Q/DQ with FP16 scales needs opset 19."""
    from onnx import version_converter
    from onnxruntime.transformers.float16 import convert_float_to_float16

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 19:
        model = version_converter.convert_version(model, 19)
    return convert_float_to_float16(model, keep_io_types=True)
