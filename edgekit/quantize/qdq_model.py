"""A prequantized Q/DQ ONNX handed to a backend as its INT8 (QuantizationSettings.qdq_model): what the
backends need to take one, without torch (quantization-aware training, edgekit.quantize.qat, writes it)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.errors import BadInput

# metadata_props key naming the library that trained the model ("nncf 3.4.0")
LIBRARY_KEY = "edgekit.qat_library"


def prequantized(qdq_model: str) -> tuple[Path, str]:
    """The file and the library that made it ("qat (nncf 3.4.0)" is what a backend records as its quantizer);
    BadInput when it is missing or holds no QuantizeLinear/DequantizeLinear."""
    path = Path(qdq_model)
    if not path.is_file():
        raise BadInput(f"quantization.qdq_model {path} not found: give the Q/DQ ONNX file, or leave qdq_model out")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise BadInput(f"quantization.qdq_model {path} is not a readable ONNX file ({type(e).__name__})") from None
    ops = {n.op_type for n in model.graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} & ops:
        raise BadInput(f"quantization.qdq_model {path} has no QuantizeLinear/DequantizeLinear: it is not quantized")
    library = {p.key: p.value for p in model.metadata_props}.get(LIBRARY_KEY, "a Q/DQ ONNX given in the plan")
    return path, f"qat ({library})"


def with_float_weights(path: Path) -> io.BytesIO:
    """The Q/DQ model with each weight given as int8 codes -> DequantizeLinear rewritten as the float weight those
    codes stand for -> QuantizeLinear -> DequantizeLinear: the same values (on the grid, so the same codes), in
    the form OpenVINO's CPU plugin runs every quantized layer of in INT8. Given the int8 codes it ran the
    128-channel convolutions and a Linear of a small ResNet in f32 (OpenVINO 2026.4: 1.4x the latency of
    NNCF's own IR); ONNX Runtime runs both forms alike. In memory, for ov.convert_model."""
    model = onnx.load(str(path))
    values = {i.name: i for i in model.graph.initializer}
    values_np = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    nodes = []
    for n in model.graph.node:
        codes = values.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if codes is not None and codes.data_type == onnx.TensorProto.INT8:
            c = numpy_helper.to_array(codes)
            scale = values_np.get(n.input[1])
            scale = numpy_helper.to_array(values[n.input[1]]) if scale is None else scale
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % c.ndim
            step = scale.reshape([-1 if d == axis else 1 for d in range(c.ndim)]) if scale.size > 1 else scale
            name = f"{n.input[0]}_float"
            model.graph.initializer.append(numpy_helper.from_array((c * step).astype(np.float32), name))
            nodes.append(helper.make_node("QuantizeLinear", [name, *n.input[1:]], [f"{name}_q"], axis=axis))
            n.input[0] = f"{name}_q"
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return io.BytesIO(model.SerializeToString())
