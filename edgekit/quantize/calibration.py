"""Calibration: activation ranges of the FP32 model over the calibration data, for any backend's INT8.

After ONNX Runtime's calibrators (CalibraterBase: feed the batches, then compute the ranges): one base
class, `RangeCalibrator`, collecting per-tensor statistics batch by batch in one or more passes, and small
subclasses for the range rule:
- `MinMaxCalibrator`: the observed minimum and maximum (|x| max as the symmetric threshold);
- `EntropyCalibrator`: ncnn2table's KL divergence threshold on a 2048-bin histogram of |x| with the zeros
  left out (post-ReLU tensors would otherwise be dominated by them), reduced to 128 levels. Tensors named in
  `full_range` (a model's inputs and outputs, whose clipping the application sees directly) keep min/max.

The tensors come from whatever runs the FP32 model: ncnn's runtime for ncnn2table (ncnn names its blobs
itself), or ONNX Runtime on the canonical ONNX (`reference_ranges`, every float tensor exposed as an
output) for the quantizers that take a calibration cache. `CalibrationReader` feeds the batches to ONNX
Runtime's own calibrators (minmax, percentile) inside quantize_static.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

HISTOGRAM_BINS = 2048
TARGET_BINS = 128
KL_EPS = 1e-4
Batch = dict[str, np.ndarray]


class CalibrationReader:
    """Calibration batches in the CalibrationDataReader shape ONNX Runtime's quantize_static takes."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.i = 0

    def get_next(self) -> Batch | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def kl_threshold_bin(histogram: np.ndarray, target_bins: int = TARGET_BINS) -> int:
    """The histogram bin count whose clipped distribution is closest (KL) to its 128-level quantisation,
    as ncnn2table computes it: quantised levels are averaged densities spread back over the bins they
    cover, and both distributions carry a small epsilon so empty bins do not make the divergence infinite."""
    total = histogram.sum()
    n = len(histogram)
    if total == 0:
        return n - 1
    h = histogram.astype(np.float64) / total
    cumulative = np.concatenate([[0.0], np.cumsum(h)])
    grid = np.arange(n + 1, dtype=np.float64)
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[t] = sum(h[t:])
    best_kl, best = np.inf, target_bins
    for t in range(target_bins, n):
        per_bin = t / target_bins
        edges = np.arange(target_bins + 1) * per_bin
        edges[-1] = t
        density = np.diff(np.interp(edges, grid, cumulative)) / per_bin
        k = np.arange(t, dtype=np.float64)
        j0 = np.minimum((k / per_bin).astype(np.int64), target_bins - 1)
        boundary = (j0 + 1) * per_bin
        split = boundary < k + 1  # a level boundary falls inside bin k
        first = np.where(split, boundary - k, 1.0)
        j1 = np.minimum(j0 + 1, target_bins - 1)
        expanded = KL_EPS + first * density[j0] + np.where(split, (k + 1 - boundary) * density[j1], 0.0)
        clipped = h[:t] + KL_EPS
        clipped[t - 1] += tail[t]
        kl = float(np.sum(clipped * np.log(clipped / expanded)))
        if kl < best_kl:
            best_kl, best = kl, t
    return best


class RangeCalibrator:
    """Per-tensor ranges from the float tensors `names`, fed batch by batch (`collect`) in `passes` passes
    over the calibration data. The first pass records min, max and |x| max of each tensor."""

    method: ClassVar[str] = ""
    passes: ClassVar[int] = 1
    pass_names: ClassVar[tuple[str, ...]] = ("ranges",)

    def __init__(self, names: Sequence[str], full_range: Sequence[str] = ()) -> None:
        self.names = list(names)
        self.full_range = set(full_range)
        self.low = dict.fromkeys(self.names, np.inf)
        self.high = dict.fromkeys(self.names, -np.inf)
        self.absmax = dict.fromkeys(self.names, 0.0)

    def collect(self, values: Sequence[np.ndarray], pass_index: int = 0) -> None:
        """One batch's tensors, in the order of `names`."""
        if pass_index == 0:
            for name, x in zip(self.names, values):
                self.low[name], self.high[name] = min(self.low[name], float(x.min())), max(self.high[name],
                                                                                          float(x.max()))
                self.absmax[name] = max(self.absmax[name], float(np.abs(x).max(initial=0.0)))

    def threshold(self, name: str) -> float:
        """The |x| clip of a tensor: what a symmetric INT8 scale maps to 127."""
        return self.absmax[name]

    def ranges(self, symmetric: bool = False) -> dict[str, tuple[float, float]]:
        """name -> (low, high): the observed range, or +-threshold where the rule clips (0 as the low end of
        a tensor that is never negative, unless symmetric)."""
        out = {}
        for name in self.names:
            lo, hi = self.low[name], self.high[name]
            if self.clips(name):
                t = self.threshold(name)
                lo, hi = (-t if lo < 0 or symmetric else 0.0), t
            out[name] = (lo, hi)
        return out

    def clips(self, name: str) -> bool:
        return False


class MinMaxCalibrator(RangeCalibrator):
    method = "minmax"


class EntropyCalibrator(RangeCalibrator):
    """ncnn2table's KL thresholds: a second pass fills each tensor's |x| histogram (zeros left out) over
    [0, |x| max], the threshold is the bin count KL picks."""

    method = "kl"
    passes = 2
    pass_names = ("ranges", "histograms")

    def __init__(self, names: Sequence[str], full_range: Sequence[str] = ()) -> None:
        super().__init__(names, full_range)
        self.histograms = {n: np.zeros(HISTOGRAM_BINS, np.int64) for n in self.names if n not in self.full_range}

    def collect(self, values: Sequence[np.ndarray], pass_index: int = 0) -> None:
        if pass_index == 0:
            super().collect(values, 0)
            return
        for name, x in zip(self.names, values):
            if name in self.histograms and self.absmax[name] > 0:
                v = np.abs(x[x != 0])
                index = np.minimum((v / self.absmax[name] * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
                self.histograms[name] += np.bincount(index, minlength=HISTOGRAM_BINS)

    def threshold(self, name: str) -> float:
        if name not in self.histograms:
            return self.absmax[name]
        return (kl_threshold_bin(self.histograms[name]) + 0.5) * self.absmax[name] / HISTOGRAM_BINS

    def clips(self, name: str) -> bool:
        return name in self.histograms and self.absmax[name] > 0


def reference_ranges(model_path: Path, batches: list[Batch], calibrator: type[RangeCalibrator], tmp: Path,
                     symmetric: bool = False) -> dict[str, tuple[float, float]]:
    """Ranges of every float tensor of an ONNX model run in ONNX Runtime (CPU) over the batches: node
    outputs by the calibrator's rule, the model's outputs and inputs at their full observed range."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path))
    io = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    inferred = onnx.shape_inference.infer_shapes(m)
    floats = {v.name for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names = [o for n in m.graph.node for o in n.output if o in floats and o not in io]
    outputs = [o.name for o in m.graph.output]
    exposed = outputs + names
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    path = tmp / "all-outputs.onnx"
    onnx.save(m, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cal = calibrator(exposed, full_range=outputs)
    for p in range(cal.passes):
        for feeds in batches:
            cal.collect(session.run(exposed, feeds), p)
    ranges = cal.ranges(symmetric)
    for i in m.graph.input:  # the input image: its full range
        x = np.concatenate([b[i.name].ravel() for b in batches if i.name in b]) if batches else None
        if x is not None and x.size:
            ranges[i.name] = (float(x.min()), float(x.max()))
    return ranges
