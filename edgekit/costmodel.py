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


def estimate_latency(spec: ModelSpec, target: Target, precision: str, priors: CostPriors | None = None) -> Latency:
    p = priors or CostPriors.for_target(target)
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
