"""Cost model: latency estimated from the target description where it cannot be measured.

Per layer: max(2*MACs / (peak_precision * efficiency), bytes moved / (bandwidth * efficiency)) plus a
fixed per-kernel overhead (launch, sync), summed over the layers that become kernels. Elementwise
activations are fused into the preceding conv by every GPU/NPU compiler, so they add no kernel.

The efficiencies and overheads below are priors (small-batch CNN inference typically reaches a third
of a GPU's peak); they are what an estimate says until measured profiles of the target fit them
(the planner issue). Every estimate is marked `where: "estimate"` and never presented as a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.ingest import ModelSpec
from edgekit.profile import Latency
from edgekit.targets import Target

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
FUSED_INTO_PREVIOUS = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Mul", "Add",
                                 "BatchNormalization", "QuantizeLinear", "DequantizeLinear", "Identity",
                                 "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Tanh", "Mish"})


@dataclass
class CostPriors:
    compute_efficiency: float
    memory_efficiency: float
    overhead_ms: float  # per kernel

    @classmethod
    def for_target(cls, target: Target) -> CostPriors:
        if target.kind == "gpu":
            return cls(0.30, 0.6, 0.012)
        return cls(0.45, 0.6, 0.004)


ACCELERATOR_BACKENDS = frozenset({"tensorrt"})  # backends that run on a GPU target's accelerator


def cpu_peak_tops(target: Target, precision: str) -> float:
    """A GPU board's CPU, for backends that run there: cores x GHz x 16 FLOPs/cycle (two 4-wide FMA
    units), doubled for fp16 with ARMv8.2 half-precision arithmetic, x4 for int8 with dot-product."""
    cpu = target.cpu
    isa = set(cpu.get("isa", []))
    fp32 = float(cpu.get("cores", 4)) * float(cpu.get("freq_ghz", 1.5)) * 16 / 1000
    gain = {"fp32": 1.0, "fp16": 2.0 if {"asimdhp", "fphp"} & isa else 1.0,
            "int8": 4.0 if {"asimddp", "dotprod"} & isa else 1.0}[precision]
    return fp32 * gain


def estimate_latency(spec: ModelSpec, target: Target, precision: str, priors: CostPriors | None = None,
                     backend: str | None = None) -> Latency:
    on_cpu = target.kind == "gpu" and backend is not None and backend not in ACCELERATOR_BACKENDS
    p = priors or (CostPriors(0.45, 0.6, 0.004) if on_cpu else CostPriors.for_target(target))
    if on_cpu:
        peak = cpu_peak_tops(target, precision)
    else:
        peak = target.peak_tops.get(precision) or target.peak_tops.get("fp16") or target.peak_tops["fp32"]
    bandwidth = float(target.memory.get("bandwidth_gbps", 10.0)) * 1e9
    bpe = BYTES_PER_ELEMENT[precision]
    total_s, kernels = 0.0, 0
    for layer in spec.layers:
        out_elems = 1
        for d in layer.output_shape:
            out_elems *= max(int(d), 1)
        moved = (layer.params + 2 * out_elems) * bpe  # weights in, activations in and out
        compute_s = 2 * layer.macs / (peak * 1e12 * p.compute_efficiency)
        memory_s = moved / (bandwidth * p.memory_efficiency)
        total_s += max(compute_s, memory_s)
        if layer.op_type not in FUSED_INTO_PREVIOUS:
            kernels += 1
    ms = round(total_s * 1e3 + kernels * p.overhead_ms, 4)
    return Latency(p50=ms, p90=ms, p99=ms, mean=ms, min=ms, runs=0, threads=0, where="estimate")
