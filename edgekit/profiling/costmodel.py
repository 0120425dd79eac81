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

The host (`host-cpu`) is read, not described: its per-precision efficiency follows the ISA detect_host
found (INT8 gains only with VNNI, AMX or dot-product), and it is fitted to ONNX Runtime FP32 timings of
a few small conv nets on this very machine (`host_points`, cached per CPU and runtime version), with an
effective bandwidth of its own (a small model's activations stay in cache: not the DRAM figure).

What it is fitted to (the calibration points: benchmarks, profiles/ records, this host, a build's
references) is gathered in calibration.py; this module is the model and its fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import backends
from edgekit.backends import REFERENCE_BACKEND
from edgekit.ingest import ModelSpec
from edgekit.profiling.calibration import (
    CalibrationPoint,
    LayerFeatures,
    benchmark_points,
    device_record_points,
    host_isa_class,
    host_points,
    manifest_points,
)
from edgekit.profiling.store import cost_features
from edgekit.profiling.timing import Latency
from edgekit.targets import Target

# What calibration.py and store.py provide is importable from here too, as before they were split off.
__all__ = ["BYTES_PER_ELEMENT", "FUSED_INTO_PREVIOUS", "HOST_SPEEDUP", "CalibrationPoint",
           "CostModel", "CostPriors", "LayerFeatures", "benchmark_points", "cost_features", "cpu_peak_tops",
           "device_record_points", "estimate_latency", "host_isa_class", "host_points", "manifest_points"]

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
FUSED_INTO_PREVIOUS = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Mul", "Add",
                                 "BatchNormalization", "QuantizeLinear", "DequantizeLinear", "Identity",
                                 "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Tanh", "Mish"})
EFFICIENCY_RANGE = (0.01, 1.0)
# A kernel's fixed cost (dispatch, thread fork/join, cache refill) is microseconds to a tenth of a
# millisecond on CPUs and GPUs alike; bounding the fit keeps a benchmark's slow small layers (mobilenet)
# from being read as a huge per-kernel cost that would then swamp every small model's estimate.
OVERHEAD_RANGE_MS = (0.001, 0.1)

# The host's CPU runtimes (ONNX Runtime, OpenVINO, ncnn at batch 1): the speedup over FP32 they realise on
# a compute-bound layer, by ISA class, where no measurement of that precision says otherwise. Not the peak
# ratio: x86 runtimes compute FP16 models in FP32 (ncnn and ONNX Runtime store FP16, OpenVINO runs FP32 or
# BF16), and INT8 pays only with VNNI/AMX (x86) or dot-product (ARM): on an AVX2-only EPYC ONNX Runtime's
# INT8 ran 0.45x of FP32 and OpenVINO's 2.15x (shared/device-facts.md), so no gain is assumed there. On an
# AMX Xeon (2 cores) the bundled model's INT8 measured 1.4-1.8x over FP32 across the three runtimes.
HOST_SPEEDUP = {
    "amx": {"fp16": 1.0, "bf16": 2.0, "int8": 1.6},
    "vnni": {"fp16": 1.0, "bf16": 1.0, "int8": 1.6},
    "avx512": {"fp16": 1.0, "bf16": 1.0, "int8": 1.0},
    "avx2": {"fp16": 1.0, "bf16": 1.0, "int8": 1.0},
    "armv8.2": {"fp16": 1.5, "bf16": 1.0, "int8": 1.5},  # ncnn's fp16 arithmetic and sdot
    "armv8.0": {"fp16": 1.0, "bf16": 1.0, "int8": 1.0},
    "generic": {"fp16": 1.0, "bf16": 1.0, "int8": 1.0},
}
# FP32 compute efficiency before the host's own calibration replaces it (fitted there: 0.36 on an AMX
# Xeon's 512-bit FMAs, which few small layers keep busy; AVX2 kernels reach nearer their peak).
HOST_FP32_EFFICIENCY = {"amx": 0.35, "vnni": 0.35, "avx512": 0.35, "avx2": 0.45}
HOST_BANDWIDTH_GBPS = 30.0  # effective, before the calibration (fitted 25-40 on that Xeon; DRAM guessed 20)


def runs_on_accelerator(backend: str) -> bool:
    """Whether the backend's artifacts run on a GPU target's accelerator (else on the board's CPU)."""
    return backend in backends.names() and backends.get(backend).runs_on_accelerator


@dataclass
class CostPriors:
    compute_efficiency: float
    memory_efficiency: float
    overhead_ms: float  # per kernel

    @classmethod
    def for_target(cls, target: Target, backend: str | None = None) -> CostPriors:
        if target.kind == "gpu" and (backend is None or runs_on_accelerator(backend)):
            return cls(0.30, 0.6, 0.012)  # small-batch CNN inference reaches about a third of a GPU's peak
        if target.npu and backend is not None and runs_on_accelerator(backend):
            return cls(0.30, 0.6, 0.012)  # an NPU likewise, until a board's measurement fits it
        if target.is_host:
            return cls(HOST_FP32_EFFICIENCY.get(host_isa_class(target.cpu.get("isa", [])), 0.45), 0.6, 0.004)
        return cls(0.45, 0.6, 0.004)


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
    bandwidth: dict[str, float] = field(default_factory=dict)  # host: backend or "*" -> fitted effective GB/s

    @classmethod
    def for_target(cls, target: Target, profiles: Path | None = None, measure: bool = True) -> CostModel:
        """Priors, fitted to the target's published benchmarks and its profiles/ records; the host also to
        ONNX Runtime timings on it (`measure=False`: only those already cached)."""
        model = cls(target)
        model.points = benchmark_points(target) + device_record_points(target, profiles)
        if target.is_host:
            model.points += host_points(target, measure=measure)
        model.fit()
        return model

    def add_points(self, points: list[CalibrationPoint]) -> CostModel:
        """More measurements of the target (e.g. `manifest_points` of a build here), and fit again."""
        self.points = [*self.points, *points]
        self.fit()
        return self

    # ------------------------------------------------------------ estimating

    def _on_cpu(self, backend: str | None) -> bool:
        return self.target.kind == "gpu" and backend is not None and not runs_on_accelerator(backend)

    def _peak(self, precision: str, backend: str | None) -> float:
        if self._on_cpu(backend):
            return cpu_peak_tops(self.target, precision)
        if self.target.npu and backend is not None and runs_on_accelerator(backend):  # a CPU board's NPU (RKNN)
            npu = self.target.npu["peak_tops"]
            return npu.get(precision) or npu.get("fp16") or max(npu.values())
        peaks = self.target.peak_tops
        return peaks.get(precision) or peaks.get("fp16") or peaks["fp32"]

    def efficiency(self, precision: str, backend: str | None) -> float:
        # A CPU board's NPU takes only its own fits: the board's CPU benchmarks ("*") say nothing about it.
        npu = bool(self.target.npu) and backend is not None and runs_on_accelerator(backend)
        for key in ((backend or "*", precision),) if npu else ((backend or "*", precision), ("*", precision)):
            if key in self.fitted:
                return self.fitted[key]
        if self.target.is_host and precision != "fp32":
            # FP32's (fitted here) times what this ISA gains at that precision, as a share of its peak
            gain = HOST_SPEEDUP[host_isa_class(self.target.cpu.get("isa", []))].get(precision, 1.0)
            share = self._peak("fp32", backend) / self._peak(precision, backend)
            return self.efficiency("fp32", backend) * gain * share
        return CostPriors.for_target(self.target, backend).compute_efficiency

    def kernel_overhead(self, backend: str | None) -> float:
        for key in (backend or "*", "*"):
            if key in self.overhead:
                return self.overhead[key]
        return CostPriors.for_target(self.target, backend).overhead_ms

    def host_bandwidth(self, backend: str | None) -> float:
        for key in (backend or "*", "*"):
            if key in self.bandwidth:
                return self.bandwidth[key]
        return HOST_BANDWIDTH_GBPS

    def _host_terms(self, layers: list[LayerFeatures], precision: str) -> list[tuple[int, int, bool]]:
        """The host's (FLOPs, bytes moved, is a kernel) per layer. Fused layers move nothing of their own;
        a precision the ISA does not compute in (FP16 on x86, INT8 without VNNI) runs as FP32 does, bytes
        and all, so it is never estimated faster than FP32."""
        gains = HOST_SPEEDUP[host_isa_class(self.target.cpu.get("isa", []))].get(precision, 1.0) > 1
        bpe = BYTES_PER_ELEMENT.get(precision, 4) if gains else 4
        return [(0, 0, False) if la.op_type in FUSED_INTO_PREVIOUS
                else (2 * la.macs, (la.params + 2 * la.out_elems) * bpe, True) for la in layers]

    def layer_ms(self, layers: list[LayerFeatures], precision: str, backend: str | None,
                 efficiency: float | None = None, overhead_ms: float | None = None,
                 arithmetic: str | None = None) -> list[float]:
        """Per-layer estimate (ms), the kernel overhead charged to the layers that become kernels. `arithmetic`:
        the precision the kernels compute in where it is not the storage precision (ncnn FP16 without fp16
        arithmetic computes at the FP32 peak, moving FP16 bytes)."""
        p = CostPriors.for_target(self.target, backend)
        computes = arithmetic or precision
        eff = efficiency if efficiency is not None else self.efficiency(computes, backend)
        kernel_ms = overhead_ms if overhead_ms is not None else self.kernel_overhead(backend)
        peak = self._peak(computes, backend) * 1e12
        if self.target.is_host:
            bw = self.host_bandwidth(backend) * 1e9
            return [max(flops / (peak * eff), moved / bw) * 1e3 + (kernel_ms if kernel else 0.0)
                    for flops, moved, kernel in self._host_terms(layers, precision)]
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
                    efficiency: float | None = None, overhead_ms: float | None = None,
                    arithmetic: str | None = None) -> float:
        return sum(self.layer_ms(layers, precision, backend, efficiency, overhead_ms, arithmetic))

    def estimate(self, spec: ModelSpec, precision: str, backend: str | None = None,
                 arithmetic: str | None = None) -> Latency:
        ms = round(self.estimate_ms(LayerFeatures.of_spec(spec), precision, backend, arithmetic=arithmetic), 4)
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
        self.fitted, self.overhead, self.bandwidth = {}, {}, {}
        # on the host the best-measured groups first: a backend with few points borrows their overhead and bandwidth
        for backend, pts in sorted(by_backend.items(), key=lambda kv: -len(kv[1]) if self.target.is_host else 0):
            if self.target.is_host and all(p.layers is not None for p in pts):
                self._fit_host(backend, pts)
                continue
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

    def _fit_host(self, backend: str, pts: list[CalibrationPoint]) -> None:
        """The host's fit, a third parameter besides overhead and efficiency: the effective bandwidth. On a
        grid, all at once (numpy): per precision the efficiency minimising the squared log error for each
        overhead and bandwidth; the pair with the least total wins. Three parameters want more than three
        points: with fewer (one backend's FP32 build) only the efficiency is fitted, the overhead and
        bandwidth those of ONNX Runtime's calibration."""
        import numpy as np

        effs = np.exp(np.linspace(*_LOG_EFF, 121))
        if len(pts) > 3:
            overheads = np.asarray(_log_grid(*OVERHEAD_RANGE_MS, 24))
            bandwidths = np.asarray(_log_grid(5.0, 640.0, 22))
        else:
            ref = REFERENCE_BACKEND if REFERENCE_BACKEND in self.overhead else "*"
            overheads = np.asarray([self.overhead.get(ref, CostPriors.for_target(self.target, backend).overhead_ms)])
            bandwidths = np.asarray([self.bandwidth.get(ref, HOST_BANDWIDTH_GBPS)])
        total = np.zeros((len(overheads), len(bandwidths)))
        best_eff: dict[str, np.ndarray] = {}
        for prec, group in _by_precision(pts).items():
            losses = np.zeros((len(overheads), len(effs), len(bandwidths)))
            for pt in group:
                terms = np.asarray(self._host_terms(pt.layers or [], prec), dtype=float).reshape(-1, 3)
                peak = self._peak(prec, pt.backend) * 1e12
                compute = terms[:, 0][None, None, :] / (peak * effs[:, None, None])  # eff x 1 x layer
                memory = terms[:, 1][None, None, :] / (bandwidths[None, :, None] * 1e9)  # 1 x bw x layer
                ms = np.maximum(compute, memory).sum(axis=2) * 1e3  # eff x bw
                ms = ms[None, :, :] + overheads[:, None, None] * terms[:, 2].sum()  # overhead x eff x bw
                losses += (np.log(ms) - math.log(pt.measured_ms)) ** 2
            total += losses.min(axis=1)
            best_eff[prec] = losses.argmin(axis=1)
        o, b = np.unravel_index(int(total.argmin()), total.shape)
        self.overhead[backend] = round(float(overheads[o]), 5)
        self.bandwidth[backend] = round(float(bandwidths[b]), 1)
        self.fitted |= {(backend, prec): round(float(effs[idx[o, b]]), 4) for prec, idx in best_eff.items()}

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
            **({"effective_bandwidth_gbps": dict(sorted(self.bandwidth.items()))} if self.bandwidth else {}),
            **({"host_isa": host_isa_class(self.target.cpu.get("isa", []))} if self.target.is_host else {}),
            "fit_mape_percent": round(100 * sum(errors) / len(errors), 1) if errors else None,
            "priors": "compute efficiency 0.30 and 0.012 ms per kernel on GPUs, 0.45 and 0.004 ms on CPUs, "
                      "where nothing was fitted; on the host the ISA's (AVX2 0.45, AVX-512 0.35) and its "
                      "gain per precision (INT8 1.6x FP32 with VNNI/AMX, else none)",
        }


def estimate_latency(spec: ModelSpec, target: Target, precision: str, priors: CostPriors | None = None,
                     backend: str | None = None, arithmetic: str | None = None) -> Latency:
    """The target's fitted cost model's estimate (priors override the fit: tests, what-ifs)."""
    model = CostModel.for_target(target)
    if priors is not None:
        ms = round(model.estimate_ms(LayerFeatures.of_spec(spec), precision, backend, priors.compute_efficiency,
                                     arithmetic=arithmetic), 4)
        return Latency(p50=ms, p90=ms, p99=ms, mean=ms, min=ms, runs=0, threads=0, where="estimate")
    return model.estimate(spec, precision, backend, arithmetic)


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


