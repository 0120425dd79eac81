"""The per-layer table of a package: what each layer of the (canonical) model costs and how each
artifact runs it. Feeds the report's per-layer bars and the cost model's profile records.

Per layer: MACs, parameters, output shape; the target's cost-model estimate per precision; the time
ONNX Runtime's profiler measured for it on this host (FP32 reference); its INT8 sensitivity when the
planner measured one; and the precision each artifact keeps it in.
"""

from __future__ import annotations

from typing import Any

from edgekit.backends.base import Artifact
from edgekit.ingest import ModelSpec
from edgekit.planning.types import ArtifactPlan
from edgekit.profiling.costmodel import CostModel, LayerFeatures
from edgekit.quantize.ops import WEIGHTED_OPS as QUANTIZED_OPS
from edgekit.targets import Target


def layer_precision(op_type: str, node: str, precision: str, details: dict[str, Any], ap: ArtifactPlan | None) -> str:
    """The precision an artifact keeps one layer's weights and arithmetic in ("–" for ops that follow
    their neighbours, e.g. an activation inside an INT8 region)."""
    if precision == "fp16":
        kept = set(details.get("keep_fp32") or []) | set(ap.keep_fp32 if ap else [])
        return "fp32" if node in kept else "fp16"
    if precision == "int8":
        excluded = set(details.get("excluded_nodes") or []) | set(
            ap.quantization.exclude_nodes if ap and ap.quantization else [])
        if op_type not in QUANTIZED_OPS:
            return "–"
        return "fp32" if node in excluded else "int8"
    return precision


def layer_table(spec: ModelSpec, target: Target, artifacts: list[Artifact], plans: list[ArtifactPlan],
                node_ms: dict[str, float] | None, sensitivity: dict[str, float] | None) -> list[dict[str, Any]]:
    cost = CostModel.for_target(target)
    features = LayerFeatures.of_spec(spec)
    backend = artifacts[0].backend if artifacts else target.backends[0]
    est = {p: cost.layer_ms(features, p, backend) for p in target.precisions if p in ("fp32", "fp16", "int8")}
    by_key = {f"{ap.backend}-{ap.precision}": ap for ap in plans}
    rows = []
    for i, la in enumerate(spec.layers):
        rows.append({
            "node": la.name,
            "op_type": la.op_type,
            "macs": la.macs,
            "params": la.params,
            "output_shape": list(la.output_shape),
            "est_ms": {p: round(v[i], 5) for p, v in est.items()},
            "measured_ms": (node_ms or {}).get(la.name),
            "sensitivity_db": (sensitivity or {}).get(la.name),
            "precision": {a.key: layer_precision(la.op_type, la.name, a.precision, a.details, by_key.get(a.key))
                          for a in artifacts},
        })
    return rows
