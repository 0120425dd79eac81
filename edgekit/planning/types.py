"""Plan: what to build for a target: backend, precision, quantization settings, and why.

A Plan round-trips through YAML so it can be read, edited and applied later. This module holds
the default planner (rules from the target description); the measuring planner builds on it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import BadInput
from edgekit.ingest import ModelSpec
from edgekit.quantize.attention import looks_like_transformer
from edgekit.targets import Target

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
PRECISIONS = ("fp32", "fp16", "int8")
NNCF_PRESETS = ("performance", "mixed")
PLAN_SCHEMA = "edgekit-plan/1"


@dataclass
class QuantizationSettings:
    method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = True
    symmetric_activations: bool = False  # TensorRT wants True; CPUs do better asymmetric
    reduce_range: bool = False  # 7-bit weights: avoids u8*s8 saturation on x86 without VNNI
    samples: int = 300
    percentile: float = 99.999
    exclude_nodes: list[str] = field(default_factory=list)  # kept in float
    # NNCF (OpenVINO): None = the library's default for each
    preset: str | None = None  # performance (symmetric) | mixed (asymmetric activations)
    fast_bias_correction: bool = True
    model_type: str | None = None  # transformer: NNCF's special handling
    accuracy_control: bool = False  # NNCF quantize_with_accuracy_control, needs labels


@dataclass
class ArtifactPlan:
    backend: str
    precision: str
    quantization: QuantizationSettings | None = None
    keep_fp32: list[str] = field(default_factory=list)  # nodes held in fp32 in an fp16 artifact
    options: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


@dataclass
class Plan:
    target: str
    model_sha256: str
    artifacts: list[ArtifactPlan]
    reasons: list[str] = field(default_factory=list)
    schema: str = PLAN_SCHEMA
    # Written by the planner (`edgekit plan`): what it weighed, under which budgets, how good its estimates were.
    budgets: dict[str, Any] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    cost_model: dict[str, Any] = field(default_factory=dict)
    # backend -> node -> INT8 sensitivity (output SNR gained by keeping the node in float, dB)
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    # Pruning/distillation before quantization (CompressOptions as a dict), when the plan prunes.
    compress: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> Plan:
        """A plan from its YAML mapping, every field type-checked and every value range-checked first:
        a plan file may come from someone else (BadInput naming the key otherwise)."""
        from edgekit.untrusted import typed_fields

        plan = cls(**typed_fields(cls, d, where))
        if plan.schema != PLAN_SCHEMA:
            raise BadInput(f"{where}: schema {plan.schema!r} is not {PLAN_SCHEMA}")
        if not re.fullmatch(r"[0-9a-f]{64}", plan.model_sha256):
            raise BadInput(f"{where}: model_sha256 must be 64 hex digits (the canonical model's sha256)")
        for i, ap in enumerate(plan.artifacts):
            _check_artifact_plan(ap, f"{where}: artifacts[{i}]")
        if plan.compress is not None:
            from edgekit.compress.stage import CompressOptions

            typed_fields(CompressOptions, plan.compress, where, required=(), key="compress")
            if plan.compress.get("checkpoint"):
                raise BadInput(f"{where}: compress.checkpoint is set; a plan names no file to write, "
                               "pass --checkpoint FILE instead")
        for key in ("max_accuracy_drop", "max_latency_ms", "max_size_mb"):
            value = plan.budgets.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise BadInput(f"{where}: budgets.{key} must be a non-negative number, got {value!r}")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        from edgekit.untrusted import load_yaml

        return cls.from_dict(load_yaml(path, "plan"), f"plan {path}")


def _check_artifact_plan(ap: ArtifactPlan, where: str) -> None:
    """Values the backends will use: in range, so a bad plan is bad input, not a crash in a library."""
    if ap.precision not in PRECISIONS:
        raise BadInput(f"{where}.precision is {ap.precision!r}; use one of {', '.join(PRECISIONS)}")
    q = ap.quantization
    if q is None:
        if ap.precision == "int8":
            raise BadInput(f"{where}: an int8 artifact needs its quantization settings")
        return
    if q.method not in CALIBRATION_METHODS:
        raise BadInput(f"{where}.quantization.method is {q.method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if q.samples < 1:
        raise BadInput(f"{where}.quantization.samples must be at least 1, got {q.samples}")
    if not 0 < q.percentile <= 100:
        raise BadInput(f"{where}.quantization.percentile must be in (0, 100], got {q.percentile}")
    if q.preset not in (None, *NNCF_PRESETS):
        raise BadInput(f"{where}.quantization.preset is {q.preset!r}; use one of {', '.join(NNCF_PRESETS)} or null")
    drop = ap.options.get("max_accuracy_drop")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop < 0):
        raise BadInput(f"{where}.options.max_accuracy_drop must be a non-negative number, got {drop!r}")


def default_plan(
    spec: ModelSpec,
    target: Target,
    backend: str,
    precisions: list[str],
    method: str = "minmax",
    calib_samples: int = 300,
    exclude_nodes: list[str] | None = None,
    backend_requests: dict[str, Any] | None = None,
) -> Plan:
    """One artifact per requested precision, with settings the target's hardware calls for."""
    if method not in CALIBRATION_METHODS:
        raise BadInput(f"unknown calibration method '{method}'; use one of {', '.join(CALIBRATION_METHODS)}")
    from edgekit import backends

    owner = backends.get(backend)
    options = owner.plan_options(target, backend_requests)
    artifacts = []
    for precision in precisions:
        ap = ArtifactPlan(backend=backend, precision=precision, options=dict(options))
        if precision == "int8":
            q = QuantizationSettings(method=method, samples=calib_samples, exclude_nodes=list(exclude_nodes or []))
            x86 = target.cpu.get("arch") == "x86_64"
            vnni = any(target.has_isa(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
            if x86 and not vnni and target.kind == "cpu" and owner.int8_reduce_range:
                q.reduce_range = True
                ap.reasons.append("x86 CPU without VNNI: 7-bit weights (ORT reduce_range, NNCF overflow_fix) "
                                  "avoid u8*s8 saturation")
            if owner.int8_symmetric_only:
                q.symmetric_activations = True
                ap.reasons.append(f"{backend} takes symmetric INT8 only")
            ap.reasons.append(f"INT8 static Q/DQ, per-channel weights, {method} calibration on {calib_samples} samples")
            attention = looks_like_transformer(spec.load())
            if attention is not None and q.model_type is None:
                q.model_type = "transformer"
                ap.reasons.append(f"transformer recipe ({attention}): the attention MatMuls stay in float "
                                  "(NNCF model_type=transformer, ONNX Runtime MatMulConstBOnly)")
            head = _detector_head(spec, backend) if (backend_requests or {}).get("detector_head", True) else None
            if head is not None:  # one INT8 scale for pixels and 0-1 scores wipes the scores out
                why, nodes = head
                auto = [n for n in nodes if n not in q.exclude_nodes]
                q.exclude_nodes = list(dict.fromkeys([*q.exclude_nodes, *nodes]))
                ap.options["detector_head_nodes"] = auto  # found automatically: lenient where a backend fused one
                shown = ", ".join(nodes[:4]) + (f", … ({len(nodes) - 4} more)" if len(nodes) > 4 else "")
                ap.reasons.append(f"detector head kept in float ({len(nodes)} nodes: {shown}): {why}; "
                                  "--no-detector-head quantizes it too")
            ap.quantization = q
        elif precision == "fp16":
            ap.keep_fp32 = list(exclude_nodes or [])  # --exclude-node: kept in float at any precision
            ap.reasons.append("FP16 weights and compute; layers whose weights leave the FP16 range stay FP32")
        else:
            ap.reasons.append("FP32 reference precision")
        artifacts.append(ap)
    return Plan(target=target.name, model_sha256=spec.sha256, artifacts=artifacts,
                reasons=[f"backend {backend}: first of {target.name}'s backends usable here"])


def _detector_head(spec: ModelSpec, backend: str) -> tuple[str, list[str]] | None:
    """The detector head to keep in float in an INT8 artifact (edgekit.quantize.detection_head), or None. NCNN's
    INT8 quantizes only weighted layers (the rest runs in float anyway): it gets the head's weighted ops."""
    from edgekit.quantize.detection_head import WEIGHTED_OPS, detector_head

    head = detector_head(spec)
    if head is None or backend != "ncnn":
        return head
    weighted = {n.name for n in spec.load().graph.node if n.op_type in WEIGHTED_OPS}
    return head[0], [n for n in head[1] if n in weighted]
