"""Which layers must not store weights in FP16.

FP16 overflows above 65504 and some converters flush values below 2^-14 (the smallest normal) to
zero; a BatchNorm with a huge running variance folded into a conv produces exactly such tiny
weights, and the converted model runs but is wrong. Checked on the canonical (BN-folded) graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgekit.quantize.ops import WEIGHTED_OPS

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
TINY_FRACTION = 0.01  # more than 1% of a layer's nonzero weights below the normal range is a real loss
# Flushing tiny values matters where they are weights that multiply (and a folded BatchNorm may have made
# a whole layer tiny); a constant that is concatenated or added (ViT's class token: 1% of it below 2^-14)
# loses under 6e-5 absolute per value, nothing a verified artifact would notice.
MULTIPLYING_OPS = frozenset({*WEIGHTED_OPS, "Mul", "Einsum", "LSTM", "GRU", "RNN"})


@dataclass
class Fp16Risk:
    node: str
    op_type: str
    reason: str
    weight: str = ""  # the initializer at risk


def fp16_range_problem(values: np.ndarray, name: str, tiny_matters: bool = True) -> str | None:
    """Why these weights cannot be stored in FP16 (None: they can). tiny_matters=False for a bias:
    a bias near zero (a folded BatchNorm whose input has mean 0 gives ~1e-8) loses nothing when flushed."""
    w = np.abs(np.asarray(values, dtype=np.float64))
    if not w.size:
        return None
    if float(w.max()) > FP16_MAX:
        return f"weight {name} has |w| up to {w.max():.3g} > 65504"
    if not tiny_matters:
        return None
    nonzero = w[w > 0]
    tiny = float((nonzero < FP16_MIN_NORMAL).mean()) if nonzero.size else 0.0
    if tiny > TINY_FRACTION:
        return f"{tiny:.0%} of weight {name} is below 2^-14 and would flush to zero"
    return None


def fp16_unsafe_nodes(model: onnx.ModelProto) -> list[Fp16Risk]:
    inits = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    risks = []
    for node in model.graph.node:
        arrays = {name: numpy_helper.to_array(inits[name]) for name in node.input if name in inits}
        weight = max(arrays, key=lambda n: arrays[n].size, default=None)  # the rest: biases, small constants
        for name, values in arrays.items():
            why = fp16_range_problem(values, name, tiny_matters=name == weight and node.op_type in MULTIPLYING_OPS)
            if why:
                risks.append(Fp16Risk(node.name, node.op_type, why, name))
                break
    return risks


def same_weights(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a converter's weight blob holds these ONNX weights (converters rename layers and
    constants; values survive)."""
    return a.size == b.size and np.allclose(a.reshape(-1), b.reshape(-1), rtol=1e-5, atol=1e-12)


def same_weights_any_layout(a: np.ndarray, b: np.ndarray) -> bool:
    """same_weights, or the same values in another order: converters transpose weights (pnnx stores
    ConvTranspose as [out, in, kh, kw], MatMul's [K, N] as InnerProduct's [N, K])."""
    if a.size != b.size:
        return False
    return same_weights(a, b) or np.allclose(np.sort(a, axis=None), np.sort(b, axis=None), rtol=1e-5, atol=1e-12)
