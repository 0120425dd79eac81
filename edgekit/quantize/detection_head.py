"""Detector heads: recognise a detector by its outputs, and find its head in the ONNX graph.

INT8 breaks detection heads (concatenated box + score outputs, sigmoid scores, distribution-focal box
branches): one quantization scale for box coordinates in pixels and scores in 0-1 wipes the scores out.
The usual remedy (Ultralytics' and NNCF's) is to keep the head in float and quantize the backbone. The
head is found from the graph's structure alone, never from layer names: from each graph output back
through the ops that hold no weights (concat, sigmoid/softmax, reshape/transpose/split/slice, the box
decode's arithmetic), up to and including the first weighted op on each path (the last convolutions of
each branch), where the walk stops; a weighted op fed by a Softmax (the distribution-focal 1x1 conv that
takes the bins' expectation) is decode, and the walk goes on through it.
"""

from __future__ import annotations

import math
from typing import Any

import onnx

from edgekit.quantize.ops import WEIGHTED_OPS
from edgekit.verify.metrics import slice_axis

# Ops without weights a detection head decodes with; the walk goes back through these only.
HEAD_OPS = frozenset({
    "Concat", "Sigmoid", "Softmax", "LogSoftmax", "HardSigmoid", "Reshape", "Transpose", "Split", "Slice",
    "Mul", "Add", "Sub", "Div", "Gather", "GatherElements", "Unsqueeze", "Squeeze", "Flatten", "Exp", "Log",
    "Clip", "Relu", "Tanh", "Identity", "Cast", "Expand", "Tile", "Pow", "Sqrt", "ReduceSum", "ReduceMax",
})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})
MIN_ANCHORS = 16  # an anchor axis is at least this long (and SLICE_AXIS_RATIO times the channel-like one)
WEAK_PROXY_NOTE = ("the model looks like a detector ({reason}): cosine, SNR and per-slice figures compare "
                   "tensors, a weak proxy for mAP; the score slices are judged on above-threshold overlap and "
                   "rank order, but only a detection metric shows what INT8 did to the detections: give --task "
                   "detect (with --decoder yolov8|yolov5|yolox|module:function) to judge them by mAP")


def looks_like_detector(spec: Any) -> str | None:
    """Why the model's outputs look like a detector's, or None. From shapes only:
    - one 3-D output with a channel-like axis of 5+ (4 box coordinates + classes, maybe objectness) along a
      much longer anchor axis ([1, 8, 2100], [1, 3549, 6], [1, 25200, 85]); or
    - several outputs, one with a box axis (4 coordinates, or 4 x bins of a distribution-focal branch)
      and another with the same number of anchors (boxes [1, N, 4] + scores [1, N, C], or per-cell maps)."""
    shapes = [(o.name, [d if isinstance(d, int) else 0 for d in o.shape]) for o in spec.outputs]
    distributions = _softmax_outputs(spec)
    for name, shape in shapes:
        if name in distributions:  # a class distribution per position (a text recogniser's [1, 40, 6625])
            continue
        if len(shape) == 3 and (axis := slice_axis(shape)) is not None and shape[axis] >= 5:
            anchors = shape[3 - axis]
            if anchors >= MIN_ANCHORS:
                return (f"output {name} {shape}: {shape[axis]} values per anchor (4 box coordinates + scores) "
                        f"for {anchors} anchors")
    if len(shapes) < 2:
        return None
    for name, shape in shapes:
        for axis in _box_axes(shape):
            anchors = _anchors(shape, axis)
            if anchors < MIN_ANCHORS:
                continue
            for other, oshape in shapes:
                if other != name and any(_anchors(oshape, ax) == anchors for ax in range(1, len(oshape))):
                    return (f"outputs {name} {shape} (box coordinates along axis {axis}) and {other} {oshape} "
                            f"for {anchors} anchors")
    return None


LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")  # move values, never change them


def _softmax_outputs(spec: Any) -> set[str]:
    """Outputs a Softmax (or LogSoftmax) makes: a class distribution over positions, never a detector's
    concatenated boxes and scores (which end in Concat, their scores in Sigmoid)."""
    try:
        graph = spec.load().graph
    except Exception:  # a spec without a model file (tests build ModelSpecs by hand): shapes decide alone
        return set()
    producer = {t: n for n in graph.node for t in n.output}
    found = set()
    for o in graph.output:
        node = producer.get(o.name)
        while node is not None and node.op_type in LAYOUT_OPS:  # paddle2onnx reshapes after the softmax
            node = producer.get(node.input[0]) if node.input else None
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            found.add(o.name)
    return found


def _box_axes(shape: list[int]) -> list[int]:
    """Axes that could hold box coordinates: 4, or 4 x 8..32 distribution-focal bins; the channel-like axis
    or the last one."""
    candidates = {a for a in (slice_axis(shape), len(shape) - 1) if a is not None and a >= 1}
    return sorted(a for a in candidates if shape[a] == 4 or (shape[a] % 4 == 0 and 8 <= shape[a] // 4 <= 32))


def _anchors(shape: list[int], axis: int) -> int:
    rest = [d for i, d in enumerate(shape) if i not in (0, axis)]
    return math.prod(rest) if rest and all(d > 0 for d in rest) else 0


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """The head's node names, in graph order: every weightless op on a float path back from a graph
    output, and the first weighted op reached on each path (kept, then the walk stops there). Ops of
    other kinds (pooling, resize, normalisation) end a path without being taken. Unnamed nodes are
    left out: exclude lists match by name."""
    producer = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name for i in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output,
                                                            *model.graph.input]}
    taken: set[int] = set()
    todo = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while todo:
        tensor = todo.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None or id(node) in taken:
            continue
        if node.op_type in WEIGHTED_OPS:
            taken.add(id(node))
            # A weighted op right after a Softmax takes a distribution's expectation (the distribution-focal
            # box decode: a fixed 1x1 conv over the bins): part of the decode, so the walk goes on through it.
            first = producer.get(node.input[0]) if node.input else None
            if first is not None and first.op_type == "Softmax":
                todo.append(node.input[0])
            continue
        if node.op_type not in HEAD_OPS:
            continue
        taken.add(id(node))
        for x in node.input:  # float data only: shape and index computations are not the head
            if x and x not in initializers and types.get(x, onnx.TensorProto.FLOAT) in FLOAT_TYPES:
                todo.append(x)
    return [n.name for n in model.graph.node if id(n) in taken and n.name]


def detector_head(spec: Any) -> tuple[str, list[str]] | None:
    """(why the model looks like a detector, its head's node names), or None when it does not look like
    one or no head could be found."""
    reason = looks_like_detector(spec)
    if reason is None:
        return None
    model = spec.load()
    nodes = head_nodes(model)
    if not any(n.op_type in WEIGHTED_OPS for n in model.graph.node if n.name in set(nodes)):
        return None  # no weighted op ends the walk: what was found is not a head on top of a backbone
    return reason, nodes
