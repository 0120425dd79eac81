"""pnnx, the ONNX -> ncnn converter, run on the graph edgekit gives it, and the refusal of what pnnx leaves
unconvertible (op types ncnn's layer registry lacks, layers whose params ncnn rejects) before ncnn ever
loads the file, naming the ONNX node and pnnx's own warning."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from edgekit.backends.ncnn.rewrite import tensor_shapes
from edgekit.errors import EdgekitError, UnsupportedOp

if TYPE_CHECKING:
    from edgekit.ingest import ModelSpec

PNNX_TIMEOUT_S = 600
PNNX_MAX_IR_VERSION = 13  # pnnx 20261020 loads ONNX through ONNX Runtime 1.30; the canonical opset 17 needs IR 8


def run_pnnx(model: onnx.ModelProto, spec: ModelSpec, tmp: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    import pnnx

    shapes = ",".join("[" + ",".join(str(d) for d in i.shape) + "]" for i in spec.inputs)
    src = tmp / "model.onnx"
    if model.ir_version > PNNX_MAX_IR_VERSION:  # pnnx embeds an older ONNX Runtime
        model = copy.copy(model)
        model.ir_version = PNNX_MAX_IR_VERSION
    onnx.save(model, src)
    try:  # fp16=0: edgekit chooses the storage per layer afterwards
        r = subprocess.run([pnnx.EXEC_PATH, str(src), f"inputshape={shapes}", "fp16=0"], cwd=tmp,
                           capture_output=True, text=True, timeout=PNNX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise EdgekitError(f"pnnx did not finish in {PNNX_TIMEOUT_S} s") from None
    return r, tmp / "model.ncnn.param", tmp / "model.ncnn.bin"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WARNING = re.compile(r"\b(not supported|unsupported|not implemented)\b", re.IGNORECASE)


def pnnx_warnings(log: str) -> list[str]:
    """pnnx's own complaints ("slice with step 2 is not supported", "permute 5-rank tensor is not supported
    yet!"), each once with its count; ONNX Runtime's log lines inside pnnx are not pnnx's."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        line = _ANSI.sub("", line).strip()
        if _WARNING.search(line) and "onnxruntime" not in line and len(line) < 300:
            counts[line] = counts.get(line, 0) + 1
    return [f"{w} (x{n})" if n > 1 else w for w, n in counts.items()]


# pnnx op (Tensor.slice, torch.gather, F.unfold...) -> the ONNX ops it comes from, to name the node
_PNNX_TO_ONNX = {"slice": ("Slice",), "reshape": ("Reshape", "Flatten", "Squeeze", "Unsqueeze"), "view": ("Reshape",),
                 "permute": ("Transpose",), "expand": ("Expand",), "repeat": ("Tile",), "select": ("Gather",),
                 "index_select": ("Gather",), "gather": ("Gather", "GatherElements", "GatherND"),
                 "scatter": ("ScatterElements", "ScatterND"), "unfold": ("Im2Col",), "pad": ("Pad",),
                 "cat": ("Concat",), "split": ("Split",), "tile": ("Tile",), "flip": ("Slice",)}


def refuse_unconvertible(param: Path, pnnx_param: Path, model: onnx.ModelProto, warnings: list[str]) -> None:
    """Raise UnsupportedOp when pnnx left layers ncnn has no implementation for (types ncnn's layer registry
    does not know: `Tensor.slice`, `pnnx.Expression`, ...), naming the first one's ONNX node and pnnx's
    warning for it, on one line."""
    import ncnn

    bad: dict[str, list[str]] = {}
    for line in param.read_text().splitlines()[2:]:
        f = line.split()
        if len(f) >= 2 and ncnn.layer_to_index(f[0]) < 0:
            bad.setdefault(f[0], []).append(f[1])
    if bad:
        kind, layers = next(iter(bad.items()))
        word = kind.rsplit(".", 1)[-1].lower()
        warning = next((w for w in warnings if w.lower().startswith(word)), warnings[0] if warnings else "")
        others = sum(len(v) for v in bad.values()) - 1
        more = f" (and {others} more pnnx op{'s' if others > 1 else ''} ncnn lacks)" if others else ""
        why = f"pnnx: {warning}; " if warning else ""
        raise UnsupportedOp(f"{_where(model, pnnx_param, layers[0], word, kind)} is not supported by ncnn: {why}"
                            f"pnnx left {kind}, which ncnn cannot load{more}; rewrite that part of the model or "
                            "build for another backend")
    problem = _load_param_problem(param)
    if problem:  # a known layer with params ncnn rejects ("layer load_param 6 GRU_1 failed")
        layer, kind = problem
        raise UnsupportedOp(f"{_where(model, pnnx_param, layer, kind.lower(), kind)} is not supported by ncnn: "
                            f"ncnn cannot load pnnx's {kind} layer {layer} (its load_param fails); rewrite that "
                            "part of the model or build for another backend")


def _where(model: onnx.ModelProto, pnnx_param: Path, layer: str, word: str, kind: str) -> str:
    node = _onnx_node_of(model, pnnx_param, layer, word)
    return f"op {node.op_type} (node '{node.name or node.output[0]}')" if node is not None else f"a node (pnnx {kind})"


def _load_param_problem(param: Path) -> tuple[str, str] | None:
    """(layer, type) of the first layer ncnn's load_param rejects, or None when the param file loads. ncnn
    writes its reason to the C stderr; it is captured here, not left as a stray line in the console."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            ret = net.load_param(str(param))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    net.clear()
    if ret == 0:
        return None
    types = {f[1]: f[0] for f in (ln.split() for ln in param.read_text().splitlines()[2:]) if len(f) >= 2}
    m = re.search(r"layer load_param \d+ (\S+) failed", text)
    name = m.group(1) if m else next(iter(types), "?")
    return name, types.get(name, "?")


def _onnx_node_of(model: onnx.ModelProto, pnnx_param: Path, layer: str, word: str) -> onnx.NodeProto | None:
    """The ONNX node a pnnx layer came from: pnnx keeps neither names nor order, so by op type and output
    shape (pnnx.param records every blob's shape)."""
    shape = None
    if pnnx_param.exists():
        for line in pnnx_param.read_text().splitlines():
            f = line.split()
            if len(f) > 4 and f[1] == layer:
                nin, nout = int(f[2]), int(f[3])
                outs = f[4 + nin:4 + nin + nout]
                m = re.search(rf"#{re.escape(outs[0])}=\(([0-9,]*)\)", line) if outs else None
                shape = [int(v) for v in m.group(1).split(",") if v] if m else None
                break
    ops = _PNNX_TO_ONNX.get(word) or tuple({n.op_type for n in model.graph.node if n.op_type.lower() == word}) or None
    shapes = tensor_shapes(model) if shape is not None else {}
    candidates = [n for n in model.graph.node if ops is None or n.op_type in ops]
    for n in candidates:
        if shape is not None and n.output and shapes.get(n.output[0]) == shape:
            return n
    return candidates[0] if candidates and ops is not None else None
