"""Choosing what to build: the backends and precisions a target and this host allow, the ops each backend
runs, a given plan checked against the target, and the default plan (the target's rules) per backend.
The pipeline, the planner and `edgekit debug` all choose through here."""

from __future__ import annotations

from typing import Any

from edgekit import backends
from edgekit.backends.base import Backend
from edgekit.errors import BadInput, UnsupportedOp
from edgekit.ingest import ModelSpec
from edgekit.planning.types import CALIBRATION_METHODS, ArtifactPlan, Plan, QuantizationSettings
from edgekit.quantize.attention import looks_like_transformer
from edgekit.targets import Target


def resolve_backends(target: Target, requested: str | None, reasons: list[str]) -> list[Backend]:
    """The requested backends; 'all' = every backend the target lists that edgekit has and can run here;
    none requested = the first such one."""
    if requested and requested != "all":
        chosen = []
        for name in [n.strip() for n in requested.split(",") if n.strip()]:
            if name not in target.backends:
                raise BadInput(f"target {target.name} does not list backend {name} "
                               f"(it lists {', '.join(target.backends)})")
            chosen.append(backends.get_installed(name))
        return chosen
    usable, skipped = [], []
    for name in target.backends:
        if name not in backends.names():
            skipped.append(f"{name}: not implemented in edgekit yet")
            continue
        backend = backends.get(name)
        missing = backend.missing()
        if missing:
            skipped.append(f"{name}: {missing}")
            continue
        usable.append(backend)
        if requested is None:
            break
    if not usable:
        raise BadInput(f"no backend of target {target.name} is usable here ({'; '.join(skipped)})")
    reasons.append(f"backends {', '.join(b.name for b in usable)} of {target.name}'s "
                   f"{', '.join(target.backends)}" + (f" (skipped {'; '.join(skipped)})" if skipped else ""))
    return usable


def resolve_precisions(target: Target, backend: Backend, requested: list[str] | None, has_calib: bool,
                       reasons: list[str], several: bool = False) -> list[str]:
    """The precisions to build with `backend`. With several backends, a precision one of them cannot
    build is left out for that backend (the reason kept) instead of failing the whole build."""
    usable = [p for p in ("fp32", "fp16", "int8") if target.supports(p) and p in backend.precisions]
    automatic = requested in (None, [], ["auto"], ["all"])
    if automatic and not target.supports("int8"):  # said once per build
        why = next((n for n in target.notes if "INT8" in n or "int8" in n), "the target lists no int8")
        if not any(r.startswith(f"no INT8 for {target.name}") for r in reasons):
            reasons.append(f"no INT8 for {target.name}: {why}")
    if requested in (None, [], ["auto"]):
        return [next((p for p in ("int8", "fp16", "fp32") if p in usable and (p != "int8" or has_calib)), "fp32")]
    if requested == ["all"]:
        return [p for p in usable if p != "int8" or has_calib]
    for p in requested:
        if p not in ("fp32", "fp16", "int8"):
            raise BadInput(f"unknown precision '{p}'; use fp32, fp16, int8, all or auto")
        if not target.supports(p):
            why = next((n for n in target.notes if p.upper() in n or p in n), "")
            instead = next((q for q in ("fp16", "fp32") if target.supports(q)), "fp32")
            raise BadInput(f"target {target.name} does not support {p}" + (f" ({why})" if why else "")
                           + f"; it supports {', '.join(target.precisions)}: use --precision {instead}")
        if p not in backend.precisions and not several:
            raise BadInput(f"backend {backend.name} cannot build {p} (it builds {', '.join(backend.precisions)})")
    if "int8" in requested and not has_calib:
        raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
    skipped = [p for p in requested if p not in backend.precisions]
    if skipped:
        reasons.append(f"{backend.name} builds no {', '.join(skipped)}: left out for it")
    return [p for p in dict.fromkeys(requested) if p in backend.precisions]


def check_ops(spec: ModelSpec, chosen: list[Backend], explicit: bool, reasons: list[str]) -> list[Backend]:
    """Stop before any expensive step when a backend cannot run an op. With 'all', such a backend is
    left out (and the reason kept) as long as another one remains."""
    model = spec.load()
    kept, first_issue = [], None
    for backend in chosen:
        issues = backend.unsupported_nodes(model)
        if not issues:
            kept.append(backend)
            continue
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        first_issue = first_issue or f"{issues[0]}{more}"
        reasons.append(f"left out {backend.name}: {issues[0]}{more}")
    if not kept or (explicit and first_issue):
        raise UnsupportedOp(first_issue or "no backend can run this model")
    return kept


def load_plan(path: str, target: Target) -> Plan:
    plan = Plan.load(path)
    if plan.target != target.name:
        raise BadInput(f"plan {path} is for target {plan.target}, not {target.name}")
    if not plan.artifacts:
        raise BadInput(f"plan {path} lists no artifacts")
    for ap in plan.artifacts:
        if ap.backend not in backends.names():
            raise BadInput(f"plan {path} names backend {ap.backend}, which edgekit does not have")
        if not target.supports(ap.precision):
            raise BadInput(f"plan {path} asks for {ap.precision}, which {target.name} does not support")
    return plan


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
            if target.int8_dot_saturates and owner.int8_reduce_range:
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
    if head is None or not backends.get(backend).int8_weighted_layers_only:
        return head
    weighted = {n.name for n in spec.load().graph.node if n.op_type in WEIGHTED_OPS}
    return head[0], [n for n in head[1] if n in weighted]
