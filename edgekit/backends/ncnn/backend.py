"""NCNN backend: param/bin by pnnx from the canonical ONNX (rewritten where pnnx converts it badly:
pnnx_graph; what pnnx leaves unconvertible refused before ncnn loads it: refuse_unconvertible); FP16
weight storage per layer; INT8 by edgekit's Python ports of ncnn2table and ncnn2int8 (ncnn_int8.py), run
with the ncnn runtime."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.backends.ncnn.param_bin import to_mat
from edgekit.errors import BadInput, EdgekitError, UnsupportedOp
from edgekit.quantize.fp16_range import fp16_range_problem, same_weights_any_layout

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan, QuantizationSettings

PNNX_TIMEOUT_S = 600
# Layer param 31 is ncnn's per-layer feature mask: bit 0 turns fp16 arithmetic off, bit 1 fp16 storage
# (net.cpp get_masked_option). FP32 storage alone is not enough: with use_fp16_storage the runtime
# casts FP32-stored weights to fp16 at load time (x86 InnerProduct, ARM convolutions).
FEATMASK = 31
NO_FP16 = 0b11
PNNX_MAX_IR_VERSION = 13  # pnnx 20261020 loads ONNX through ONNX Runtime 1.30; the canonical opset 17 needs IR 8

# ONNX ops that pnnx converts to ncnn layers (pnnx's onnx frontend + pass_ncnn). Shape arithmetic
# (Shape, Gather on shapes, Constant...) is folded by pnnx and needs no ncnn layer.
NCNN_ONNX_OPS = frozenset({
    "Abs", "Acos", "Add", "And", "ArgMax", "ArgMin", "Asin", "Atan", "AveragePool", "BatchNormalization",
    "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cumsum",
    "DepthToSpace", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor",
    "Gather", "GatherElements", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GridSample",
    "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
    "LayerNormalization", "LeakyRelu", "Less", "Log", "LogSoftmax", "LRN", "LSTM", "MatMul", "Max", "MaxPool",
    "Mean", "Min", "Mish", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu", "Range", "Reciprocal", "ReduceL1",
    "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "RNN", "Round", "Shape", "Sigmoid", "Sign", "Sin", "Slice",
    "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh",
    "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where",
})


def _opt(net: Any, precision: str, threads: int) -> None:
    """Runtime options per precision. ncnn enables fp16 storage/arithmetic, bf16 and int8 when the CPU
    has them, so an FP32 artifact must turn them off to compute what was verified."""
    o = net.opt
    o.num_threads = threads
    o.use_vulkan_compute = False
    o.use_bf16_storage = False
    o.use_fp16_storage = o.use_fp16_packed = precision == "fp16"
    o.use_fp16_arithmetic = False  # arithmetic precision follows storage only on ARMv8.2 devices
    o.use_int8_inference = precision == "int8"


class NcnnSession:
    def __init__(self, param: Path, bin_: Path, precision: str, threads: int, inputs: list[str],
                 outputs: list[str], output_shapes: list[list[int]]) -> None:
        import ncnn

        self.threads = threads
        self.net = ncnn.Net()
        _opt(self.net, precision, threads)
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(bin_)) != 0:
            raise EdgekitError(f"ncnn could not load {param}")
        self.inputs, self.outputs, self.output_shapes = inputs, outputs, output_shapes
        self._ncnn = ncnn

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ex = self.net.create_extractor()
        for blob, x in zip(self.inputs, feeds.values()):
            ex.input(blob, to_mat(self._ncnn, x[0]))  # ncnn has no batch axis
        return [self._extract(ex, blob).reshape(shape) for blob, shape in zip(self.outputs, self.output_shapes)]

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        """Every layer's output blob, in layer order (Split only copies its input: skipped)."""
        ex = self.net.create_extractor()
        for blob, x in zip(self.inputs, feeds.values()):
            ex.input(blob, to_mat(self._ncnn, x[0]))
        blob_names = [b.name for b in self.net.blobs()]
        return [([blob_names[t]], self._extract(ex, blob_names[t]).astype(np.float32))
                for layer in self.net.layers() if layer.type not in ("Input", "Split") for t in layer.tops]

    def _extract(self, ex: Any, blob: str) -> np.ndarray:
        ret, mat = ex.extract(blob)
        if ret != 0:
            raise EdgekitError(f"ncnn could not compute blob {blob} (error {ret})")
        return np.array(mat)


def _io_blobs(param: Path) -> tuple[list[str], list[str]]:
    """Input blobs are the Input layers' tops; outputs are the blobs no layer consumes, in pnnx's outN order."""
    produced, consumed, inputs = [], set(), []
    for line in param.read_text().splitlines()[2:]:
        f = line.split()
        if len(f) < 4:
            continue
        nb, nt = int(f[2]), int(f[3])
        bottoms, tops = f[4:4 + nb], f[4 + nb:4 + nb + nt]
        consumed.update(bottoms)
        produced += tops
        if f[0] == "Input":
            inputs += tops
    outputs = [b for b in produced if b not in consumed]
    outputs.sort(key=lambda b: (not b.startswith("out"), int(b[3:]) if b[3:].isdigit() else 0, b))
    return inputs, outputs


@register
class NcnnBackend(Backend):
    name = "ncnn"
    precisions = ("fp32", "fp16", "int8")
    requires = ("ncnn", "pnnx")
    install_hint = "pip install 'edgekit[ncnn]'"

    def versions(self) -> dict[str, str]:
        return {d: metadata.version(d) for d in ("ncnn", "pnnx")}

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        issues = [OpIssue(self.name, n.op_type, n.name, "not in pnnx's ONNX -> ncnn op set")
                  for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in NCNN_ONNX_OPS]
        for i in model.graph.input:
            dims = i.type.tensor_type.shape.dim
            if dims and dims[0].dim_value > 1:
                issues.append(OpIssue(self.name, "Input", i.name,
                                      f"ncnn runs batch 1, input has batch {dims[0].dim_value}"))
        return issues

    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path) -> Artifact:
        param, bin_ = root / "model.ncnn.param", root / "model.ncnn.bin"
        details: dict[str, Any] = {"converter": "pnnx", "storage": "fp32", **self._pnnx(spec, param, bin_)}
        notes: list[str] = []
        if plan.precision == "fp16":
            kept, notes = self._fp16_storage(spec, plan, param, bin_)
            details.update(storage="fp16", keep_fp32=sorted(kept), keep_fp32_reasons=kept)
        elif plan.precision == "int8":
            if calibration is None or len(calibration) == 0:
                raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
            int8_details, notes = self._int8(spec, plan, calibration, param, bin_, root)
            details.update(int8_details)
        elif plan.precision != "fp32":
            raise BadInput(f"{self.name} cannot build precision {plan.precision}")
        inputs, outputs = _io_blobs(param)
        if len(inputs) != len(spec.inputs) or len(outputs) != len(spec.outputs):
            raise EdgekitError(f"pnnx produced {len(inputs)} inputs / {len(outputs)} outputs, "
                               f"the model has {len(spec.inputs)} / {len(spec.outputs)}")
        details.update(input_blobs=inputs, output_blobs=outputs, output_shapes=[o.shape for o in spec.outputs])
        files = [p.name for p in sorted(root.iterdir()) if p.is_file()]
        return Artifact(self.name, plan.precision, str(root), files, param.name, details, notes)

    def int8_retries(self, q: QuantizationSettings) -> list[tuple[str, QuantizationSettings]]:
        """What the build tries when INT8 is rejected. ncnn has no 7-bit weights (reduce_range would
        rebuild the same artifact); the other calibration method can help: KL clips rare outliers that
        set a minmax scale, minmax keeps a tail that KL clipped."""
        if q.method == "minmax":
            return [("entropy (KL) calibration", dataclasses.replace(q, method="entropy"))]
        return [("minmax calibration", dataclasses.replace(q, method="minmax"))]

    def load(self, artifact: Artifact, threads: int) -> NcnnSession:
        d = artifact.details
        root = Path(artifact.root)
        return NcnnSession(root / artifact.entry, root / artifact.entry.replace(".param", ".bin"), artifact.precision,
                           threads, d["input_blobs"], d["output_blobs"], d["output_shapes"])

    # ------------------------------------------------------------ conversion

    @staticmethod
    def _pnnx(spec: ModelSpec, param: Path, bin_: Path) -> dict[str, Any]:
        """pnnx on the canonical graph (rewritten where pnnx converts it badly, the rewrite checked equal in
        ONNX Runtime). pnnx exits 0 even when it leaves torch ops ncnn has no layer for (`Tensor.slice`):
        those are refused here, naming the ONNX node and pnnx's warning, before ncnn ever loads the file."""
        canonical = spec.load()
        rewritten, rewrites = pnnx_graph(canonical, spec)
        candidates = [(rewritten, rewrites)] + ([(canonical, [])] if rewrites else [])
        for i, (model, applied) in enumerate(candidates):
            last = i == len(candidates) - 1
            with tempfile.TemporaryDirectory(prefix="edgekit-pnnx-") as tmp:
                r, out_param, out_bin = _run_pnnx(model, spec, Path(tmp))
                if r.returncode != 0 or not out_param.exists():
                    if not last:  # the rewritten graph broke pnnx: the graph as it is
                        continue
                    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise EdgekitError(f"pnnx failed (exit {r.returncode}): {tail[0]}")
                warnings = pnnx_warnings(r.stdout + "\n" + r.stderr)
                refuse_unconvertible(out_param, Path(tmp) / "model.pnnx.param", model, warnings)
                shutil.copyfile(out_param, param)
                shutil.copyfile(out_bin, bin_)
            details: dict[str, Any] = {}
            if applied:
                details["pnnx_rewrites"] = applied
            if i:
                details["pnnx_rewrites"] = ["pnnx failed on edgekit's rewritten graph; the graph was converted "
                                            "as it is"]
            if warnings:
                details["pnnx_warnings"] = warnings
            return details
        raise AssertionError("unreachable")

    @staticmethod
    def _fp16_storage(spec: ModelSpec, plan: ArtifactPlan, param: Path, bin_: Path) -> tuple[dict[str, str], list[str]]:
        """FP16 storage for every weighted layer except those whose stored weights leave the FP16 range
        (checked on the ncnn blobs themselves: pnnx transposes and folds weights, so the ONNX values
        need not be what is stored) and those the plan keeps in FP32. Returns {ncnn layer: why}.
        A .bin edgekit cannot read (a layer type newer than its layout table) keeps pnnx's FP32 storage,
        with a note, rather than failing the artifact: ncnn still runs it with fp16 storage."""
        from edgekit.backends.ncnn.param_bin import NcnnModel, UnsupportedNcnnLayer, set_storage

        try:
            model = NcnnModel.load(param, bin_)
        except UnsupportedNcnnLayer as e:
            if plan.keep_fp32:
                raise
            return {}, [f"weights left in FP32 storage as pnnx wrote them (ncnn casts them to fp16 at load time; "
                        f"no FP16 range check): {e}"]
        onnx_model = spec.load()
        kept: dict[str, str] = {}
        for layer in model.layers:
            for i, blob in enumerate(model.weights.get(layer.name, [])):
                what = layer.name if i == 0 else f"{layer.name} (blob {i})"
                # a bias near zero loses nothing when flushed (fp16_range_problem's tiny_matters)
                why = fp16_range_problem(blob.data, what, tiny_matters=blob.role == "weight") if blob.tagged else None
                if why:
                    kept[layer.name] = why
                    break
        for node, layers in _layers_for_nodes(model, onnx_model, plan.keep_fp32, "keep in FP32").items():
            for name in layers:
                kept.setdefault(name, f"ONNX node {node} is kept in FP32 by the plan (--exclude-node)")
        origin = _onnx_origin(model, onnx_model, kept)
        notes = []
        for layer in model.layers:
            if layer.name not in model.weights:
                continue
            if layer.name in kept:
                layer.set(FEATMASK, layer.int(FEATMASK) | NO_FP16)
                notes.append(f"ncnn layer {layer.name} ({layer.type}{origin.get(layer.name, '')}) kept in FP32 "
                             f"storage and compute (featmask): {kept[layer.name]}")
            else:
                set_storage(model, layer.name, "fp16")
        model.save(param, bin_)
        return kept, notes

    def _int8(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset, param: Path, bin_: Path,
              root: Path) -> tuple[dict[str, Any], list[str]]:
        from edgekit.backends.ncnn import int8 as ncnn_int8
        from edgekit.backends.ncnn.param_bin import NcnnModel

        q = plan.quantization
        assert q is not None, "an int8 artifact plan carries quantization settings"
        method = {"minmax": "minmax", "entropy": "kl", "percentile": "kl"}[q.method]
        inputs, _ = _io_blobs(param)
        batches = [dict(zip(inputs, b.values())) for b in calibration.batches(spec)[: q.samples]]
        model = NcnnModel.load(param, bin_)
        named = _layers_for_nodes(model, spec.load(), q.exclude_nodes, "keep in float", weightless_ok=True)
        exclude = {layer for layers in named.values() for layer in layers}
        selectors = _selector_layers(model)  # edgekit's own strided-slice rewrite: exact in float, keep it so
        table = ncnn_int8.calibration_table(param, bin_, batches, method=method, exclude=exclude | selectors)
        ncnn_int8.write_table(root / "model.table", table)
        fp32_param, fp32_bin = root / "fp32.param", root / "fp32.bin"
        param.rename(fp32_param)
        bin_.rename(fp32_bin)
        quantized = ncnn_int8.quantize_model(fp32_param, fp32_bin, table, param, bin_)
        fp32_param.unlink()
        fp32_bin.unlink()
        done = set(quantized)
        by_type: dict[str, int] = {}
        for layer in model.layers:
            if layer.name in done:
                by_type[layer.type] = by_type.get(layer.type, 0) + 1
        # Weighted layers ncnn has no int8 kernel for (LayerNorm's gamma/beta are raw fp32 anyway): float.
        no_int8: dict[str, int] = {}
        for layer in model.layers:
            weighted = any(b.tagged and b.role == "weight" for b in model.weights.get(layer.name, []))
            if weighted and layer.name not in done | exclude | selectors:
                no_int8[layer.type] = no_int8.get(layer.type, 0) + 1
        notes = []
        unported = {t: n for t, n in no_int8.items() if t in ncnn_int8.NOT_PORTED}
        no_kernel = {t: n for t, n in no_int8.items() if t not in ncnn_int8.NOT_PORTED}
        if no_kernel:
            notes.append("ncnn layers kept in float (ncnn has no int8 kernel for them): "
                         + ", ".join(f"{n} {t}" for t, n in sorted(no_kernel.items())))
        if unported:
            notes.append("ncnn layers kept in float (ncnn2int8 quantises them; edgekit's port does not yet): "
                         + ", ".join(f"{n} {t}" for t, n in sorted(unported.items())))
        if selectors:
            notes.append(f"{len(selectors)} stride-selector convolution(s) from edgekit's strided-Slice rewrite "
                         "kept in float (exact there)")
        weights = "8-bit per output channel (6-bit for 3x3 stride-1 convolutions: int8 Winograd)"
        if by_type.keys() & set(ncnn_int8.DYNAMIC):
            weights += ("; Gemm: one scale per weight matrix, MultiHeadAttention: per output row for q/k/v and "
                        "one for the output projection, inputs quantised at run time (ncnn's int8 kernels)")
        if q.reduce_range:
            weights += "; reduce_range does not apply to ncnn"
        details = {"quantizer": "edgekit ncnn2table + ncnn2int8 (Python ports)", "calibration": method,
                   "weights": weights,
                   "calibration_samples": len(batches), "table": "model.table", "storage": "int8 weights",
                   "int8_layers": len(quantized), "int8_layer_types": by_type, "kept_float": sorted(exclude),
                   "runtime_options": {"use_int8_inference": True}}
        if no_int8:
            details["float_layer_types"] = no_int8
        return details, notes


def _selector_layers(model: Any) -> set[str]:
    """ncnn layers that only pick every s-th pixel: depthwise 1x1 convolutions with stride > 1, weights all
    exactly 1 and no bias (what edgekit writes for a strided Slice). INT8 would only add rounding to them."""
    found = set()
    for layer in model.layers:
        p = layer.int
        if layer.type != "ConvolutionDepthWise" or p(5) or p(1) != 1 or p(11, p(1)) != 1:
            continue
        if p(3, 1) == 1 and p(13, p(3, 1)) == 1:
            continue
        blobs = model.weights.get(layer.name, [])
        if blobs and np.all(blobs[0].data == 1.0):
            found.add(layer.name)
    return found


def _weight_of(onnx_model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray | None:
    """A node's weight: its largest initializer input (biases are small, and an all-zero bias would
    match every other zero bias)."""
    inits = {i.name: i for i in onnx_model.graph.initializer}
    arrays = [numpy_helper.to_array(inits[x]) for x in node.input if x in inits]
    arrays = [a for a in arrays if a.size > 1]
    return max(arrays, key=lambda a: a.size) if arrays else None


def _layers_for_nodes(model: Any, onnx_model: onnx.ModelProto, nodes: list[str], purpose: str,
                      weightless_ok: bool = False) -> dict[str, list[str]]:
    """The ncnn layers holding each named ONNX node's weights, found by value in any layout (pnnx renames
    layers and transposes weights). A name that matches nothing is an error, never a silent no-op.
    weightless_ok: a node without weights needs nothing (ncnn's INT8 leaves those layers in float)."""
    if not nodes:
        return {}
    by_name = {n.name: n for n in onnx_model.graph.node}
    unknown = [n for n in nodes if n not in by_name]
    if unknown:
        raise BadInput(f"ncnn: no node named {', '.join(map(repr, unknown))} in the model to {purpose} "
                       "(names as `edgekit inspect` lists them)")
    found: dict[str, list[str]] = {}
    for name in dict.fromkeys(nodes):
        weight = _weight_of(onnx_model, by_name[name])
        if weight is None:
            if weightless_ok:
                continue
            raise EdgekitError(f"ncnn: cannot {purpose} node {name} ({by_name[name].op_type}): it has no weights "
                               "to find its ncnn layer by; build ncnn fp32 for this model")
        layers = [layer.name for layer in model.layers
                  if any(same_weights_any_layout(b.data, weight) for b in model.weights.get(layer.name, []))]
        if not layers:
            raise EdgekitError(f"ncnn: cannot {purpose} node {name} ({by_name[name].op_type}): no ncnn layer holds "
                               "its weights (pnnx fused or rewrote them)")
        found[name] = layers
    return found


def _onnx_origin(model: Any, onnx_model: onnx.ModelProto, layers: dict[str, str]) -> dict[str, str]:
    """', ONNX node X' for each of these ncnn layers whose weights an ONNX node holds (for the notes)."""
    if not layers:
        return {}
    weights = [(n, w) for n in onnx_model.graph.node if (w := _weight_of(onnx_model, n)) is not None]
    origin = {}
    for name in layers:
        blobs = model.weights.get(name, [])
        node = next((n for n, w in weights if blobs and same_weights_any_layout(blobs[0].data, w)), None)
        origin[name] = f", ONNX node {node.name}" if node is not None else ", weights folded by pnnx"
    return origin


# ---------------------------------------------------------------- the ONNX graph given to pnnx

INT64_MAX = 2**63 - 1


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
    shapes = _shapes(new)
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


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
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


def _run_pnnx(model: onnx.ModelProto, spec: ModelSpec, tmp: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
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
    shapes = _shapes(model) if shape is not None else {}
    candidates = [n for n in model.graph.node if ops is None or n.op_type in ops]
    for n in candidates:
        if shape is not None and n.output and shapes.get(n.output[0]) == shape:
            return n
    return candidates[0] if candidates and ops is not None else None
