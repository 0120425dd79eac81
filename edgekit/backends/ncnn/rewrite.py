"""The ONNX graph given to pnnx: the canonical graph rewritten where pnnx converts it badly, each rewrite
checked to compute the same in ONNX Runtime (else the graph goes to pnnx as it is)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

if TYPE_CHECKING:
    from edgekit.ingest import ModelSpec

def pnnx_graph(model: onnx.ModelProto, spec: ModelSpec | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The canonical graph with rewrites for pnnx, all checked to compute the same in ONNX Runtime (else the
    graph is returned as it is):
    - onnxslim turns a MatMul on token sequences ([1, T, K] x [K, N]) into Reshape -> Gemm -> Reshape; pnnx then
      no longer recognises attention blocks (no MultiHeadAttention layer; nn.MultiheadAttention's 5-D
      reshapes are left as `Tensor.reshape`, which ncnn cannot load). Restored to MatMul (+ Add).
    - a Slice with step > 1 on H/W (a YOLOX Focus layer: x[..., ::2, ::2]), which pnnx leaves as
      `Tensor.slice`, becomes a step-1 crop and a stride-s depthwise 1x1 convolution with weights 1 (exact);
      SpaceToDepth the same way per block offset (pnnx maps it to ncnn Reorg, which orders the channels
      as pixel_unshuffle does, not as ONNX does).
    - ReduceSum with its axes as an input (opset 13+): pnnx drops the axes and writes a Reduction with an
      empty axes list (wrong results, or a crash in ncnn); it becomes ReduceMean (axes attribute) x count.
    Returns (graph, what was rewritten)."""
    if not any(n.op_type in ("Gemm", "Slice", "SpaceToDepth", "ReduceSum") for n in model.graph.node):
        return model, []
    new = copy.deepcopy(model)
    shapes = tensor_shapes(new)
    done = []
    sums = _reduce_sums_to_means(new, shapes)
    if sums:
        done.append(f"{sums} ReduceSum (axes as an input, opset 13+) rewritten as ReduceMean x count: pnnx drops "
                    "that axes input and writes a Reduction ncnn runs wrongly or crashes on")
    matmuls = _restore_matmuls(new, shapes)
    if matmuls:
        done.append(f"{matmuls} Gemm on flattened token rows restored to MatMul (onnxslim's rewrite hides "
                    "attention from pnnx)")
    slices = _strided_slices_to_convs(new, shapes)
    if slices:
        listed = ", ".join(slices[:4]) + (" ..." if len(slices) > 4 else "")
        done.append(f"{len(slices)} strided Slice/SpaceToDepth node(s) rewritten as crop + stride-s depthwise 1x1 "
                    f"convolution (ncnn has no strided slice): {listed}")
    if not done:
        return model, []
    _drop_dead(new)
    del new.graph.value_info[:]  # shapes of rewritten tensors changed; pnnx and ONNX Runtime infer their own
    why = _differs(model, new, spec)
    if why:
        return model, [f"edgekit's graph rewrite for pnnx was not used: {why}"]
    return new, done


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infertensor_shapes(model)
    except Exception:  # shapes are a nicety here: no shapes, no rewrite
        inferred = model
    g = inferred.graph
    out = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    for i in g.initializer:
        out[i.name] = list(i.dims)
    return out


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def _unique(model: onnx.ModelProto, base: str) -> str:
    taken = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _add_init(model: onnx.ModelProto, base: str, value: np.ndarray) -> str:
    name = _unique(model, base)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name


def _restore_matmuls(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> int:
    g = model.graph
    nodes = list(g.node)  # one wrapper per node: positions (not id()) identify them below
    consts = {i.name: i for i in g.initializer}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    graph_outputs = {o.name for o in g.output}

    def eligible(n: onnx.NodeProto) -> bool:
        if n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in consts or n.output[0] in graph_outputs:
            return False
        a = _attrs(n)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return False
        w = consts[n.input[1]]
        cols = w.dims[0 if a.get("transB") else 1] if len(w.dims) == 2 else -1
        bias = n.input[2] if len(n.input) > 2 else ""
        if cols < 0 or (bias and (bias not in consts or int(np.prod(consts[bias].dims)) != cols)):
            return False
        r = nodes[producer[n.input[0]]] if n.input[0] in producer else None
        if r is None or r.op_type != "Reshape" or r.output[0] in graph_outputs:
            return False
        x, flat = shapes.get(r.input[0], []), shapes.get(r.output[0], [])
        if len(x) < 3 or len(flat) != 2 or min(x + flat) <= 0:
            return False
        users = [nodes[u] for u in consumers.get(n.output[0], [])]
        return bool(users) and all(u.op_type == "Reshape" and u.input[0] == n.output[0] for u in users)

    ok = {i for i, n in enumerate(nodes) if eligible(n)}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    reshaped: set[int] = set()
    for i in sorted(ok):
        n = nodes[i]
        ri = producer[n.input[0]]
        r = nodes[ri]
        if not all(u in ok for u in consumers[r.output[0]]):
            continue
        a = _attrs(n)
        m, k = shapes[r.output[0]]
        x = shapes[r.input[0]]
        w = numpy_helper.to_array(consts[n.input[1]])
        weight = _add_init(model, f"{n.input[1]}_t", w.T) if a.get("transB", 0) else n.input[1]
        if x[-1] == k:
            src = r.input[0]  # the Reshape is left without users, dropped
        else:
            src = r.output[0]
            if ri not in reshaped:
                r.input[1] = _add_init(model, f"{r.name}_rows", np.array([1, m, k], np.int64))
                reshaped.add(ri)
        out = _unique(model, f"{n.output[0]}_matmul")
        new = [helper.make_node("MatMul", [src, weight], [out], name=_unique(model, f"{n.name}_matmul"))]
        if len(n.input) > 2 and n.input[2]:
            bias = numpy_helper.to_array(consts[n.input[2]]).reshape(-1)
            added = _unique(model, f"{n.output[0]}_add")
            new.append(helper.make_node("Add", [out, _add_init(model, f"{n.input[2]}_row", bias)], [added],
                                        name=_unique(model, f"{n.name}_add")))
            out = added
        for u in consumers[n.output[0]]:
            nodes[u].input[0] = out
        replaced[i] = new
    return _splice(g, nodes, replaced)


def _splice(g: onnx.GraphProto, nodes: list[onnx.NodeProto], replaced: dict[int, list[onnx.NodeProto]]) -> int:
    """The graph's nodes with node i replaced by replaced[i], in place; how many were replaced."""
    if replaced:
        kept: list[onnx.NodeProto] = []
        for i, n in enumerate(nodes):
            kept += replaced.get(i, [n])
        del g.node[:]
        g.node.extend(kept)
    return len(replaced)


def _reduce_sums_to_means(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> int:
    g = model.graph
    nodes = list(g.node)
    consts = _constants(model)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for i, n in enumerate(nodes):
        if n.op_type != "ReduceSum" or len(n.input) < 2 or not n.input[1] or n.input[1] not in consts:
            continue
        dims = shapes.get(n.input[0], [])
        axes = [int(a) for a in consts[n.input[1]].reshape(-1)]
        if not dims or min(dims) <= 0 or not axes:
            continue
        axes = [a % len(dims) for a in axes]
        count = float(np.prod([dims[a] for a in axes]))
        keepdims = int(_attrs(n).get("keepdims", 1))
        mean = _unique(model, f"{n.output[0]}_mean")
        replaced[i] = [
            helper.make_node("ReduceMean", [n.input[0]], [mean], name=mean, axes=axes, keepdims=keepdims),
            helper.make_node("Mul", [mean, _add_init(model, f"{n.output[0]}_count", np.array(count, np.float32))],
                             [n.output[0]], name=f"{n.output[0]}_sum")]
    return _splice(g, nodes, replaced)


def _strided_slices_to_convs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> list[str]:
    g = model.graph
    nodes = list(g.node)
    consts = _constants(model)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for i, n in enumerate(nodes):
        dims = shapes.get(n.input[0] if n.input else "", [])
        if len(dims) != 4 or dims[0] != 1 or min(dims) <= 0:
            continue
        if n.op_type == "Slice" and all(x in consts for x in n.input[1:] if x):
            starts, ends = (consts[n.input[i]].astype(np.int64).reshape(-1) for i in (1, 2))
            axes = (consts[n.input[3]].astype(np.int64).reshape(-1) if len(n.input) > 3 and n.input[3]
                    else np.arange(len(starts)))
            steps = (consts[n.input[4]].astype(np.int64).reshape(-1) if len(n.input) > 4 and n.input[4]
                     else np.ones(len(starts), np.int64))
            axes = [int(a) % 4 for a in axes]
            strided = [a for a, st in zip(axes, steps) if st > 1]
            if np.any(steps <= 0) or not strided or any(a not in (2, 3) for a in strided):
                continue
            begin, end, stride = [0] * 4, list(dims), [1, 1]
            for a, s0, e0, st in zip(axes, starts, ends, steps):
                d = dims[a]
                lo = int(min(max(s0 + d if s0 < 0 else s0, 0), d))
                hi = int(min(max(e0 + d if e0 < 0 else e0, 0), d))
                begin[a], end[a] = lo, hi
                if st > 1:
                    stride[a - 2] = int(st)
            if any(end[a] <= begin[a] for a in range(4)):
                continue
            replaced[i] = _select(model, n.input[0], dims, begin, end, stride, n.output[0])
        elif n.op_type == "SpaceToDepth":
            b = int(_attrs(n).get("blocksize", 0))
            if b < 2 or dims[2] % b or dims[3] % b:
                continue
            parts, new = [], []
            for bh in range(b):  # ONNX order: channel (bh * b + bw) * C + c
                for bw in range(b):
                    part = _unique(model, f"{n.output[0]}_block{bh}{bw}")
                    new += _select(model, n.input[0], dims, [0, 0, bh, bw], list(dims), [b, b], part)
                    parts.append(part)
            new.append(helper.make_node("Concat", parts, [n.output[0]], axis=1, name=f"{n.output[0]}_cat"))
            replaced[i] = new
    names = [nodes[i].name or nodes[i].output[0] for i in sorted(replaced)]
    _splice(g, nodes, replaced)
    return names


def _select(model: onnx.ModelProto, x: str, dims: list[int], begin: list[int], end: list[int], stride: list[int],
            out: str) -> list[onnx.NodeProto]:
    """x[..., begin:end] (step 1), then every stride-th row/column: a depthwise 1x1 convolution, weights 1.
    Nodes are named after their (unique) outputs."""
    nodes, src = [], x
    axes = [a for a in range(4) if begin[a] or end[a] != dims[a]]
    if axes:
        src = _unique(model, f"{out}_crop")
        nodes.append(helper.make_node(
            "Slice", [x, _add_init(model, f"{src}_starts", np.array([begin[a] for a in axes], np.int64)),
                      _add_init(model, f"{src}_ends", np.array([end[a] for a in axes], np.int64)),
                      _add_init(model, f"{src}_axes", np.array(axes, np.int64))], [src],
            name=src))
    channels = end[1] - begin[1]
    weight = _add_init(model, f"{out}_select", np.ones((channels, 1, 1, 1), np.float32))
    nodes.append(helper.make_node("Conv", [src, weight], [out], name=f"{out}_stride", group=channels,
                                  kernel_shape=[1, 1], strides=stride))
    return nodes


def _drop_dead(model: onnx.ModelProto) -> None:
    """Nodes nothing reads any more (a bypassed Reshape) and initializers no node reads (a transposed
    weight's original)."""
    g = model.graph
    live = {o.name for o in g.output}
    kept = []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(n.input)
    del g.node[:]
    g.node.extend(reversed(kept))
    inits = [i for i in g.initializer if i.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)


def _differs(a: onnx.ModelProto, b: onnx.ModelProto, spec: ModelSpec | None) -> str | None:
    """Why graph b does not compute what a does on one random input (ONNX Runtime), or None."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        sa, sb = (ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                  for m in (a, b))
    except Exception as e:  # a rewrite ONNX Runtime cannot load is simply not used
        return f"ONNX Runtime cannot load it ({type(e).__name__})"
    rng = np.random.default_rng(0)
    shapes = {i.name: i.shape for i in spec.inputs} if spec is not None else {}
    feeds = {}
    for i in sa.get_inputs():
        shape = shapes.get(i.name) or [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feeds[i.name] = (rng.standard_normal(shape).astype(np.float32) if "float" in i.type
                         else np.zeros(shape, np.int64 if "int64" in i.type else np.int32))
        if "float16" in i.type:
            feeds[i.name] = feeds[i.name].astype(np.float16)
    for name, x, y in zip([o.name for o in sa.get_outputs()], sa.run(None, feeds), sb.run(None, feeds)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        tolerance = 1e-4 * max(1.0, float(np.abs(x).max(initial=0)))
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-4, atol=tolerance):
            return f"output {name} changed"
    return None
