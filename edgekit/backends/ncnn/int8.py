"""NCNN INT8 in Python: what upstream ships only as the C++ tools ncnn2table and ncnn2int8.

calibration_table (ncnn2table): per-output-channel weight scales (127/absmax; 31/absmax for 3x3 stride-1
convolutions, whose int8 Winograd F43 kernels need 6-bit weights) and one scale per quantised layer's
input blob, from the FP32 ncnn net run over the calibration data with the ncnn runtime: minmax, or KL
(ncnn's 2048-bin |x| histogram reduced to 128 bins, zeros skipped).

quantize_model (ncnn2int8): int8 weights with the int8 tag, int8_scale_term (param 8) = 2 for Convolution
and InnerProduct, 1 for ConvolutionDepthWise, scales appended to the .bin after the bias, and the
requantize fusion (+100, the next layer's input scale) where a quantised conv feeds quantised convs.

Transformer layers (ncnn's gemm.cpp and multiheadattention.cpp forward_int8) quantise their inputs
dynamically at run time (per row, absmax), so they need weight scales only, no calibration:
- Gemm with a constant operand (pnnx's Linear on token sequences): quantize_term (param 18) = 2, the
  constant B as int8 with ONE scale for the whole matrix (the runtime reads a single B scale), stored
  transposed (transB = 1) as ncnn2int8 does; a constant A gets one scale per row. Table key
  `<layer>_param_0` (upstream ncnn2int8 computes these itself and quantises every Gemm; edgekit writes
  them so a commented-out line keeps that Gemm in float).
- MultiHeadAttention: param 18 = 2, q/k/v weights with one scale per output row (`_param_0/1/2`), the
  output projection one scale (`_param_3`), as ncnn2table writes them.
Everything else stays float: LayerNorm, Softmax, the MatMul between activations, and the layers ncnn2int8
quantises that this port does not yet (NOT_PORTED: Embed, LSTM, GRU, RNN).

Scales are multipliers (x_int8 = round(x * scale)), the reciprocal of an ONNX scale.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from edgekit.backends.ncnn.param_bin import NcnnLayer, NcnnModel, WeightBlob, to_mat
from edgekit.console import progress
from edgekit.errors import BadInput, EdgekitError
from edgekit.quantize.calibration import EntropyCalibrator, MinMaxCalibrator, RangeCalibrator

CALIBRATED = ("Convolution", "ConvolutionDepthWise", "InnerProduct")  # static input scale from calibration
DYNAMIC = ("Gemm", "MultiHeadAttention")  # weight scales only: the runtime quantises their inputs per row
QUANTIZABLE = CALIBRATED + DYNAMIC
NOT_PORTED = ("Embed", "LSTM", "GRU", "RNN")  # ncnn2int8 quantises their weights; this port keeps them float
METHODS = ("kl", "minmax")
CALIBRATORS: dict[str, type[RangeCalibrator]] = {"kl": EntropyCalibrator, "minmax": MinMaxCalibrator}
Table = dict[str, np.ndarray]


def quantizable_layers(model: NcnnModel, exclude: Iterable[str] = ()) -> list[NcnnLayer]:
    skip = set(exclude)
    return [layer for layer in model.layers
            if layer.type in QUANTIZABLE and layer.name in model.weights and layer.name not in skip
            and model.weights[layer.name][0].storage != "int8" and (layer.type != "Gemm" or _gemm_operand(layer))]


def _gemm_operand(layer: NcnnLayer) -> str:
    """The constant operand of a Gemm ncnn can run in int8 with stored weights: "A" or "B" ("" for none
    or both: both constant is a folded constant, nothing to multiply at run time)."""
    a, b = layer.int(4), layer.int(5)
    return "" if a == b else ("A" if a else "B")


def _absmax_scales(rows: np.ndarray) -> np.ndarray:
    absmax = np.abs(rows).max(axis=1)
    # An all-zero row has nothing to scale: 1 keeps its codes 0 instead of dividing by zero.
    return np.where(absmax > 0, 127.0 / np.maximum(absmax, 1e-30), 1.0).astype(np.float32)


def _mha_dims(layer: NcnnLayer) -> tuple[int, int, int, int]:
    embed = layer.int(0)
    return embed, layer.int(2) // embed, layer.int(3, embed), layer.int(4, embed)


def dynamic_weight_scales(model: NcnnModel, layer: NcnnLayer) -> list[np.ndarray]:
    """Scales of a Gemm's constant operand ([1] for B, one per row for A) or a MultiHeadAttention's q, k,
    v (one per output row) and output projection ([1]), as ncnn2table / ncnn2int8 compute them."""
    blobs = model.weights[layer.name]
    if layer.type == "Gemm":
        w = blobs[0].data
        if _gemm_operand(layer) == "B":
            return [_absmax_scales(w.reshape(1, -1))]
        m, k = layer.int(7), layer.int(9)
        rows = w.reshape(k, m).T if layer.int(2) else w.reshape(m, k)  # transA: stored K x M
        return [_absmax_scales(rows)]
    embed, qdim, kdim, vdim = _mha_dims(layer)
    return [_absmax_scales(blobs[0].data.reshape(embed, qdim)), _absmax_scales(blobs[2].data.reshape(embed, kdim)),
            _absmax_scales(blobs[4].data.reshape(embed, vdim)), _absmax_scales(blobs[6].data.reshape(1, -1))]


def weight_scales(model: NcnnModel, layer: NcnnLayer) -> np.ndarray:
    weights = model.weights[layer.name][0].data
    rows = layer.int(7, 1) if layer.type == "ConvolutionDepthWise" else layer.int(0)
    absmax = np.abs(weights.reshape(rows, -1)).max(axis=1)
    levels = 31.0 if _winograd_6bit(layer) else 127.0
    # An all-zero channel has nothing to scale: 1 keeps its codes 0 instead of dividing by zero.
    return np.where(absmax > 0, levels / np.maximum(absmax, 1e-30), 1.0).astype(np.float32)


def _winograd_6bit(layer: NcnnLayer) -> bool:
    return (layer.type == "Convolution" and layer.int(1) == 3 and layer.int(11, layer.int(1)) == 3
            and layer.int(2, 1) == 1 and layer.int(12, layer.int(2, 1)) == 1
            and layer.int(3, 1) == 1 and layer.int(13, layer.int(3, 1)) == 1)


def calibration_table(param: Path, bin_: Path, batches: Sequence[dict[str, np.ndarray]], method: str = "kl",
                      exclude: Iterable[str] = (), threads: int | None = None) -> Table:
    """ncnn2table: {"<layer>_param_0": weight scales, "<layer>": input-blob scale} for every quantisable
    layer not excluded. `batches` map the net's input blob names to arrays with a leading batch axis."""
    if method not in METHODS:
        raise BadInput(f"unknown ncnn calibration method {method!r}: use one of {', '.join(METHODS)}")
    if not batches:
        raise BadInput("ncnn INT8 calibration needs at least one calibration sample")
    model = NcnnModel.load(param, bin_)
    quantizable = quantizable_layers(model, exclude)
    table: Table = {}
    for layer in quantizable:
        if layer.type in DYNAMIC:
            table.update({f"{layer.name}_param_{i}": s for i, s in enumerate(dynamic_weight_scales(model, layer))})
        else:
            table[f"{layer.name}_param_0"] = weight_scales(model, layer)
    layers = [layer for layer in quantizable if layer.type in CALIBRATED]
    blobs = [layer.bottoms[0] for layer in layers]
    if not blobs:
        return table
    unique = list(dict.fromkeys(blobs))  # layers reading the same blob share its scale
    calibrator = CALIBRATORS[method](unique)
    with _FloatNet(param, bin_, threads) as net, progress() as bar:
        for p, what in enumerate(calibrator.pass_names):
            task = bar.add_task(f"ncnn calibration: {'blob ' if p == 0 else ''}{what}", total=len(batches))
            for feeds in batches:
                calibrator.collect(net.extract(feeds, unique), p)
                bar.advance(task)
        task = bar.add_task(f"ncnn calibration: {calibrator.method.upper()} thresholds", total=len(unique))
        thresholds = {}
        for blob in unique:
            thresholds[blob] = calibrator.threshold(blob)
            bar.advance(task)
    for layer, blob in zip(layers, blobs):
        threshold = thresholds[blob]
        table[layer.name] = np.array([127.0 / threshold if threshold > 0 else 1.0], dtype=np.float32)
    return table


class _FloatNet:
    """The FP32 ncnn net, every reduced-precision path off, so statistics describe the float model."""

    def __init__(self, param: Path, bin_: Path, threads: int | None) -> None:
        import ncnn

        self._ncnn = ncnn
        self.net = ncnn.Net()
        o = self.net.opt
        o.num_threads = threads or os.cpu_count() or 1
        o.use_vulkan_compute = False
        o.use_fp16_storage = o.use_fp16_packed = o.use_fp16_arithmetic = o.use_bf16_storage = False
        o.use_int8_inference = False
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(bin_)) != 0:
            raise EdgekitError(f"ncnn could not load {param}")

    def __enter__(self) -> _FloatNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.net.clear()

    def extract(self, feeds: dict[str, np.ndarray], blobs: Sequence[str]) -> list[np.ndarray]:
        ex = self.net.create_extractor()
        for name, x in feeds.items():
            ex.input(name, to_mat(self._ncnn, x[0]))  # ncnn has no batch axis
        out = []
        for blob in blobs:
            ret, mat = ex.extract(blob)
            if ret != 0:
                raise EdgekitError(f"ncnn could not compute blob {blob} during calibration (error {ret})")
            out.append(np.array(mat))
        return out


def write_table(path: Path, table: Table) -> None:
    """NCNN's table text: weight lines first, then activation lines, `<key> s0 s1 ...` each (9 digits:
    a float32 survives the round trip)."""
    keys = [k for k in table if "_param_" in k] + [k for k in table if "_param_" not in k]
    Path(path).write_text("".join(f"{k} " + " ".join(f"{s:.9g}" for s in table[k]) + "\n" for k in keys))


def read_table(path: Path) -> Table:
    table: Table = {}
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            table[fields[0]] = np.array([float(v) for v in fields[1:]], dtype=np.float32)
    return table


def _to_int8(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ncnn's float2int8: round half away from zero, clamp to [-127, 127], per row of `values`."""
    v = values.reshape(len(scales), -1) * scales[:, None]
    return np.clip(np.trunc(v + np.copysign(0.5, v)), -127, 127).reshape(-1).astype(np.float32)


def quantize_model(param_in: Path, bin_in: Path, table: Table | Path, param_out: Path, bin_out: Path) -> list[str]:
    """ncnn2int8: rewrite every layer the table covers to int8; returns the quantised layer names."""
    if not isinstance(table, dict):
        table = read_table(table)
    model = NcnnModel.load(param_in, bin_in)
    done = []
    for layer in model.layers:
        if layer.type in DYNAMIC and f"{layer.name}_param_0" in table and layer.name in model.weights:
            _quantize_dynamic(model, layer, table)
            done.append(layer.name)
            continue
        if layer.type not in CALIBRATED or layer.name not in table or layer.name not in model.weights:
            continue
        key = f"{layer.name}_param_0"
        if key not in table:
            raise EdgekitError(f"ncnn table has an input scale for {layer.name} but no weight scales ({key})")
        scales, input_scale = table[key], table[layer.name]
        blobs = model.weights[layer.name]
        weight = blobs[0]
        rows = layer.int(7, 1) if layer.type == "ConvolutionDepthWise" else layer.int(0)
        if len(scales) != rows:
            raise EdgekitError(f"ncnn table: {key} has {len(scales)} scales, layer {layer.name} has {rows} channels")
        weight.data, weight.storage = _to_int8(weight.data, scales), "int8"
        layer.set(8, 1 if layer.type == "ConvolutionDepthWise" else 2)
        blobs += [_raw(scales), _raw(input_scale[:1])]
        done.append(layer.name)
    _fuse_requantize(model, table)
    model.save(param_out, bin_out)
    return done


def _quantize_dynamic(model: NcnnModel, layer: NcnnLayer, table: Table) -> None:
    """Gemm / MultiHeadAttention as ncnn2int8 writes them: int8 weights, quantize_term (param 18) = 2, the
    weight scales after the layer's other blobs (their inputs are quantised by the runtime)."""
    blobs = model.weights[layer.name]
    if layer.type == "Gemm":
        operand = _gemm_operand(layer)
        if not operand:
            raise EdgekitError(f"ncnn table has weight scales for Gemm {layer.name}, which has no single constant "
                               "operand to quantise")
        (scales,) = _table_scales(table, layer, 1)
        weight = blobs[0]
        m, n, k = layer.int(7), layer.int(8), layer.int(9)
        if operand == "B":
            if len(scales) != 1:
                raise EdgekitError(f"ncnn table: {layer.name}_param_0 has {len(scales)} scales, Gemm B takes one")
            if not layer.int(3):  # stored K x N: ncnn2int8 transposes to N x K (transB = 1)
                weight.data = weight.data.reshape(k, n).T.reshape(-1).copy()
                layer.set(3, 1)
            weight.data = _to_int8(weight.data, scales)
        else:
            if len(scales) != m:
                raise EdgekitError(f"ncnn table: {layer.name}_param_0 has {len(scales)} scales, Gemm A has {m} rows")
            if layer.int(2):  # stored K x M: transposed to M x K (transA = 0)
                weight.data = weight.data.reshape(k, m).T.reshape(-1).copy()
                layer.set(2, 0)
            weight.data = _to_int8(weight.data, scales)
        weight.storage = "int8"
        layer.set(18, 2)
        blobs.append(_raw(scales))
        return
    embed = _mha_dims(layer)[0]
    scales = _table_scales(table, layer, 4)
    for i, (blob, rows) in enumerate(zip(blobs[0:8:2], (embed, embed, embed, 1))):
        if len(scales[i]) != rows:
            raise EdgekitError(f"ncnn table: {layer.name}_param_{i} has {len(scales[i])} scales, "
                               f"MultiHeadAttention {layer.name} needs {rows}")
        blob.data, blob.storage = _to_int8(blob.data, scales[i]), "int8"
    layer.set(18, 2)
    blobs += [_raw(s) for s in scales]


def _table_scales(table: Table, layer: NcnnLayer, n: int) -> list[np.ndarray]:
    keys = [f"{layer.name}_param_{i}" for i in range(n)]
    missing = [k for k in keys if k not in table]
    if missing:
        raise EdgekitError(f"ncnn table has no {', '.join(missing)} for {layer.type} {layer.name}")
    return [table[k] for k in keys]


def _raw(values: np.ndarray) -> WeightBlob:
    return WeightBlob(np.asarray(values, dtype=np.float32), tagged=False, role="raw")


def _fuse_requantize(model: NcnnModel, table: Table) -> None:
    """A quantised conv whose output feeds only quantised convs (directly, or through a Split) writes
    int8 at the consumer's input scale instead of float (int8_scale_term + 100, top_blob_int8_scales)."""
    consumers: dict[str, list[NcnnLayer]] = {}
    for layer in model.layers:
        for b in layer.bottoms:
            consumers.setdefault(b, []).append(layer)

    def int8_conv(layer: NcnnLayer) -> bool:
        return (layer.type in ("Convolution", "ConvolutionDepthWise") and len(layer.bottoms) == 1
                and layer.name in model.weights and model.weights[layer.name][0].storage == "int8")

    for layer in model.layers:
        if not int8_conv(layer) or layer.int(8) > 100:
            continue
        users = consumers.get(layer.tops[0], [])
        if len(users) == 1 and users[0].type == "Split":
            split = users[0]
            users = [u for top in split.tops for u in consumers.get(top, [])]
            if len(users) != len(split.tops):
                continue
        if not users or not all(int8_conv(u) for u in users):
            continue
        layer.set(8, layer.int(8) + 100)
        model.weights[layer.name].append(_raw(table[users[0].name][:1]))
