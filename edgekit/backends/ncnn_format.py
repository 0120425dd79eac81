"""Read and write NCNN's param/bin pair, so edgekit can change per-layer weight storage (fp16, int8)
the way ncnn's own C++ tools (ncnnoptimize, ncnn2int8) do.

The .bin has no index: ncnn reads each layer's weights in layer order, with sizes that follow from the
layer's params. `_weight_layout` states that order for the layer types that carry weights; every other
layer type is taken as weightless, and `NcnnModel.load` checks that the whole .bin was consumed, so an
unknown weighted layer is an error rather than a silently misread model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

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


def _layout(layer: NcnnLayer) -> list[tuple[int, bool]]:
    """(element count, tagged) of each weight blob, in the order ncnn's load_model reads them."""
    t, p = layer.type, layer.int
    if t in ("Convolution", "ConvolutionDepthWise", "Deconvolution", "DeconvolutionDepthWise",
             "Convolution1D", "Deconvolution1D", "Convolution3D", "Deconvolution3D",
             "ConvolutionDepthWise1D", "ConvolutionDepthWise3D", "DeconvolutionDepthWise1D",
             "DeconvolutionDepthWise3D"):
        if p(19):  # dynamic_weight: weights come from a second input
            return []
        blobs = [(p(6), True)] + ([(p(0), False)] if p(5) else [])
        scale_term = p(8)
        if t in ("Convolution", "ConvolutionDepthWise") and scale_term:
            group = p(7, 1) if t == "ConvolutionDepthWise" else 1
            n_weight_scales = p(0) if t == "Convolution" else (group if scale_term % 100 == 1 else 1)
            blobs += [(n_weight_scales, False), (1, False)]
            if scale_term > 100:
                blobs.append((1, False))
        return blobs
    if t == "InnerProduct":
        blobs = [(p(2), True)] + ([(p(0), False)] if p(1) else [])
        if p(8):
            blobs += [(p(0), False), (1, False)]
        return blobs
    if t == "BatchNorm":
        return [(p(0), False)] * 4  # slope, mean, var, bias
    if t == "Scale":
        size = p(0)
        return [] if size == -233 else [(size, False)] * (2 if p(1) else 1)
    if t == "PReLU":
        return [(p(0), False)]
    if t == "Bias":
        return [(p(0), False)]
    if t == "MemoryData":
        dims = [p(0), p(1), p(11), p(2)]
        count = int(np.prod([d for d in dims if d])) if any(dims) else 1
        return [(count, p(21, 1) == 0)]
    if t == "LayerNorm":
        return [(p(0), False)] * 2 if p(2, 1) else []
    if t == "GroupNorm":
        return [(p(1), False)] * 2 if p(3, 1) else []
    if t == "InstanceNorm":
        return [(p(0), False)] * 2 if p(2, 1) else []
    if t == "Normalize":
        return [(p(3), False)]
    if t == "Embed":
        return [(p(3), True)] + ([(p(0), False)] if p(2) else [])
    if t in ("LSTM", "GRU", "RNN", "MultiHeadAttention", "Gemm", "RMSNorm", "SDPA", "Einsum"):
        if t == "Gemm" and not (p(4) or p(5) or p(6)):
            return []
        raise UnsupportedNcnnLayer(
            f"edgekit cannot rewrite the weights of ncnn layer {layer.name} ({t}) for fp16/int8 storage; "
            "build this model for ncnn with --precision fp32")
    return []


def _read_blob(buf: memoryview, pos: int, count: int, tagged: bool) -> tuple[WeightBlob, int]:
    if not tagged:
        return WeightBlob(np.frombuffer(buf, "<f4", count, pos).astype(np.float32), False), pos + 4 * count
    (tag,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    if tag == TAG_FP16:
        data = np.frombuffer(buf, "<f2", count, pos).astype(np.float32)
        return WeightBlob(data, True, "fp16"), pos + (2 * count + 3) // 4 * 4
    if tag == TAG_INT8:
        data = np.frombuffer(buf, np.int8, count, pos).astype(np.float32)
        return WeightBlob(data, True, "int8"), pos + (count + 3) // 4 * 4
    if tag in (0, TAG_FP32_RAW):
        return WeightBlob(np.frombuffer(buf, "<f4", count, pos).astype(np.float32), True), pos + 4 * count
    raise EdgekitError(f"ncnn weight blob with tag {tag:#x} (lookup-table quantised) is not supported")


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
            for count, tagged in _layout(layer):
                blob, pos = _read_blob(buf, pos, count, tagged)
                blobs.append(blob)
            if blobs:
                weights[layer.name] = blobs
        if pos != len(buf):
            raise UnsupportedNcnnLayer(
                f"{bin_}: read {pos} of {len(buf)} bytes; the model has a weighted ncnn layer edgekit "
                "cannot parse: build it for ncnn with --precision fp32")
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


def set_storage(model: NcnnModel, layer_name: str, storage: str) -> None:
    """Store a layer's tagged weight blobs as fp16 (as ncnnoptimize's fp16 flag does) or back as fp32."""
    for blob in model.weights.get(layer_name, []):
        if blob.tagged and blob.storage != "int8":
            blob.storage = storage
            if storage == "fp16":
                blob.data = blob.data.astype(np.float16).astype(np.float32)
