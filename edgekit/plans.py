"""Plan: what to build for a target: backend, precision, quantization settings, and why.

A Plan round-trips through YAML so it can be read, edited and applied later. This module holds
the default planner (rules from the target description); the measuring planner builds on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import BadInput
from edgekit.ingest import ModelSpec
from edgekit.targets import Target

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
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
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        arts = []
        for a in d.get("artifacts", []):
            a = dict(a)
            q = a.get("quantization")
            a["quantization"] = QuantizationSettings(**q) if q else None
            arts.append(ArtifactPlan(**a))
        return cls(**{**d, "artifacts": arts})

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text()))
        except (OSError, yaml.YAMLError, TypeError) as e:
            raise BadInput(f"cannot read plan {path}: {e}") from None


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
            ap.quantization = q
        elif precision == "fp16":
            ap.keep_fp32 = list(exclude_nodes or [])  # --exclude-node: kept in float at any precision
            ap.reasons.append("FP16 weights and compute; layers whose weights leave the FP16 range stay FP32")
        else:
            ap.reasons.append("FP32 reference precision")
        artifacts.append(ap)
    return Plan(target=target.name, model_sha256=spec.sha256, artifacts=artifacts,
                reasons=[f"backend {backend}: first of {target.name}'s backends usable here"])
