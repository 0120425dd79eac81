"""ONNX -> torch.nn.Module, for models that arrive as ONNX only.

Structured pruning (Torch-Pruning's DepGraph) and distillation need a PyTorch module. onnx2torch,
the maintained converter, imports torchvision at import time (for NMS/RoiAlign) and torchvision has
no CPU wheel here, so this is a small converter for the common CNN op set instead.

The result is a `torch.fx.GraphModule`: every Conv/ConvTranspose/BatchNorm/Linear/activation/pool is
a real registered `nn` layer named after its ONNX node (so pruners find and resize it), every other
op is a plain torch function call, and constants are buffers on the module. An op outside the set
raises `NotConvertible` naming the op and node: such a model has to come from its PyTorch source.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper, shape_inference
from torch import fx, nn

from edgekit.errors import BadInput

__all__ = ["NotConvertible", "onnx_to_torch"]

Value = Any  # an fx.Node (a tensor computed at run time) or an np.ndarray (a constant)
Converter = Callable[["_Builder", onnx.NodeProto], list[Value]]

_FIX = "pruning needs a PyTorch source for this model: pass --model package.module:factory --weights W.pt"


class NotConvertible(BadInput):
    """An ONNX model (or one node of it) that edgekit cannot turn into a PyTorch module."""


def onnx_to_torch(model: onnx.ModelProto) -> fx.GraphModule:
    """An fx.GraphModule computing what `model` computes, built from real torch layers (eval mode)."""
    builder = _Builder(model)
    builder.build()
    gm = fx.GraphModule(builder.root, builder.graph, class_name="OnnxModule")
    return gm.eval()


# ---------------------------------------------------------------- the builder


class _Builder:
    """Walks the ONNX graph in order, keeping a map tensor name -> fx node or constant."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self.shapes = _static_shapes(model)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.graph_outputs = {o.name for o in model.graph.output}
        self.skip: set[int] = set()  # ids of nodes already folded into an earlier layer (MatMul + Add)
        self._names: set[str] = set()
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def build(self) -> None:
        for init in self.model.graph.initializer:
            self.env[init.name] = numpy_helper.to_array(init)
        for inp in self.model.graph.input:
            if inp.name not in self.env:
                self.env[inp.name] = self.graph.placeholder(self.unique(inp.name))
        for node in self.model.graph.node:
            if id(node) in self.skip:
                continue
            self.convert(node)
        outs = [self.tensor(o.name) for o in self.model.graph.output]
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        self.graph.lint()

    def convert(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise self.unsupported(node, f"custom-domain op {node.domain}::{node.op_type}")
        if self.all_constant(node) and node.op_type not in _NO_FOLD:
            results = _fold(node, [self.env[i] if i else None for i in node.input], self.opset)
        else:
            converter = _CONVERTERS.get(node.op_type)
            if converter is None:
                raise self.unsupported(node, f"op {node.op_type}")
            results = converter(self, node)
        for name, value in zip(node.output, results):
            if name:
                self.env[name] = value

    # -- inputs

    def all_constant(self, node: onnx.NodeProto) -> bool:
        return all(not i or isinstance(self.env.get(i), np.ndarray) for i in node.input)

    def has(self, node: onnx.NodeProto, i: int) -> bool:
        return len(node.input) > i and bool(node.input[i])

    def const(self, node: onnx.NodeProto, i: int, what: str = "this input") -> np.ndarray:
        value = self.env[node.input[i]]
        if not isinstance(value, np.ndarray):
            raise self.unsupported(node, f"op {node.op_type} with {what} computed at run time")
        return value

    def optional_const(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        return self.const(node, i) if self.has(node, i) else None

    def tensor(self, name: str) -> fx.Node:
        """An fx node for a tensor; a constant becomes a registered buffer read with get_attr."""
        value = self.env[name]
        if isinstance(value, fx.Node):
            return value
        target = self.unique("const_" + name)
        self.root.register_buffer(target, torch.from_numpy(np.array(value)))
        node = self.graph.get_attr(target)
        self.env[name] = node  # read the buffer once, however many consumers
        return node

    def operand(self, name: str) -> Value:
        """An elementwise operand: a scalar constant stays a Python number (no buffer, nothing for a
        pruner to track); anything else is a tensor."""
        value = self.env[name]
        if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind == "f":
            return float(value.reshape(()))
        return self.tensor(name)

    def shape(self, name: str) -> list[int] | None:
        return self.shapes.get(name)

    def input_shape(self, node: onnx.NodeProto, i: int = 0) -> list[int]:
        shape = self.shape(node.input[i])
        if shape is None:
            raise self.unsupported(node, f"op {node.op_type} whose input shape is unknown")
        return shape

    # -- emitting

    def unique(self, raw: str) -> str:
        """A Python identifier from an ONNX name ("/stem/stem.0/Conv" -> "stem_stem_0_Conv")."""
        name = re.sub(r"\W+", "_", raw).strip("_") or "node"
        if name[0].isdigit():
            name = "n_" + name
        base, k = name, 1
        while name in self._names or hasattr(nn.Module, name):
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def layer(self, node: onnx.NodeProto, module: nn.Module, *args: Value, suffix: str = "") -> fx.Node:
        target = self.unique((node.name or f"{node.op_type}_{node.output[0]}") + suffix)
        self.root.add_module(target, module)
        return self.graph.call_module(target, tuple(args))

    def call(self, fn: Callable[..., Any], *args: Value, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)

    def unsupported(self, node: onnx.NodeProto, what: str) -> NotConvertible:
        return NotConvertible(f"cannot convert {what} (node '{node.name or node.output[0]}') to PyTorch; {_FIX}")


_NO_FOLD = {"Constant"}  # has no inputs, so "all inputs constant" is trivially true; handled below


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully known tensor shapes; canonical (ingested) models have one for every tensor."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # shapes only refine the conversion; ops that need one say so themselves
        inferred = model
    g = inferred.graph
    shapes = {}
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[v.name] = [d.dim_value for d in t.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants (shape arithmetic of unsimplified exports)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    folded = onnx.NodeProto()
    folded.CopyFrom(node)
    del folded.input[:]
    folded.input.extend(names)
    graph = onnx.helper.make_graph(
        [folded], "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in zip(names, inputs) if v is not None],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: v for n, v in zip(names, inputs) if v is not None}
    results = iter(ReferenceEvaluator(model).run(None, feeds))
    return [np.asarray(next(results)) if o else None for o in node.output]


# ---------------------------------------------------------------- padding helpers


def _spatial_pads(b: _Builder, node: onnx.NodeProto, kernel: list[int], strides: list[int],
                  dilations: list[int]) -> list[int]:
    """ONNX pads [begin..., end...] for the spatial dims, resolving auto_pad from the input shape."""
    a = _attrs(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * n))
    if auto_pad == "VALID":
        return [0] * 2 * n
    spatial = b.input_shape(node)[2:]
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _split_pads(pads: list[int]) -> tuple[list[int], list[int] | None]:
    """Symmetric part for the layer's own padding, plus the F.pad list (last dim first) for the rest."""
    n = len(pads) // 2
    begins, ends = pads[:n], pads[n:]
    if begins == ends:
        return begins, None
    torch_pads: list[int] = []
    for bgn, end in zip(reversed(begins), reversed(ends)):
        torch_pads += [bgn, end]
    return [0] * n, torch_pads


def _kernel_attrs(node: onnx.NodeProto, n: int) -> tuple[list[int], list[int]]:
    a = _attrs(node)
    return list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))


# ---------------------------------------------------------------- layers with weights


def _conv(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    weight = b.const(node, 1, "weights")
    if weight.ndim != 4:
        raise b.unsupported(node, f"{weight.ndim - 2}-D Conv")
    bias = b.optional_const(node, 2)
    a = _attrs(node)
    kernel = list(a.get("kernel_shape", weight.shape[2:]))
    strides, dilations = _kernel_attrs(node, 2)
    padding, extra = _split_pads(_spatial_pads(b, node, kernel, strides, dilations))
    groups = int(a.get("group", 1))
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(kernel), tuple(strides), tuple(padding),
                     tuple(dilations), groups, bias=bias is not None)
    _load(conv, weight, bias)
    x = b.tensor(node.input[0])
    if extra is not None:  # torch convs pad symmetrically only
        x = b.layer(node, nn.ZeroPad2d(tuple(extra)), x, suffix="_pad")
    return [b.layer(node, conv, x)]


def _conv_transpose(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    weight = b.const(node, 1, "weights")
    a = _attrs(node)
    if weight.ndim != 4:
        raise b.unsupported(node, f"{weight.ndim - 2}-D ConvTranspose")
    if "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise b.unsupported(node, "ConvTranspose with output_shape/auto_pad")
    bias = b.optional_const(node, 2)
    groups = int(a.get("group", 1))
    strides, dilations = _kernel_attrs(node, 2)
    pads = list(a.get("pads", [0] * 4))
    padding = [min(pads[0], pads[2]), min(pads[1], pads[3])]
    deconv = nn.ConvTranspose2d(weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]), tuple(strides),
                                tuple(padding), tuple(a.get("output_padding", [0, 0])), groups,
                                bias=bias is not None, dilation=tuple(dilations))
    _load(deconv, weight, bias)
    y = b.layer(node, deconv, b.tensor(node.input[0]))
    # Asymmetric pads: torch removes the common part; crop what is left from the larger side.
    for dim, (begin, end) in enumerate([(pads[0], pads[2]), (pads[1], pads[3])], start=2):
        if begin != end:
            size = b.input_shape(node)[dim]  # only to compute the crop; the crop itself is static
            full = (size - 1) * strides[dim - 2] + (weight.shape[dim] - 1) * dilations[dim - 2] + 1 - 2 * min(
                begin, end) + a.get("output_padding", [0, 0])[dim - 2]
            y = b.call(torch.narrow, y, dim, begin - min(begin, end), full - abs(begin - end))
    return [y]


def _batch_norm(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    if a.get("training_mode", 0):
        raise b.unsupported(node, "BatchNormalization in training mode")
    scale, shift, mean, var = (b.const(node, i, "statistics") for i in range(1, 5))
    rank = len(b.input_shape(node))
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if cls is None:
        raise b.unsupported(node, f"BatchNormalization on a rank-{rank} tensor")
    bn = cls(scale.shape[0], eps=float(a.get("epsilon", 1e-5)))
    with torch.no_grad():
        bn.weight.copy_(_t(scale))
        bn.bias.copy_(_t(shift))
        bn.running_mean.copy_(_t(mean))
        bn.running_var.copy_(_t(var))
    return [b.layer(node, bn.eval(), b.tensor(node.input[0]))]


def _gemm(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    if a.get("transA", 0):
        raise b.unsupported(node, "Gemm with transA=1")
    weight = b.const(node, 1, "weights (B)")
    weight = weight if a.get("transB", 0) else weight.T  # nn.Linear keeps [out, in]
    weight = weight * float(a.get("alpha", 1.0))
    bias = b.optional_const(node, 2)
    if bias is not None:
        if bias.size not in (1, weight.shape[0]):
            raise b.unsupported(node, f"Gemm with a {list(bias.shape)} C input (not a bias)")
        bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],)) * float(a.get("beta", 1.0))
    return [b.layer(node, _linear(weight, bias), b.tensor(node.input[0]))]


def _matmul(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    weight = b.env[node.input[1]]
    if not isinstance(weight, np.ndarray) or weight.ndim != 2:
        return [b.call(torch.matmul, b.tensor(node.input[0]), b.tensor(node.input[1]))]
    add, bias = _bias_add(b, node, weight.shape[1])
    y = b.layer(node, _linear(weight.T, bias), b.tensor(node.input[0]))
    if add is not None:  # the Add is now the Linear's bias: its output is the Linear's output
        b.skip.add(id(add))
        b.env[add.output[0]] = y
    return [y]


def _bias_add(b: _Builder, node: onnx.NodeProto, n_out: int) -> tuple[onnx.NodeProto | None, np.ndarray | None]:
    """The Add right after a MatMul that only adds a constant [N] vector: a Linear's bias."""
    out = node.output[0]
    users = b.consumers.get(out, [])
    if out in b.graph_outputs or len(users) != 1 or users[0].op_type != "Add":
        return None, None
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    bias = b.env.get(other)
    if not isinstance(bias, np.ndarray) or bias.size != n_out or bias.shape[-1:] != (n_out,):
        return None, None
    return add, bias.reshape(-1)


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    _load(linear, weight, bias)
    return linear


def _load(layer: nn.Module, weight: np.ndarray, bias: np.ndarray | None) -> None:
    with torch.no_grad():
        layer.weight.copy_(_t(weight))
        if bias is not None:
            layer.bias.copy_(_t(bias))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)  # a copy: initializer arrays are read-only


# ---------------------------------------------------------------- activations


class HardSigmoid(nn.Module):
    """ONNX HardSigmoid, max(0, min(1, alpha*x + beta)); nn.Hardsigmoid is only alpha=1/6, beta=0.5."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.alpha + self.beta, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


def _simple(factory: Callable[[dict[str, Any]], nn.Module]) -> Converter:
    """A converter for a one-input activation layer built from the node's attributes."""

    def convert(b: _Builder, node: onnx.NodeProto) -> list[Value]:
        return [b.layer(node, factory(_attrs(node)), b.tensor(node.input[0]))]

    return convert


def _hard_sigmoid(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    exact = abs(alpha - 1 / 6) < 1e-7 and abs(beta - 0.5) < 1e-7  # float32 1/6 as exported by torch
    return [b.layer(node, nn.Hardsigmoid() if exact else HardSigmoid(alpha, beta), b.tensor(node.input[0]))]


def _clip(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    if b.opset < 11:
        low, high = a.get("min"), a.get("max")
    else:
        low_c, high_c = b.optional_const(node, 1), b.optional_const(node, 2)
        low = None if low_c is None else float(low_c)
        high = None if high_c is None else float(high_c)
    x = b.tensor(node.input[0])
    if low == 0 and high == 6:
        return [b.layer(node, nn.ReLU6(), x)]
    if low == 0 and high is None:
        return [b.layer(node, nn.ReLU(), x)]
    if low is not None and high is not None:
        return [b.layer(node, nn.Hardtanh(low, high), x)]
    return [b.call(torch.clamp, x, low, high)]


# ---------------------------------------------------------------- pooling


def _pool(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise b.unsupported(node, "MaxPool with an Indices output")
    kernel = list(a["kernel_shape"])
    if len(kernel) != 2:
        raise b.unsupported(node, f"{len(kernel)}-D {node.op_type}")
    strides, dilations = _kernel_attrs(node, 2)
    padding, extra = _split_pads(_spatial_pads(b, node, kernel, strides, dilations))
    ceil = bool(a.get("ceil_mode", 0))
    x = b.tensor(node.input[0])
    if node.op_type == "MaxPool":
        # torch caps padding at half the kernel; pad with -inf outside the layer when it is more
        if extra is None and any(p > k // 2 for p, k in zip(padding, kernel)):
            extra, padding = [padding[1], padding[1], padding[0], padding[0]], [0, 0]
        if extra is not None:
            x = b.call(F.pad, x, extra, value=-math.inf)
        pool: nn.Module = nn.MaxPool2d(tuple(kernel), tuple(strides), tuple(padding), tuple(dilations),
                                       ceil_mode=ceil)
        return [b.layer(node, pool, x)]
    if dilations != [1, 1]:
        raise b.unsupported(node, "dilated AveragePool")
    include_pad = bool(a.get("count_include_pad", 0))
    if extra is not None or any(p > k // 2 for p, k in zip(padding, kernel)):
        if not include_pad:  # padding moved outside the layer would be counted in the average
            raise b.unsupported(node, "AveragePool with asymmetric pads and count_include_pad=0")
        extra = extra or [padding[1], padding[1], padding[0], padding[0]]
        x, padding = b.layer(node, nn.ZeroPad2d(tuple(extra)), x, suffix="_pad"), [0, 0]
    if ceil and include_pad and any(padding):
        # torch and ONNX Runtime disagree on how a ceil_mode window that overhangs the padding is counted
        raise b.unsupported(node, "AveragePool with ceil_mode=1, pads and count_include_pad=1")
    pool = nn.AvgPool2d(tuple(kernel), tuple(strides), tuple(padding), ceil_mode=ceil, count_include_pad=include_pad)
    return [b.layer(node, pool, x)]


def _global_pool(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    rank = len(b.input_shape(node))
    if rank != 4:
        raise b.unsupported(node, f"{node.op_type} on a rank-{rank} tensor")
    pool = nn.AdaptiveAvgPool2d(1) if node.op_type == "GlobalAveragePool" else nn.AdaptiveMaxPool2d(1)
    return [b.layer(node, pool, b.tensor(node.input[0]))]


# ---------------------------------------------------------------- elementwise and shape ops


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow}
_UNARY = {"Neg": torch.neg, "Exp": torch.exp, "Sqrt": torch.sqrt, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
          "Log": torch.log, "Floor": torch.floor, "Ceil": torch.ceil}


def _binary(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    x, y = b.operand(node.input[0]), b.operand(node.input[1])
    if isinstance(x, float):  # torch.add(scalar, tensor) is not a valid overload: keep the tensor first
        if node.op_type in ("Add", "Mul"):
            x, y = y, x
        else:
            x = b.tensor(node.input[0])
    return [b.call(_BINARY[node.op_type], x, y)]


def _unary(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    return [b.call(_UNARY[node.op_type], b.tensor(node.input[0]))]


def _identity(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] and b.consumers.get(node.output[1]):
        raise b.unsupported(node, "Dropout whose mask is used")
    return [b.env[node.input[0]], None]


def _constant(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    if "value" in a:
        return [numpy_helper.to_array(a["value"])]
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in a:
            return [np.array(a[key], dtype=dtype)]
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in a:
            return [np.array(list(a[key]), dtype=dtype)]
    raise b.unsupported(node, "Constant of this kind")


def _shape(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    shape = np.array(b.input_shape(node), dtype=np.int64)
    return [shape[a.get("start", 0):a.get("end", len(shape))]]


def _flatten(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    axis = int(_attrs(node).get("axis", 1))
    x = b.tensor(node.input[0])
    if axis == 1:  # the common case, and one pruners know keeps the batch dim
        return [b.call(torch.flatten, x, 1)]
    shape = b.input_shape(node)
    axis = axis % len(shape) if axis < 0 else axis
    return [b.call(torch.reshape, x, (int(np.prod(shape[:axis])), -1))]


def _reshape(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    target = [int(v) for v in b.const(node, 1, "shape")]
    x = b.tensor(node.input[0])
    src = b.shape(node.input[0])
    if 0 in target and not _attrs(node).get("allowzero", 0):  # 0 copies the input's dim
        if src is None:
            raise b.unsupported(node, "Reshape with 0 in its shape on a tensor of unknown shape")
        target = [src[i] if v == 0 else v for i, v in enumerate(target)]
    if src is not None and len(target) == 2 and target[0] == src[0] and target[1] in (-1, int(np.prod(src[1:]))):
        # batch kept, the rest flattened: say so, so the channel count is not frozen into the graph
        return [b.call(torch.flatten, x, 1)]
    if src is not None and len(target) > 1 and src[0] == target[0] == 1:
        # A batch-1 export's reshape keeps the batch: keep whatever batch comes (training and ranking run 64)
        return [b.call(_reshape_keep_batch, x, tuple(target[1:]))]
    return [b.call(torch.reshape, x, tuple(target))]


def _reshape_keep_batch(x: torch.Tensor, rest: tuple[int, ...]) -> torch.Tensor:
    return x.reshape(x.shape[0], *rest)


def _concat(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    return [b.call(torch.cat, [b.tensor(i) for i in node.input], dim=int(_attrs(node)["axis"]))]


def _slice(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    """Constant starts/ends/axes/steps (inputs from opset 10, attributes before) as one Python index: its
    clamping of out-of-range ends (ONNX writes INT64_MAX for "to the end") is ONNX's."""
    a = _attrs(node)
    if b.opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = b.const(node, 1, "starts"), b.const(node, 2, "ends")
        axes, steps = b.optional_const(node, 3), b.optional_const(node, 4)
    rank = len(b.input_shape(node))
    axes = list(range(len(starts))) if axes is None else [int(x) % rank for x in axes]
    steps = [1] * len(starts) if steps is None else [int(x) for x in steps]
    index: list[slice] = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(int(start), int(end), step)
    return [b.call(_getitem, b.tensor(node.input[0]), tuple(index))]


def _getitem(x: torch.Tensor, index: tuple[slice, ...]) -> torch.Tensor:
    if any(s.step is not None and s.step < 0 for s in index):  # torch has no negative steps: flip, then slice
        dims = [i for i, s in enumerate(index) if s.step is not None and s.step < 0]
        size = [x.shape[i] for i in dims]
        x = torch.flip(x, dims)
        index = tuple(_flipped(s, size[dims.index(i)]) if i in dims else s for i, s in enumerate(index))
    return x[index]


def _flipped(s: slice, n: int) -> slice:
    """slice(start, stop, -k) over n elements as a positive-step slice of the flipped axis."""
    start, stop, step = s.indices(n)
    count = len(range(start, stop, step))
    return slice(n - 1 - start, n - 1 - start + count * -step, -step)


def _softmax(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    x = b.tensor(node.input[0])
    if b.opset >= 13:
        return [b.call(fn, x, int(_attrs(node).get("axis", -1)))]
    # Before opset 13 the input is seen as 2-D [prod(:axis), prod(axis:)], softmax over the second.
    shape = b.input_shape(node)
    axis = int(_attrs(node).get("axis", 1)) % len(shape)
    if axis == len(shape) - 1:
        return [b.call(fn, x, -1)]
    flat = b.call(torch.reshape, x, (int(np.prod(shape[:axis])), -1))
    return [b.call(torch.reshape, b.call(fn, flat, 1), tuple(shape))]


def _transpose(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    perm = _attrs(node).get("perm")
    if perm is None:
        perm = list(reversed(range(len(b.input_shape(node)))))
    return [b.call(torch.permute, b.tensor(node.input[0]), tuple(int(p) for p in perm))]


def _axes(b: _Builder, node: onnx.NodeProto) -> list[int] | None:
    """Squeeze/Unsqueeze/Reduce axes: an attribute before opset 13 (18 for reductions), then an input."""
    a = _attrs(node)
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    if b.has(node, 1):
        return [int(v) for v in b.const(node, 1, "axes")]
    return None


def _squeeze(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    axes = _axes(b, node)
    x = b.tensor(node.input[0])
    return [b.call(torch.squeeze, x) if axes is None else b.call(torch.squeeze, x, tuple(axes))]


def _unsqueeze(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    axes = _axes(b, node) or []
    rank = len(b.input_shape(node)) + len(axes)
    x = b.tensor(node.input[0])
    for axis in sorted(a % rank for a in axes):  # axes index the output: insert in ascending order
        x = b.call(torch.unsqueeze, x, axis)
    return [x]


def _reduce_mean(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    keepdims = bool(_attrs(node).get("keepdims", 1))
    axes = _axes(b, node)
    x = b.tensor(node.input[0])
    if axes is None:
        axes = list(range(len(b.input_shape(node))))
    return [b.call(torch.mean, x, tuple(axes), keepdims)]


def _pad(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = [int(v) for v in (a["pads"] if b.opset < 11 else b.const(node, 1, "pads"))]
    fill = b.optional_const(node, 2) if b.opset >= 11 else None
    value = float(a.get("value", 0.0)) if b.opset < 11 else (0.0 if fill is None else float(fill.reshape(())))
    if len(node.input) > 3 and node.input[3]:
        raise b.unsupported(node, "Pad with axes")
    n = len(pads) // 2
    torch_pads: list[int] = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # torch's reflect/replicate pad only trailing dims
        torch_pads = torch_pads[:-2]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise b.unsupported(node, f"Pad mode {mode}")
    kwargs = {"value": value} if torch_mode == "constant" else {}
    return [b.call(F.pad, b.tensor(node.input[0]), torch_pads, mode=torch_mode, **kwargs)]


# ---------------------------------------------------------------- resize


def _resize(b: _Builder, node: onnx.NodeProto) -> list[Value]:
    a = _attrs(node)
    mode = _text(a.get("mode", "nearest"))
    shape = b.input_shape(node)
    if node.op_type == "Upsample":
        coord, nearest_mode, scales, sizes = "asymmetric", "floor", b.const(node, 1, "scales"), None
    else:
        coord = _text(a.get("coordinate_transformation_mode", "half_pixel"))
        nearest_mode = _text(a.get("nearest_mode", "round_prefer_floor"))
        scales = b.optional_const(node, 2)
        sizes = b.optional_const(node, 3)
        if scales is not None and scales.size == 0:
            scales = None
        if a.get("antialias", 0) or "axes" in a or a.get("exclude_outside", 0):
            raise b.unsupported(node, "Resize with antialias/axes/exclude_outside")
    out = [int(s) for s in sizes] if sizes is not None else [math.floor(d * s) for d, s in zip(shape, scales)]
    if out[:2] != shape[:2] or len(shape) not in (3, 4, 5):
        raise b.unsupported(node, "Resize of the batch or channel dims")
    spatial = slice(2, None)
    # torch with scale_factor maps back by 1/scale, with size by in/out: the same choice ONNX makes
    how: dict[str, Any] = ({"scale_factor": tuple(float(s) for s in scales[spatial])} if sizes is None
                           else {"size": tuple(out[spatial])})
    x = b.tensor(node.input[0])
    if mode == "nearest":
        torch_mode = _nearest_mode(shape[spatial], out[spatial], scales, coord, nearest_mode)
        if torch_mode is None:
            raise b.unsupported(node, f"nearest Resize with {coord}/{nearest_mode}")
        return [b.call(F.interpolate, x, mode=torch_mode, **how)]
    if mode not in ("linear", "cubic") or (mode == "cubic" and len(shape) != 4):
        raise b.unsupported(node, f"Resize mode {mode}")
    if mode == "cubic" and abs(float(a.get("cubic_coeff_a", -0.75)) + 0.75) > 1e-6:
        raise b.unsupported(node, "cubic Resize with cubic_coeff_a != -0.75")
    half_pixel = coord == "half_pixel" or (coord == "pytorch_half_pixel" and min(out[spatial]) > 1)
    if coord == "align_corners":
        how = {"size": tuple(out[spatial]), "align_corners": True}
    elif half_pixel:
        how["align_corners"] = False
    else:
        raise b.unsupported(node, f"{mode} Resize with coordinate_transformation_mode {coord}")
    torch_mode = "bicubic" if mode == "cubic" else {3: "linear", 4: "bilinear", 5: "trilinear"}[len(shape)]
    return [b.call(F.interpolate, x, mode=torch_mode, **how)]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nearest_mode(size_in: list[int], size_out: list[int], scales: np.ndarray | None, coord: str,
                  nearest_mode: str) -> str | None:
    """The F.interpolate mode ("nearest" or "nearest-exact") that picks exactly the pixels ONNX picks
    for these static sizes, or None. Compared index by index, so ties at .5 cannot slip through."""
    for torch_mode in ("nearest", "nearest-exact"):
        same = True
        for axis, (n_in, n_out) in enumerate(zip(size_in, size_out)):
            scale = float(scales[2 + axis]) if scales is not None else n_out / n_in
            if not np.array_equal(_onnx_nearest(n_in, n_out, scale, coord, nearest_mode),
                                  _torch_nearest(n_in, n_out, scale, torch_mode, scales is not None)):
                same = False
                break
        if same:
            return torch_mode
    return None


def _onnx_nearest(n_in: int, n_out: int, scale: float, coord: str, nearest_mode: str) -> np.ndarray:
    dst = np.arange(n_out, dtype=np.float32)
    scale32 = np.float32(scale)
    if coord == "asymmetric":
        src = dst / scale32
    elif coord == "half_pixel" or (coord == "pytorch_half_pixel" and n_out > 1):
        src = (dst + np.float32(0.5)) / scale32 - np.float32(0.5)
    elif coord == "pytorch_half_pixel":
        src = np.zeros_like(dst)
    elif coord == "align_corners":
        src = dst * np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(dst)
    else:
        return np.full(n_out, -1)
    rounding = {
        "floor": np.floor,
        "ceil": np.ceil,
        "round_prefer_floor": lambda v: np.where(v - np.floor(v) == 0.5, np.floor(v), np.round(v)),
        "round_prefer_ceil": lambda v: np.floor(v + np.float32(0.5)),
    }.get(nearest_mode)
    if rounding is None:
        return np.full(n_out, -1)
    return np.clip(rounding(src), 0, n_in - 1).astype(np.int64)


def _torch_nearest(n_in: int, n_out: int, scale: float, mode: str, by_scale: bool) -> np.ndarray:
    index = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, n_in)
    how = {"scale_factor": scale} if by_scale else {"size": n_out}
    return F.interpolate(index, mode=mode, **how).reshape(-1).numpy().astype(np.int64)


# ---------------------------------------------------------------- the registry


_CONVERTERS: dict[str, Converter] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Relu": _simple(lambda a: nn.ReLU()),
    "Clip": _clip,
    "HardSwish": _simple(lambda a: nn.Hardswish()),
    "HardSigmoid": _hard_sigmoid,
    "Sigmoid": _simple(lambda a: nn.Sigmoid()),
    "Tanh": _simple(lambda a: nn.Tanh()),
    "LeakyRelu": _simple(lambda a: nn.LeakyReLU(float(a.get("alpha", 0.01)))),
    "Elu": _simple(lambda a: nn.ELU(float(a.get("alpha", 1.0)))),
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": _concat,
    "Slice": _slice,
    "Resize": _resize,
    "Upsample": _resize,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "ReduceMean": _reduce_mean,
    "Pad": _pad,
    "Identity": _identity,
    "Dropout": _identity,
    "Constant": _constant,
    "Shape": _shape,
    **dict.fromkeys(_BINARY, _binary),
    **dict.fromkeys(_UNARY, _unary),
}
