"""Attention in a graph: the MatMuls that multiply two activations (queries by keys, scores by values).

INT8 hurts them most: both operands are calibrated ranges with outliers (softmax scores, unnormalised
queries), and nothing is per-channel about them. NNCF's `model_type=transformer` and ONNX Runtime's
`MatMulConstBOnly` (quantize only a MatMul whose B is a constant: the projections) are the libraries' own
recipe; edgekit makes it the default for a model that has attention, found from the graph alone.
"""

from __future__ import annotations

import onnx

# Ops a weight can pass through between its initializer and the MatMul (a transposed or reshaped weight).
_WEIGHT_PATH = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "DequantizeLinear"})


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose two inputs are both computed from the model input (no constant operand)."""
    constants = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def constant(tensor: str) -> bool:
        seen = 0
        while tensor not in constants:
            node = producer.get(tensor)
            if node is None or seen > 8:
                return False
            if node.op_type == "Constant":
                return True
            if node.op_type not in _WEIGHT_PATH or not node.input:
                return False
            tensor, seen = node.input[0], seen + 1
        return True

    return [n.name or f"MatMul_{i}" for i, n in enumerate(model.graph.node)
            if n.op_type == "MatMul" and len(n.input) == 2 and not any(constant(x) for x in n.input)]


def attention_nodes(model: onnx.ModelProto) -> list[str]:
    """What stays in float in a transformer's INT8: the activation x activation MatMuls and the Softmax
    between them (its 0-1 scores on an 8-bit grid of 1/255 lose the small weights that add up)."""
    matmuls = activation_matmuls(model)
    softmax = [n.name for n in model.graph.node if n.op_type == "Softmax" and n.name]
    return [*matmuls, *softmax] if matmuls else []


def looks_like_transformer(model: onnx.ModelProto) -> str | None:
    """Why the model has attention (a Softmax between activation x activation MatMuls), or None."""
    matmuls = activation_matmuls(model)
    softmax = sum(n.op_type == "Softmax" for n in model.graph.node)
    if not matmuls or not softmax:
        return None
    return f"{len(matmuls)} activation x activation MatMul(s) around {softmax} Softmax(es): attention"
