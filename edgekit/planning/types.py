"""Plan: what to build for a target: backend, precision, quantization settings, and why.

A Plan round-trips through YAML so it can be read, edited and applied later. Types only: the default
plan (the target's rules) is made in planning/select.py, the measured search in planning/search.py.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import BadInput

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
    # A prequantized Q/DQ ONNX (quantization-aware training's) the backend takes as its INT8 instead of calibrating
    qdq_model: str | None = None


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
    # A plan made on a cluster (--cluster): {cluster, nodes, rounds: [{tasks: [{key, node, host, pid, seconds}],
    # retried: [{key, attempt, error}]}], measured_by}; None when planned here.
    run: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for ap in d["artifacts"]:  # a QAT model is a scratch file of the build: the artifact holds what it became
            q = ap["quantization"] or {}
            if q.get("qdq_model") is None or Path(q["qdq_model"]).is_absolute():
                q.pop("qdq_model", None)
        return d

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
