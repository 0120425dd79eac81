"""NCNN backend: param/bin by pnnx from the canonical ONNX (rewritten where pnnx converts it badly:
rewrite.pnnx_graph; what pnnx leaves unconvertible refused before ncnn loads it: convert.py); FP16
weight storage per layer; INT8 by edgekit's Python ports of ncnn2table and ncnn2int8 (int8.py), run
with the ncnn runtime."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.backends.ncnn import int8 as ncnn_int8
from edgekit.backends.ncnn.convert import pnnx_warnings, refuse_unconvertible, run_pnnx
from edgekit.backends.ncnn.param_bin import NcnnModel, UnsupportedNcnnLayer, set_storage, to_mat
from edgekit.backends.ncnn.rewrite import pnnx_graph
from edgekit.errors import BadInput, EdgekitError
from edgekit.quantize.fp16_range import fp16_range_problem, same_weights_any_layout

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan, QuantizationSettings

# Layer param 31 is ncnn's per-layer feature mask: bit 0 turns fp16 arithmetic off, bit 1 fp16 storage
# (net.cpp get_masked_option). FP32 storage alone is not enough: with use_fp16_storage the runtime
# casts FP32-stored weights to fp16 at load time (x86 InnerProduct, ARM convolutions).
FEATMASK = 31
NO_FP16 = 0b11

FP16_ARITHMETIC = "fp16 storage and fp16 arithmetic"
FP16_STORAGE = "fp16 storage, fp32 arithmetic"

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
                 outputs: list[str], output_shapes: list[list[int]],
                 runtime_options: dict[str, Any] | None = None) -> None:
        import ncnn

        self.threads = threads
        self.net = ncnn.Net()
        _opt(self.net, precision, threads)
        for option, value in (runtime_options or {}).items():  # as the device runner and the loaders apply them
            setattr(self.net.opt, option, value)
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(bin_)) != 0:
            raise EdgekitError(f"ncnn could not load {param}")
        self.inputs, self.outputs, self.output_shapes = inputs, outputs, output_shapes
        self._ncnn = ncnn
        self._files, self._precision = (Path(param), Path(bin_)), precision

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ex = self.net.create_extractor()
        for blob, x in zip(self.inputs, feeds.values()):
            ex.input(blob, to_mat(self._ncnn, x[0]))  # ncnn has no batch axis
        return [self._extract(ex, blob).reshape(shape) for blob, shape in zip(self.outputs, self.output_shapes)]

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        """Every layer's output blob, in layer order (Split only copies its input: skipped), as floats.

        INT8's requantize fusion (int8_scale_term + 100) makes a conv feeding int8 convs write its output
        as int8 codes at the consumer's input scale (x_int8 = round(x * scale)): extracted, that blob holds
        the codes. Divided by the layer's top_blob_int8_scale it compares with a float reference."""
        ex = self.net.create_extractor()
        for blob, x in zip(self.inputs, feeds.values()):
            ex.input(blob, to_mat(self._ncnn, x[0]))
        blob_names = [b.name for b in self.net.blobs()]
        got = [([blob_names[t]], self._extract(ex, blob_names[t]).astype(np.float32))
               for layer in self.net.layers() if layer.type not in ("Input", "Split") for t in layer.tops]
        return self.as_floats(got)

    def as_floats(self, got: list[tuple[list[str], np.ndarray]]) -> list[tuple[list[str], np.ndarray]]:
        """Blobs as ncnn holds them (int8 codes where it requantized) as the floats the next layer consumes; also
        for blobs another process extracted (the device runner under emulation)."""
        scales = requantized_scales(*self._files) if self._precision == "int8" else {}
        return [(names, arr / scales[names[0]] if names[0] in scales else arr) for names, arr in got]

    def _extract(self, ex: Any, blob: str) -> np.ndarray:
        ret, mat = ex.extract(blob)
        if ret != 0:
            raise EdgekitError(f"ncnn could not compute blob {blob} (error {ret})")
        return np.array(mat)


def requantized_scales(param: Path, bin_: Path) -> dict[str, float]:
    """Blob -> top_blob_int8_scale of every requantizing layer of an INT8 net (int8_scale_term > 100)."""
    model = NcnnModel.load(param, bin_)
    scales = {}
    for layer in model.layers:
        blobs = model.weights.get(layer.name, [])
        if layer.type in ("Convolution", "ConvolutionDepthWise") and layer.int(8) > 100 and blobs and layer.tops:
            scale = float(blobs[-1].data[0])  # the last blob ncnn reads for +100: the top blob's int8 scale
            if scale > 0:
                scales[layer.tops[0]] = scale
    return scales


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
    calibration_methods = ("minmax", "entropy")  # ncnn2int8's KL serves "percentile" too
    requires = ("ncnn", "pnnx")
    install_hint = "pip install 'edgekit[ncnn]'"
    int8_weighted_layers_only = True  # ncnn2int8 quantizes weighted layers; the rest runs in float
    runtime_distributions = ("ncnn",)
    report_color = "#E69F00"
    device_modules = ("ncnn", "numpy")
    verifies_under_emulation = True

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

    def emulation_variants(self, artifact: Artifact, cpu_features: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """FP16 on an ARMv8.2 CPU (asimdhp): ncnn's fp16 arithmetic (its fastest mode there, and its default) when
        it verifies, else fp16 storage with fp32 arithmetic. x86 has no fp16 arithmetic: only the board can say."""
        if artifact.precision == "fp16" and {"asimdhp", "fphp"} & set(cpu_features):
            return [(FP16_ARITHMETIC, {"use_fp16_arithmetic": True}), (FP16_STORAGE, {"use_fp16_arithmetic": False})]
        return [("as built", {})]

    def arithmetic_precision(self, precision: str, details: dict[str, Any]) -> str:
        """FP16 computes in fp16 only with use_fp16_arithmetic (chosen where the emulated board verified it);
        otherwise ncnn converts to FP32 for the arithmetic, at the FP32 peak."""
        if precision == "fp16" and not (details.get("runtime_options") or {}).get("use_fp16_arithmetic"):
            return "fp32"
        return precision

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
                           threads, d["input_blobs"], d["output_blobs"], d["output_shapes"], d.get("runtime_options"))

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
                r, out_param, out_bin = run_pnnx(model, spec, Path(tmp))
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
