"""The QAT model (edgekit.quantize.qat) as a Q/DQ ONNX: NNCF's own Q/DQ export through the TorchScript exporter,
its weights rewritten as NNCF's int8 codes, and checked against the fake-quantized torch model."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.quantize.qdq_model import LIBRARY_KEY

if TYPE_CHECKING:
    from edgekit.ingest import ModelSpec

QAT_OPSET = 17  # the canonical opset; Q/DQ with per-channel axes needs >= 13
EXPORT_TOLERANCE = 0.01  # ONNX Runtime vs the fake-quantized model, relative L2 error (at least; _check_export)
CHECK_SAMPLES = 8


def library() -> str:
    """The library that trained the model, as recorded ("nncf 3.4.0")."""
    return f"nncf {metadata.version('nncf')}"


def quantizers(model: nn.Module) -> list[Any]:
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for m in model.modules() if isinstance(m, BaseQuantizer)]


def export(student: nn.Module, teacher: nn.Module, spec: ModelSpec, samples: list[torch.Tensor], out: Path) -> None:
    """The fake-quantized model as ONNX QuantizeLinear/DequantizeLinear pairs (NNCF's own export mode),
    checked: same inputs and outputs as spec, and ONNX Runtime computing what the torch model computes on
    a few of `samples` (within twice the quantization's own error: see _check_export)."""
    import warnings

    from nncf.torch.quantization.layers import QuantizerExportMode

    b = max(1, spec.inputs[0].shape[0])
    feeds = [[a[i:i + b] for a in samples] for i in range(0, min(len(samples[0]), CHECK_SAMPLES) - b + 1, b)] \
        or [[a[:b] for a in samples]]
    with torch.no_grad():
        expected = [[t.numpy() for t in student(*f)] for f in feeds]
        fp32 = [[t.numpy() for t in teacher(*f)] for f in feeds]
    example = feeds[0]
    for q in quantizers(student):
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer warnings
            torch.onnx.export(student, tuple(example), str(out), dynamo=False, opset_version=QAT_OPSET,
                              input_names=[i.name for i in spec.inputs], output_names=[o.name for o in spec.outputs],
                              do_constant_folding=True)
    except Exception as e:
        raise EdgekitError(f"exporting the QAT model to ONNX failed: {type(e).__name__}: "
                           f"{str(e).splitlines()[0]}") from None
    model = onnx.load(str(out))
    _int8_weights(model, _onnx_scales(student))
    onnx.helper.set_model_props(model, {LIBRARY_KEY: library()})  # what the backends record as the quantizer
    onnx.save(model, str(out))
    _check_export(out, spec, feeds, expected, fp32)


def _onnx_scales(model: nn.Module) -> list[tuple[np.ndarray, Any]]:
    """(ONNX scale, quantizer) of each NNCF symmetric quantizer, the scale as NNCF's Q/DQ export computes it."""
    from nncf.torch.quantization.layers import SymmetricQuantizer

    out = []
    for q in quantizers(model):
        if isinstance(q, SymmetricQuantizer):
            high = q.scale.detach().abs().double().numpy() + q.eps
            low = high * q.level_low / q.level_high
            out.append((np.squeeze((high - low) / (q.level_high - q.level_low)), q))
    return out


@torch.no_grad()
def _int8_weights(model: onnx.ModelProto, quantizers: list[tuple[np.ndarray, Any]]) -> int:
    """weight -> QuantizeLinear -> DequantizeLinear, as exported, rewritten as int8 codes -> DequantizeLinear
    (ONNX Runtime's own quantizer's form: a quarter of the bytes) holding exactly NNCF's codes: the weight's
    quantizer (the one of its scale) applied by NNCF, then divided by the step. QuantizeLinear on the float
    weight differs: NNCF's weights use the narrow range -127..127 (a weight the fine-tune pushed past its
    scale would get -128), and NNCF's float arithmetic rounds a weight within 1e-6 of a half step the other
    way; one such step in one weight flips activations' rounding downstream (3% L2 error at the output of a
    10-layer ResNet, measured). Returns how many weights were rewritten."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consts.update({name: numpy_helper.to_array(i) for name, i in inits.items()})
    uses: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    done = 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]:
        scale, zp = consts.get(q.input[1]), consts.get(q.input[2]) if len(q.input) > 2 else None
        w = numpy_helper.to_array(inits[q.input[0]])
        dqs = uses.get(q.output[0], [])
        owner = [fq for r, fq in quantizers if scale is not None and r.shape == scale.shape
                 and np.allclose(r, scale, rtol=1e-5, atol=0)]
        if not owner or zp is None or zp.dtype != np.int8 or np.any(zp != 0) or w.dtype.kind != "f" or \
                not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        step = scale.reshape([-1 if d == axis % w.ndim else 1 for d in range(w.ndim)]) if scale.size > 1 else scale
        fake = owner[0](torch.from_numpy(w.copy())).numpy()  # NNCF's fake-quantized weight: on its grid
        codes = np.clip(np.rint(fake / step), owner[0].level_low, owner[0].level_high).astype(np.int8)
        name = f"{q.input[0]}_int8"
        model.graph.initializer.append(numpy_helper.from_array(codes, name))
        for d in dqs:
            d.input[0] = name
        model.graph.node.remove(q)
        if len(uses[q.input[0]]) == 1:
            model.graph.initializer.remove(inits[q.input[0]])
        done += 1
    return done


def _relative_l2(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(a - ref) / max(float(np.linalg.norm(ref)), 1e-12))


def _check_export(path: Path, spec: ModelSpec, feeds: list[list[torch.Tensor]], expected: list[list[np.ndarray]],
                  fp32: list[list[np.ndarray]]) -> None:
    """Names and shapes as spec's, Q/DQ present, and ONNX Runtime (the graph as written) within EXPORT_TOLERANCE,
    or twice the fake-quantized model's own error against FP32, of the torch model: not exact, since float
    rounding (1e-7) puts a value on the other side of a rounding boundary now and then, a whole step that
    cascades through the next quantizers (one flip became hundreds three layers on in a 10-layer ResNet:
    2-3% L2 error at its output); two INT8 runtimes differ alike. A wrong scale or axis errs far beyond."""
    import onnxruntime as ort

    from edgekit.ingest.spec import _tensor_spec

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    got = [(t.name, t.shape) for t in map(_tensor_spec, [*model.graph.input, *model.graph.output])]
    want = [(t.name, t.shape) for t in [*spec.inputs, *spec.outputs]]
    if got != want:
        raise EdgekitError(f"the QAT ONNX has inputs/outputs {got}, not the model's {want}")
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        raise EdgekitError("the QAT ONNX has no QuantizeLinear: NNCF inserted no quantizer")
    opts = ort.SessionOptions()
    # The graph as written: ONNX Runtime's Q/DQ fusions requantize (a Conv's output that is also a model output
    # comes back quantized), a rounding that belongs to the backend's verification, not to this check.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got_all = [session.run(None, {i.name: a.numpy() for i, a in zip(spec.inputs, f)}) for f in feeds]
    for k, name in enumerate(o.name for o in spec.outputs):
        ref = np.concatenate([e[k] for e in expected])
        err = _relative_l2(np.concatenate([g[k] for g in got_all]), ref)
        limit = max(EXPORT_TOLERANCE, 2 * _relative_l2(ref, np.concatenate([f[k] for f in fp32])))
        if err > limit:
            raise EdgekitError(f"the QAT ONNX's output {name} differs from the fake-quantized model by {err:.2g} "
                               f"(relative L2 error, more than {limit:.2g}): the export is not faithful")
