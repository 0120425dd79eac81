"""Read and write NCNN's param/bin pair, so edgekit can change per-layer weight storage (fp16, int8)
the way ncnn's own C++ tools (ncnnoptimize, ncnn2int8) do.

The .bin has no index: ncnn reads each layer's weights in layer order, with sizes that follow from the
layer's params. `_layout` states that order, read from each layer's load_model in ncnn's src/layer/*.cpp,
for every layer type that carries weights (WEIGHTED_TYPES: convolutions, InnerProduct, Gemm,
MultiHeadAttention, Embed, LSTM/GRU/RNN, the norms, ...); every other layer type reads none, and
`NcnnModel.load` checks that the whole .bin was consumed, so a layout edgekit gets wrong is an error
rather than a silently misread model.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32_RAW = 0x0002C056  # a raw fp32 blob, written by some converters with this tag
ARRAY_KEY_BASE = -23300  # "-23300-id=count,v..." holds an array param


class UnsupportedNcnnLayer(EdgekitError):
    pass


@dataclass
class NcnnLayer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, str] = field(default_factory=dict)  # id -> text as written ("1", "0.5", "2,1,3")
    arrays: set[int] = field(default_factory=set)  # ids written as array params ("-23300-id=n,...")

    def int(self, pid: int, default: int = 0) -> int:
        return int(float(self.params[pid])) if pid in self.params else default

    def set(self, pid: int, value: int | float) -> None:
        self.params[pid] = str(value) if isinstance(value, int) else f"{value:e}"

    def line(self) -> str:
        ps = " ".join(f"{ARRAY_KEY_BASE - pid if pid in self.arrays else pid}={v}" for pid, v in self.params.items())
        io = " ".join(self.bottoms + self.tops)
        return f"{self.type:<24} {self.name:<24} {len(self.bottoms)} {len(self.tops)} {io} {ps}".rstrip()


@dataclass
class WeightBlob:
    """One blob of a layer's weights. `tagged` blobs start with a 4-byte storage tag (ncnn loads them
    with type 0) and may be stored fp32/fp16/int8; untagged ones (bias, BN statistics, int8 scales)
    are always raw fp32."""

    data: np.ndarray  # float32 values (int8 blobs: the int8 codes as stored)
    tagged: bool
    storage: str = "fp32"  # fp32 | fp16 | int8
    role: str = "weight"  # weight | bias | raw (BlobSpec.role)

    def encode(self) -> bytes:
        if not self.tagged:
            return self.data.astype("<f4").tobytes()
        if self.storage == "fp16":
            payload = self.data.astype("<f2").tobytes()
            tag = TAG_FP16
        elif self.storage == "int8":
            payload = self.data.astype(np.int8).tobytes()
            tag = TAG_INT8
        else:
            payload = self.data.astype("<f4").tobytes()
            tag = 0
        payload += b"\0" * (-len(payload) % 4)  # ncnn aligns every tagged blob to 4 bytes
        return struct.pack("<I", tag) + payload


CONV_TYPES = ("Convolution", "ConvolutionDepthWise", "Deconvolution", "DeconvolutionDepthWise", "Convolution1D",
              "Deconvolution1D", "Convolution3D", "Deconvolution3D", "ConvolutionDepthWise1D", "ConvolutionDepthWise3D",
              "DeconvolutionDepthWise1D", "DeconvolutionDepthWise3D", "DeformableConv2D")
# Every ncnn layer type whose load_model reads weights (src/layer/*.cpp); any other type reads none.
WEIGHTED_TYPES = frozenset((
    *CONV_TYPES, "InnerProduct", "Gemm", "MultiHeadAttention", "Embed", "LSTM", "GRU", "RNN", "BatchNorm", "Scale",
    "PReLU", "Bias", "MemoryData", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "Normalize", "Padding",
    "Quantize", "Dequantize", "Requantize"))


@dataclass(frozen=True)
class BlobSpec:
    """One blob in ncnn's load order: element count, whether it carries the 4-byte storage tag (ncnn loads
    it with type 0: fp32, fp16 or int8), and its role: "weight" (fp16/int8 candidates, range-checked),
    "bias" (tagged, fp16-capable, never int8; a bias near zero loses nothing when flushed), "raw" (always
    fp32: biases, norms' gamma/beta, int8 scales)."""

    count: int
    tagged: bool
    role: str = "raw"


def _w(count: int) -> BlobSpec:
    return BlobSpec(count, True, "weight")


def _b(count: int) -> BlobSpec:
    return BlobSpec(count, True, "bias")


def _r(count: int) -> BlobSpec:
    return BlobSpec(count, False, "raw")


def _gemm_c_count(p: Callable[..., int]) -> int:
    m, n = p(7), p(8)
    return {0: 1, 1: m, 2: m, 3: m * n, 4: n}.get(p(10), -1)


def _layout(layer: NcnnLayer) -> list[BlobSpec]:
    """Each weight blob of a layer, in the order ncnn's load_model reads them (src/layer/*.cpp)."""
    t, p = layer.type, layer.int
    if t in CONV_TYPES:
        if p(19):  # dynamic_weight: weights come from a second input
            return []
        blobs = [_w(p(6))] + ([_r(p(0))] if p(5) else [])
        scale_term = p(8)
        if t in ("Convolution", "ConvolutionDepthWise") and scale_term:
            group = p(7, 1) if t == "ConvolutionDepthWise" else 1
            n_weight_scales = p(0) if t == "Convolution" else (group if scale_term % 100 == 1 else 1)
            blobs += [_r(n_weight_scales), _r(1)]
            if scale_term > 100:
                blobs.append(_r(1))
        return blobs
    if t == "InnerProduct":
        blobs = [_w(p(2))] + ([_r(p(0))] if p(1) else [])
        return blobs + ([_r(p(0)), _r(1)] if p(8) else [])
    if t == "Gemm":
        if p(18) >= 100:  # 4/6/8-bit weight-block quantised (NCNN_WEIGHT_QUANT): packed rows, not element counts
            raise UnsupportedNcnnLayer(f"ncnn layer {layer.name} (Gemm) is weight-block quantised "
                                       f"(quantize_term {p(18)}); edgekit cannot rewrite it")
        blobs = []
        if p(4):
            blobs.append(_w(p(7) * p(9)))
        if p(5):
            blobs.append(_w(p(8) * p(9)))
        if p(6) and p(10) != -1:
            count = _gemm_c_count(p)
            if count < 0:
                raise UnsupportedNcnnLayer(f"ncnn layer {layer.name} (Gemm) has constant C broadcast type {p(10)}")
            blobs.append(_b(count))
        if p(18):
            blobs += ([_r(p(7))] if p(4) else []) + ([_r(1)] if p(5) else [])
        return blobs
    if t == "MultiHeadAttention":
        if p(18) >= 100:
            raise UnsupportedNcnnLayer(f"ncnn layer {layer.name} (MultiHeadAttention) is weight-block quantised "
                                       f"(quantize_term {p(18)}); edgekit cannot rewrite it")
        embed, size = p(0), p(2)
        kdim, vdim = p(3, embed), p(4, embed)
        qdim = size // embed if embed else 0
        blobs = [_w(embed * qdim), _r(embed), _w(embed * kdim), _r(embed), _w(embed * vdim), _r(embed),
                 _w(qdim * embed), _r(qdim)]
        return blobs + ([_r(embed)] * 3 + [_r(1)] if p(18) else [])
    if t == "Embed":
        return [_w(p(3))] + ([_r(p(0))] if p(2) else []) + ([_r(1)] if p(18) else [])
    if t in ("LSTM", "GRU", "RNN"):
        num_output, size, dirs = p(0), p(1), 2 if p(2) == 2 else 1
        hidden = p(3, num_output) if t == "LSTM" else num_output
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[t]
        bias_rows = {"LSTM": 4, "GRU": 4, "RNN": 1}[t]  # GRU keeps 4 bias rows (the hidden gate's two)
        blobs = [_w(size), _b(hidden * bias_rows * dirs), _w(num_output * hidden * gates * dirs)]
        if t == "LSTM" and num_output != hidden:
            blobs.append(_w(hidden * num_output * dirs))  # projection weight_hr
        return blobs + ([_r(hidden * gates * dirs)] * 2 if p(8) else [])
    if t == "BatchNorm":
        return [_r(p(0))] * 4  # slope, mean, var, bias
    if t == "Scale":
        size = p(0)
        return [] if size == -233 else [_r(size)] * (2 if p(1) else 1)
    if t in ("PReLU", "Bias"):
        return [_r(p(0))]
    if t == "MemoryData":
        dims = [p(0), p(1), p(11), p(2)]  # w, h, d, c
        if not dims[0]:
            return []
        count = int(np.prod([d for d in dims if d]))
        return [BlobSpec(count, p(21, 1) == 0, "raw")]
    if t in ("LayerNorm", "InstanceNorm"):
        return [_r(p(0))] * 2 if p(2, 1) else []
    if t == "GroupNorm":
        return [_r(p(1))] * 2 if p(3, 1) else []
    if t == "RMSNorm":
        return [_r(p(0))] if p(2, 1) else []
    if t == "Normalize":
        return [_r(p(3))]
    if t == "Padding":
        return [_r(p(6))] if p(6) else []
    if t == "Quantize":
        return [_r(p(0, 1))]
    if t == "Dequantize":
        return [_r(p(0, 1))] + ([_r(p(1))] if p(1) else [])
    if t == "Requantize":
        return [_r(p(0, 1)), _r(p(1, 1))] + ([_r(p(2))] if p(2) else [])
    return []


def _read_blob(buf: memoryview, pos: int, spec: BlobSpec, layer: NcnnLayer) -> tuple[WeightBlob, int]:
    count = spec.count
    need = 4 * count if not spec.tagged else 4
    if count < 0 or pos + need > len(buf):
        raise UnsupportedNcnnLayer(f"ncnn layer {layer.name} ({layer.type}): its weights run past the end of the "
                                   ".bin; edgekit misreads this model's layout")
    if not spec.tagged:
        return WeightBlob(np.frombuffer(buf, "<f4", count, pos).astype(np.float32), False, role=spec.role), pos + need
    (tag,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    if tag == TAG_FP16:
        data = np.frombuffer(buf, "<f2", count, pos).astype(np.float32)
        return WeightBlob(data, True, "fp16", spec.role), pos + (2 * count + 3) // 4 * 4
    if tag == TAG_INT8:
        data = np.frombuffer(buf, np.int8, count, pos).astype(np.float32)
        return WeightBlob(data, True, "int8", spec.role), pos + (count + 3) // 4 * 4
    if tag in (0, TAG_FP32_RAW):
        data = np.frombuffer(buf, "<f4", count, pos).astype(np.float32)
        return WeightBlob(data, True, role=spec.role), pos + 4 * count
    raise UnsupportedNcnnLayer(f"ncnn layer {layer.name} ({layer.type}): weight blob with tag {tag:#x} "
                               "(lookup-table quantised or misread) is not supported")


@dataclass
class NcnnModel:
    layers: list[NcnnLayer]
    blob_count: int
    weights: dict[str, list[WeightBlob]]  # layer name -> its blobs, in load order

    @classmethod
    def load(cls, param: Path, bin_: Path) -> NcnnModel:
        lines = [ln for ln in Path(param).read_text().splitlines() if ln.strip()]
        if not lines or lines[0].strip() != str(MAGIC):
            raise EdgekitError(f"{param} is not an ncnn param file (magic {MAGIC} missing)")
        layer_count, blob_count = (int(v) for v in lines[1].split()[:2])
        layers = [_parse_layer(ln) for ln in lines[2:2 + layer_count]]
        buf = memoryview(Path(bin_).read_bytes())
        pos, weights = 0, {}
        for layer in layers:
            blobs = []
            for spec in _layout(layer):
                blob, pos = _read_blob(buf, pos, spec, layer)
                blobs.append(blob)
            if blobs:
                weights[layer.name] = blobs
        if pos != len(buf):
            raise UnsupportedNcnnLayer(
                f"{bin_}: read {pos} of {len(buf)} bytes; the model has a weighted ncnn layer whose layout edgekit "
                "does not know (a newer ncnn layer type)")
        return cls(layers, blob_count, weights)

    def layer(self, name: str) -> NcnnLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def save(self, param: Path, bin_: Path) -> None:
        text = [str(MAGIC), f"{len(self.layers)} {self.blob_count}"] + [layer.line() for layer in self.layers]
        Path(param).write_text("\n".join(text) + "\n")
        with open(bin_, "wb") as f:
            for layer in self.layers:
                for blob in self.weights.get(layer.name, []):
                    f.write(blob.encode())


def _parse_layer(line: str) -> NcnnLayer:
    f = line.split()
    nb, nt = int(f[2]), int(f[3])
    params: dict[int, str] = {}
    arrays: set[int] = set()
    for kv in f[4 + nb + nt:]:
        k, v = kv.split("=", 1)
        key = int(k)
        if key <= ARRAY_KEY_BASE:
            key = ARRAY_KEY_BASE - key
            arrays.add(key)
        params[key] = v
    return NcnnLayer(f[0], f[1], f[4:4 + nb], f[4 + nb:4 + nb + nt], params, arrays)


def to_mat(ncnn: Any, x: np.ndarray) -> Any:
    """An ncnn Mat of this array laid out as ncnn's own allocations are. A Mat wrapped around a numpy array
    packs its channels back to back (cstep = h * w); ncnn aligns each channel to 16 bytes and some layers
    (Crop) rely on it: for a 3x31x15 input every channel after the first was read shifted. clone() copies
    into an aligned Mat."""
    return ncnn.Mat(np.ascontiguousarray(x, dtype=np.float32)).clone()


def set_storage(model: NcnnModel, layer_name: str, storage: str) -> None:
    """Store a layer's tagged weight blobs as fp16 (as ncnnoptimize's fp16 flag does) or back as fp32."""
    for blob in model.weights.get(layer_name, []):
        if blob.tagged and blob.storage != "int8":
            blob.storage = storage
            if storage == "fp16":
                blob.data = blob.data.astype(np.float16).astype(np.float32)
