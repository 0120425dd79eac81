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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.home import cache_dir
from edgekit.ingest import ModelSpec
from edgekit.profiling.timing import Latency
from edgekit.targets import Target

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
HOST_CALIBRATION = "edgekit-host-calibration/1"  # the record's schema; a change of the nets is a new one


def host_isa_class(isa: list[str] | set[str]) -> str:
    """The class of the host's SIMD that decides what each precision gains (flags from /proc/cpuinfo)."""
    f = set(isa)
    if "amx_int8" in f:
        return "amx"
    if {"avx512_vnni", "avx_vnni"} & f:
        return "vnni"
    if "avx512f" in f:
        return "avx512"
    if "avx2" in f:
        return "avx2"
    if {"asimdhp", "fphp", "asimddp"} & f:
        return "armv8.2"
    if "asimd" in f:
        return "armv8.0"
    return "generic"


@dataclass
class CostPriors:
    compute_efficiency: float
    memory_efficiency: float
    overhead_ms: float  # per kernel

    @classmethod
    def for_target(cls, target: Target, backend: str | None = None) -> CostPriors:
        if target.kind == "gpu" and (backend is None or backend in ACCELERATOR_BACKENDS):
            return cls(0.30, 0.6, 0.012)  # small-batch CNN inference reaches about a third of a GPU's peak
        if target.is_host:
            return cls(HOST_FP32_EFFICIENCY.get(host_isa_class(target.cpu.get("isa", [])), 0.45), 0.6, 0.004)
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
    bandwidth: dict[str, float] = field(default_factory=dict)  # host: backend or "*" -> fitted effective GB/s

    @classmethod
    def for_target(cls, target: Target, profiles: Path | None = None, measure: bool = True) -> CostModel:
        """Priors, fitted to the target's published benchmarks and its profiles/ records; the host also to
        ONNX Runtime timings on it (`measure=False`: only those already cached)."""
        model = cls(target)
        model.points = benchmark_points(target) + profile_points(target, profiles)
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
                 efficiency: float | None = None, overhead_ms: float | None = None) -> list[float]:
        """Per-layer estimate (ms), the kernel overhead charged to the layers that become kernels."""
        p = CostPriors.for_target(self.target, backend)
        eff = efficiency if efficiency is not None else self.efficiency(precision, backend)
        kernel_ms = overhead_ms if overhead_ms is not None else self.kernel_overhead(backend)
        peak = self._peak(precision, backend) * 1e12
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
            ref = "onnxruntime" if "onnxruntime" in self.overhead else "*"
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
        from edgekit.profiling.device import profiles_root

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
        cpu = (rec.get("device_facts") or {}).get("cpu") or {}
        if target.is_host and cpu.get("model") != target.cpu.get("model"):
            continue  # a host-cpu record of another machine says nothing about this one
        layers = [LayerFeatures(str(f[0]), int(f[1]), int(f[2]), int(f[3])) for f in feats]
        points.append(CalibrationPoint(rec["backend"], rec["precision"], p50,
                                       f"profile: {path.parent.name}/{path.name}", layers=layers))
    return points


# ---------------------------------------------------------------- the host, measured

_HOST_MEMO: dict[str, dict[str, Any] | None] = {}


def host_points(target: Target, threads: int | None = None, measure: bool = True) -> list[CalibrationPoint]:
    """ONNX Runtime FP32 on this machine, timed as builds time (exported by the backend, edgekit's
    interleaved timing process, the build's threads): five small conv nets of unlike character
    (compute-bound, large activations, many tiny kernels, depthwise, residual). Measured once per CPU,
    thread count and runtime version (about 3 s), then cached in $EDGEKIT_HOME/cache/costmodel (default
    ~/.cache/edgekit/costmodel). Empty when it cannot be measured (ONNX Runtime missing, a process that
    may not spawn one): the priors stand."""
    threads = threads or int(target.cpu.get("cores", 1))
    rec = _host_record(target, threads, measure)
    return [CalibrationPoint("onnxruntime", "fp32", float(n["p50"]), f"measured here: onnxruntime fp32, "
                             f"calibration net '{name}'", layers=[LayerFeatures(*f) for f in n["layers"]])
            for name, n in (rec or {}).get("nets", {}).items()]


def _host_record(target: Target, threads: int, measure: bool) -> dict[str, Any] | None:
    """The cached calibration run here, measured now if there is none (and `measure`)."""
    from edgekit import backends

    try:
        runtime = backends.get_installed("onnxruntime")
        versions = runtime.versions()
    except Exception:
        return None
    key = hashlib.sha256(json.dumps([HOST_CALIBRATION, target.cpu, threads, versions], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    if key in _HOST_MEMO:
        return _HOST_MEMO[key]
    path = cache_dir("costmodel") / f"host-{key}.json"
    try:
        rec = json.loads(path.read_text())
        assert rec["schema"] == HOST_CALIBRATION and rec["key"] == key
    except (OSError, ValueError, KeyError, AssertionError):
        if not measure:
            return None
        rec = _measure_host(target, threads, key)
        if rec is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(rec, indent=1))
                tmp.replace(path)
            except OSError:
                pass  # an unwritable cache: measured again by the next process
    _HOST_MEMO[key] = rec
    return rec


def _measure_host(target: Target, threads: int, key: str) -> dict[str, Any] | None:
    import tempfile
    import time

    import numpy as np
    import onnx

    from edgekit import backends
    from edgekit.console import note
    from edgekit.ingest import ingest
    from edgekit.planning.types import ArtifactPlan
    from edgekit.profiling.timing import ProfileSettings, time_artifacts, where_local

    models = _calibration_nets()
    note(f"cost model: calibrating to this host ({target.cpu.get('model')}, "
         f"{host_isa_class(target.cpu.get('isa', []))}, {threads} threads): ONNX Runtime FP32 on {len(models)} "
         "small nets, once (cached)")
    started = time.perf_counter()
    features, arts = {}, {}
    try:
        runtime = backends.get_installed("onnxruntime")
        with tempfile.TemporaryDirectory(prefix="edgekit-host-cal-") as tmp:
            for name, model in models.items():
                folder = Path(tmp) / name
                (folder / "artifact").mkdir(parents=True)
                onnx.save(model, str(folder / "net.onnx"))
                spec = ingest(str(folder / "net.onnx"), folder / "spec", simplify=False)
                features[name] = [f.to_list() for f in LayerFeatures.of_spec(spec)]
                arts[name] = runtime.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, folder / "artifact")
            feeds = {"x": np.random.default_rng(0).random(CALIBRATION_INPUT, np.float32)}
            lat = time_artifacts(arts, feeds, ProfileSettings(warmup_runs=5, min_runs=20, seconds=0.15), threads)
    except Exception as e:  # no process to spawn, a runtime failing: the estimates keep the priors
        note(f"cost model: could not time ONNX Runtime here ({type(e).__name__}: {e}); estimates use the priors")
        return None
    return {"schema": HOST_CALIBRATION, "key": key, "where": where_local(), "cpu": target.cpu, "threads": threads,
            "seconds": round(time.perf_counter() - started, 2),
            "nets": {name: {"p50": lat[name].p50, "runs": lat[name].runs, "layers": features[name]}
                     for name in models}}


CALIBRATION_INPUT = (1, 3, 128, 128)


def _calibration_nets() -> dict[str, Any]:
    """Conv nets on one 1x3x128x128 input, of unlike cost: what splits compute, bandwidth and overhead."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def net(*layers: tuple[Any, ...]) -> Any:
        """Each layer (out channels, kernel, stride, groups) -> Conv + Relu; ("res", C): two 3x3 convs + Add."""
        nodes, inits, state = [], [], {"x": "x", "c": CALIBRATION_INPUT[1]}

        def conv(co: int, k: int, stride: int = 1, group: int = 1, relu: bool = True) -> None:
            i, ci = len(nodes), state["c"] // group
            w = rng.standard_normal((co, ci, k, k)).astype(np.float32) * math.sqrt(2 / (ci * k * k))
            inits.extend([numpy_helper.from_array(w, f"w{i}"),
                          numpy_helper.from_array(np.zeros(co, np.float32), f"b{i}")])
            pad = 0 if k == stride else (k - 1) // 2
            nodes.append(helper.make_node("Conv", [state["x"], f"w{i}", f"b{i}"], [f"t{i}"], pads=[pad] * 4,
                                          strides=[stride, stride], group=group))
            state.update(x=f"t{i}", c=co)
            if relu:
                nodes.append(helper.make_node("Relu", [state["x"]], [f"t{i}r"]))
                state["x"] = f"t{i}r"

        for layer in layers:
            if layer[0] == "res":
                skip = state["x"]
                conv(layer[1], 3)
                conv(layer[1], 3, relu=False)
                nodes.append(helper.make_node("Add", [state["x"], skip], [f"t{len(nodes)}a"]))
                nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], [f"t{len(nodes)}r"]))
                state["x"] = nodes[-1].output[0]
            else:
                conv(*layer)
        graph = helper.make_graph(nodes, "calibration",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(CALIBRATION_INPUT))],
                                  [helper.make_tensor_value_info(state["x"], TensorProto.FLOAT, None)], inits)
        return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    return {
        "large-activations": net((16, 3), (16, 3), (32, 3, 2)),
        "compute-bound": net((64, 4, 4), *[(64, 3)] * 4),
        "many-small-kernels": net((16, 8, 8), *[(16, 1)] * 16),
        "depthwise": net((32, 3, 2), *[(32, 3, 1, 32), (32, 1)] * 4),
        "residual": net((24, 3, 2), (24, 3, 2), ("res", 24), (48, 3, 2), ("res", 48), (96, 3, 2), ("res", 96)),
    }


def manifest_points(manifest: dict[str, Any]) -> list[CalibrationPoint]:
    """A package's FP32 references measured on this machine (each artifact's `reference_latency_ms`: its
    backend's FP32 build, timed in the same rounds as the artifacts) with the model's layer features: what
    the host's model can be fitted to per backend (`add_points`) before its estimates of the other
    precisions are compared with their measurements."""
    layers = [LayerFeatures(*f) for f in cost_features(manifest.get("layers") or [])]
    found: dict[str, float] = {}
    for a in manifest.get("artifacts", []):
        ref = a.get("reference_latency_ms") or {}
        if layers and str(ref.get("where", "")).startswith("local:") and (ref.get("p50") or 0) > 0:
            found.setdefault(a["backend"], float(ref["p50"]))
    return [CalibrationPoint(b, "fp32", ms, f"measured here: the model's {b} fp32 build", layers=layers)
            for b, ms in found.items()]


def cost_features(spec_layers: list[dict[str, Any]]) -> list[list[Any]]:
    """A manifest's `layers` as the compact per-layer features a profile record carries."""
    return [[la["op_type"], la["macs"], la["params"], math.prod(max(int(d), 1) for d in la["output_shape"])]
            for la in spec_layers]

