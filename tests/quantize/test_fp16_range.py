"""Which constants keep a node in FP32 in FP16 artifacts (edgekit/quantize/fp16_range.py)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgekit.quantize.fp16_range import fp16_unsafe_nodes


def _model(op: str, constant: np.ndarray) -> object:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    init = numpy_helper.from_array(constant.astype(np.float32), "c")
    attrs = {"axis": 1} if op == "Concat" else {}
    node = helper.make_node(op, ["x", "c"], ["y"], name=f"the_{op.lower()}", **attrs)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [init]))


def test_tiny_values_matter_where_they_multiply_not_where_they_are_concatenated() -> None:
    """ViT's class token (a Concat input) with 2% of its values below 2^-14 stays FP16 (flushing them moves each
    by under 6e-5); the same values as a MatMul weight keep the node FP32; a value over 65504 keeps any node."""
    rng = np.random.default_rng(0)
    token = rng.standard_normal((1, 2, 8)) * 0.02
    token.flat[:1] = 1e-6  # 1 of 16 values: 6% tiny
    assert fp16_unsafe_nodes(_model("Concat", token)) == []
    weight = rng.standard_normal((8, 8)) * 0.02
    weight.flat[:4] = 1e-6  # 6% tiny
    (risk,) = fp16_unsafe_nodes(_model("MatMul", weight))
    assert risk.node == "the_matmul" and "below 2^-14" in risk.reason
    huge = token.copy()
    huge.flat[3] = 1e5
    (risk,) = fp16_unsafe_nodes(_model("Concat", huge))
    assert risk.node == "the_concat" and "> 65504" in risk.reason
