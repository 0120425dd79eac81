"""What ingest hands every later stage: ModelSpec (the canonical ONNX, its inputs and outputs, parameters
and MACs per layer), the input-shape syntax, the file hash, and the per-node cost count."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit.errors import BadInput

CANONICAL_OPSET = 17

MIN_OPSET = 11

# One input tensor larger than this is never an edge model's (a 4K RGB frame in float32 is 95 MiB): refused
# with its size before anything allocates it.
MAX_INPUT_BYTES = 2 << 30

log = logging.getLogger(__name__)


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str  # numpy dtype name, e.g. "float32"


@dataclass
class LayerCost:
    """One node's size: what the cost model and `inspect` need."""

    name: str
    op_type: str
    macs: int
    params: int
    output_shape: list[int]


@dataclass
class ModelSpec:
    """The canonical model and what is known about it."""

    source: str  # user's path, or "package.module:factory"
    source_sha256: str
    source_bytes: int
    onnx_path: str  # the canonical ONNX file
    sha256: str  # of the canonical ONNX file
    opset: int
    source_opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    params: int
    macs: int
    layers: list[LayerCost] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what ingest changed, for the report
    torch_factory: str | None = None
    torch_weights: str | None = None

    def to_dict(self, layers: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not layers:
            d.pop("layers")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
        d["layers"] = [LayerCost(**c) for c in d.get("layers", [])]
        return cls(**d)

    def load(self) -> onnx.ModelProto:
        return onnx.load(self.onnx_path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_input_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """`NAME=1,3,640,640` (several allowed) -> {NAME: [1, 3, 640, 640]}."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            values = [int(v) for v in dims.replace("x", ",").split(",") if v.strip()]
            if not values or any(v <= 0 for v in values):
                raise ValueError
        except ValueError:
            raise BadInput(f"--input-shape '{item}' is not NAME=D0,D1,...; e.g. images=1,3,640,640") from None
        shapes[name] = values
    return shapes


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def is_dynamic(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A dimension not fixed by the model: a dim_param, nothing at all, or a dim_value <= 0 (paddle2onnx and
    several TensorFlow converters write -1, some 0, for a dynamic dimension)."""
    return not dim.HasField("dim_value") or dim.dim_value <= 0


def _tensor_spec(v: onnx.ValueInfoProto) -> TensorSpec:
    t = v.type.tensor_type
    shape = [-1 if is_dynamic(d) else d.dim_value for d in t.shape.dim]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name if t.elem_type else "float32"
    return TensorSpec(v.name, shape, dtype)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers (weights; not shape constants)."""
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    return int(sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in float_types))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shapes[v.name] = _tensor_spec(v).shape
    for i in model.graph.initializer:
        shapes[i.name] = list(i.dims)
    return shapes


def layer_costs(model: onnx.ModelProto) -> list[LayerCost]:
    """MACs per node from inferred shapes. Convs and matrix products carry the cost; the rest is 0."""
    shapes = _shapes(model)
    inits = {i.name: i for i in model.graph.initializer}
    costs = []
    for i, node in enumerate(model.graph.node):
        out = shapes.get(node.output[0], []) if node.output else []
        params = sum(int(np.prod(inits[n].dims)) for n in node.input if n in inits)
        costs.append(LayerCost(node.name or f"{node.op_type}_{i}", node.op_type, _node_macs(node, shapes), params, out))
    return costs


def _prod(xs: list[int]) -> int:
    return int(np.prod(xs)) if xs and all(x >= 0 for x in xs) else 0


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    op = node.op_type
    out = shapes.get(node.output[0], []) if node.output else []
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes.get(node.input[3] if op == "QLinearConv" else node.input[1], [])
        return _prod(out) * _prod(w[1:]) if len(w) >= 3 else 0
    if op == "ConvTranspose":
        x, w = shapes.get(node.input[0], []), shapes.get(node.input[1], [])
        return _prod(x) * _prod(w[1:]) if len(w) >= 3 else 0
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shapes.get(node.input[0], [])
        k = a[-1] if a else 0
        if op == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a and len(a) == 2 else k
        return _prod(out) * k if k > 0 else 0
    return 0
