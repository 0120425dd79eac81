"""Cost model: latency estimated from the target description where it cannot be measured.

Per layer: max(2*MACs / (peak_precision * efficiency), bytes moved / (bandwidth * efficiency)) plus a
fixed per-kernel overhead (launch, sync), summed over the layers that become kernels. Elementwise
activations are fused into the preceding conv by every GPU/NPU compiler, so they add no kernel.

The compute efficiency is what the peak figures cannot say (MAC counts alone do not predict latency;
ncnn's INT8 on a Cortex-A76 is barely faster than its FP16 although the peak says 2x). It starts from
priors and is fitted, per precision (and per backend where there is data), to measurements of the
target: the published benchmarks in its YAML (`benchmarks`: whole-model latencies such as benchncnn's)
and the records in profiles/ measured on a device of that target (`edgekit profile --device`), which
carry each layer's cost features. Every estimate is marked `where: "estimate"` and never presented as a
measurement; `CostModel.fit_report` says what it was fitted to.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.ingest import ModelSpec
from edgekit.targets import Target
from edgekit.timing import Latency

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
FUSED_INTO_PREVIOUS = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Mul", "Add",
                                 "BatchNormalization", "QuantizeLinear", "DequantizeLinear", "Identity",
                                 "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Tanh", "Mish"})
ACCELERATOR_BACKENDS = frozenset({"tensorrt"})  # backends that run on a GPU target's accelerator
EFFICIENCY_RANGE = (0.01, 1.0)
# A kernel's fixed cost (dispatch, thread fork/join, cache refill) is microseconds to a tenth of a
# millisecond on CPUs and GPUs alike; bounding the fit keeps a benchmark's slow small layers (mobilenet)
# from being read as a huge per-kernel cost that would then swamp every small model's estimate.
OVERHEAD_RANGE_MS = (0.001, 0.1)


@dataclass
class CostPriors:
    compute_efficiency: float
    memory_efficiency: float
    overhead_ms: float  # per kernel

    @classmethod
    def for_target(cls, target: Target, backend: str | None = None) -> CostPriors:
        if target.kind == "gpu" and (backend is None or backend in ACCELERATOR_BACKENDS):
            return cls(0.30, 0.6, 0.012)  # small-batch CNN inference reaches about a third of a GPU's peak
        return cls(0.45, 0.6, 0.004)


@dataclass
class LayerFeatures:
    """What the cost of one layer depends on, independent of precision and device."""

    op_type: str
    macs: int
    params: int
    out_elems: int

    @classmethod
    def of_spec(cls, spec: ModelSpec) -> list[LayerFeatures]:
        return [cls(la.op_type, la.macs, la.params, math.prod(max(int(d), 1) for d in la.output_shape))
                for la in spec.layers]

    def to_list(self) -> list[Any]:
        return [self.op_type, self.macs, self.params, self.out_elems]


@dataclass
class CalibrationPoint:
    """One measured latency of the target, with what the model cost."""

    backend: str
    precision: str
    measured_ms: float
    source: str
    layers: list[LayerFeatures] | None = None  # per-layer features (profiles/)
    macs: int = 0  # whole-model figures (published benchmarks)
    kernels: int = 0


def cpu_peak_tops(target: Target, precision: str) -> float:
    """A GPU board's CPU, for backends that run there: cores x GHz x 16 FLOPs/cycle (two 4-wide FMA
    units), doubled for fp16 with ARMv8.2 half-precision arithmetic, x4 for int8 with dot-product."""
    cpu = target.cpu
    isa = set(cpu.get("isa", []))
    fp32 = float(cpu.get("cores", 4)) * float(cpu.get("freq_ghz", 1.5)) * 16 / 1000
    gain = {"fp32": 1.0, "bf16": 1.0, "fp16": 2.0 if {"asimdhp", "fphp"} & isa else 1.0,
            "int8": 4.0 if {"asimddp", "dotprod"} & isa else 1.0}[precision]
    return fp32 * gain


@dataclass
class CostModel:
    target: Target
    # (backend or "*", precision) -> fitted compute efficiency
    fitted: dict[tuple[str, str], float] = field(default_factory=dict)
    overhead: dict[str, float] = field(default_factory=dict)  # backend or "*" -> fitted ms per kernel
    points: list[CalibrationPoint] = field(default_factory=list)

    @classmethod
    def for_target(cls, target: Target, profiles: Path | None = None) -> CostModel:
        """Priors, fitted to the target's published benchmarks and its profiles/ records."""
        model = cls(target)
        model.points = benchmark_points(target) + profile_points(target, profiles)
        model.fit()
        return model

    # ------------------------------------------------------------ estimating

    def _on_cpu(self, backend: str | None) -> bool:
        return self.target.kind == "gpu" and backend is not None and backend not in ACCELERATOR_BACKENDS

    def _peak(self, precision: str, backend: str | None) -> float:
        if self._on_cpu(backend):
            return cpu_peak_tops(self.target, precision)
        peaks = self.target.peak_tops
        return peaks.get(precision) or peaks.get("fp16") or peaks["fp32"]

    def efficiency(self, precision: str, backend: str | None) -> float:
        for key in ((backend or "*", precision), ("*", precision)):
            if key in self.fitted:
                return self.fitted[key]
        return CostPriors.for_target(self.target, backend).compute_efficiency

    def kernel_overhead(self, backend: str | None) -> float:
        for key in (backend or "*", "*"):
            if key in self.overhead:
                return self.overhead[key]
        return CostPriors.for_target(self.target, backend).overhead_ms

    def layer_ms(self, layers: list[LayerFeatures], precision: str, backend: str | None,
                 efficiency: float | None = None, overhead_ms: float | None = None) -> list[float]:
        """Per-layer estimate (ms), the kernel overhead charged to the layers that become kernels."""
        p = CostPriors.for_target(self.target, backend)
        eff = efficiency if efficiency is not None else self.efficiency(precision, backend)
        kernel_ms = overhead_ms if overhead_ms is not None else self.kernel_overhead(backend)
        peak = self._peak(precision, backend) * 1e12
        bandwidth = float(self.target.memory.get("bandwidth_gbps", 10.0)) * 1e9
        bpe = BYTES_PER_ELEMENT.get(precision, 4)
        out = []
        for la in layers:
            compute_s = 2 * la.macs / (peak * eff)
            memory_s = (la.params + 2 * la.out_elems) * bpe / (bandwidth * p.memory_efficiency)
            overhead = 0.0 if la.op_type in FUSED_INTO_PREVIOUS else kernel_ms
            out.append(max(compute_s, memory_s) * 1e3 + overhead)
        return out

    def estimate_ms(self, layers: list[LayerFeatures], precision: str, backend: str | None,
                    efficiency: float | None = None, overhead_ms: float | None = None) -> float:
        return sum(self.layer_ms(layers, precision, backend, efficiency, overhead_ms))

    def estimate(self, spec: ModelSpec, precision: str, backend: str | None = None) -> Latency:
        ms = round(self.estimate_ms(LayerFeatures.of_spec(spec), precision, backend), 4)
        return Latency(p50=ms, p90=ms, p99=ms, mean=ms, min=ms, runs=0, threads=0, where="estimate")

    def _point_ms(self, point: CalibrationPoint, efficiency: float, overhead_ms: float | None = None) -> float:
        overhead = overhead_ms if overhead_ms is not None else self.kernel_overhead(point.backend)
        if point.layers is not None:
            return self.estimate_ms(point.layers, point.precision, point.backend, efficiency, overhead)
        # A whole-model benchmark: compute-bound (these are conv nets at 224x224) plus kernel overheads.
        return 2 * point.macs / (self._peak(point.precision, point.backend) * 1e12 * efficiency) * 1e3 \
            + point.kernels * overhead

    # ------------------------------------------------------------ fitting

    def fit(self) -> None:
        """Per backend with data (and over all backends): one per-kernel overhead and one compute efficiency
        per precision, minimising the squared log error (a ratio error: 2x too slow weighs as 2x too fast).
        Two parameters because whole-model benchmarks mix compute-bound nets (resnet) with many small
        kernels (mobilenet's depthwise layers), which one efficiency alone cannot reproduce."""
        by_backend: dict[str, list[CalibrationPoint]] = {}
        for pt in self.points:
            by_backend.setdefault(pt.backend, []).append(pt)
            by_backend.setdefault("*", []).append(pt)
        self.fitted, self.overhead = {}, {}
        for backend, pts in by_backend.items():
            best: tuple[float, float, dict[str, float]] | None = None
            for overhead in _log_grid(*OVERHEAD_RANGE_MS, 24):
                effs = {prec: _golden(lambda e, ps=ps, o=overhead: self._loss(ps, math.exp(e), o), *_LOG_EFF)
                        for prec, ps in _by_precision(pts).items()}
                loss = sum(self._loss(ps, math.exp(effs[prec]), overhead) for prec, ps in _by_precision(pts).items())
                if best is None or loss < best[0]:
                    best = (loss, overhead, effs)
            assert best is not None
            self.overhead[backend] = round(best[1], 5)
            self.fitted |= {(backend, prec): round(math.exp(e), 4) for prec, e in best[2].items()}

    def _loss(self, points: list[CalibrationPoint], efficiency: float, overhead: float) -> float:
        return sum((math.log(self._point_ms(p, efficiency, overhead)) - math.log(p.measured_ms)) ** 2
                   for p in points)

    def fit_report(self) -> dict[str, Any]:
        """What the model was fitted to and how well it reproduces those measurements."""
        errors = [abs(self._point_ms(p, self.efficiency(p.precision, p.backend)) - p.measured_ms) / p.measured_ms
                  for p in self.points]
        return {
            "points": len(self.points),
            "sources": sorted({p.source for p in self.points}),
            "efficiency": {f"{b}/{p}": e for (b, p), e in sorted(self.fitted.items())},
            "kernel_overhead_ms": dict(sorted(self.overhead.items())),
            "fit_mape_percent": round(100 * sum(errors) / len(errors), 1) if errors else None,
            "priors": "compute efficiency 0.30 and 0.012 ms per kernel on GPUs, 0.45 and 0.004 ms on CPUs, "
                      "where nothing was fitted",
        }


def estimate_latency(spec: ModelSpec, target: Target, precision: str, priors: CostPriors | None = None,
                     backend: str | None = None) -> Latency:
    """The target's fitted cost model's estimate (priors override the fit: tests, what-ifs)."""
    model = CostModel.for_target(target)
    if priors is not None:
        ms = round(model.estimate_ms(LayerFeatures.of_spec(spec), precision, backend, priors.compute_efficiency), 4)
        return Latency(p50=ms, p90=ms, p99=ms, mean=ms, min=ms, runs=0, threads=0, where="estimate")
    return model.estimate(spec, precision, backend)


_LOG_EFF = (math.log(EFFICIENCY_RANGE[0]), math.log(EFFICIENCY_RANGE[1]))


def _log_grid(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _golden(f: Any, lo: float, hi: float, iterations: int = 50) -> float:
    """Minimum of a unimodal f on [lo, hi] (the loss is unimodal in log efficiency: the estimate falls
    monotonically with it)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(iterations):
        c, d = b - g * (b - a), a + g * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


def _by_precision(points: list[CalibrationPoint]) -> dict[str, list[CalibrationPoint]]:
    out: dict[str, list[CalibrationPoint]] = {}
    for p in points:
        out.setdefault(p.precision, []).append(p)
    return out


def benchmark_points(target: Target) -> list[CalibrationPoint]:
    return [CalibrationPoint(b["backend"], b["precision"], float(b["ms"]), f"benchmark: {b['source']}",
                             macs=int(b["macs"]), kernels=int(b.get("layers", 0)))
            for b in target.benchmarks]


def profile_points(target: Target, root: Path | None = None) -> list[CalibrationPoint]:
    """Device measurements of this target in profiles/ that carry per-layer cost features."""
    if root is None:
        from edgekit.remote.profile import profiles_root

        root = profiles_root()
    points = []
    if not root.is_dir():
        return points
    for path in sorted(root.glob(f"*/{target.name}-*.json")):
        try:
            rec = json.loads(path.read_text())
            feats = rec.get("cost_features")
            p50 = float(rec["latency_ms"]["p50"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a foreign or truncated file is not a measurement
        if rec.get("target") != target.name or not feats or p50 <= 0:
            continue
        layers = [LayerFeatures(str(f[0]), int(f[1]), int(f[2]), int(f[3])) for f in feats]
        points.append(CalibrationPoint(rec["backend"], rec["precision"], p50,
                                       f"profile: {path.parent.name}/{path.name}", layers=layers))
    return points


def cost_features(spec_layers: list[dict[str, Any]]) -> list[list[Any]]:
    """A manifest's `layers` as the compact per-layer features a profile record carries."""
    return [[la["op_type"], la["macs"], la["params"], math.prod(max(int(d), 1) for d in la["output_shape"])]
            for la in spec_layers]

