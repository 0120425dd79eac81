"""The planner: which backend and precision (mix) to ship, chosen by measurement under budgets.

Every candidate the target allows (each of its backends usable here x each precision it supports) is
built, verified against the FP32 model and timed side by side by the ordinary build pipeline; INT8 that
misses the accuracy budget gets a mixed-precision candidate (the most sensitive layers kept in float,
`edgekit.sensitivity`) when that module is available. The cost model estimates every candidate too;
where a measurement exists it decides, and the plan states the cost model's error against it.
The result is an editable plan.yaml that `edgekit build --plan` applies exactly.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekit.console import note
from edgekit.costmodel import estimate_latency
from edgekit.errors import BadInput
from edgekit.ingest import ingest, parse_input_shapes
from edgekit.pipeline import BuildOptions, build
from edgekit.plan import ArtifactPlan, Plan
from edgekit.targets import Target, load_target

OBJECTIVES = ("latency", "size")


@dataclass
class Budgets:
    max_accuracy_drop: float = 1.0  # points (labels) — also the verification threshold
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    objective: str = "latency"

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise BadInput(f"--objective {self.objective}: use latency or size")


@dataclass
class Candidate:
    key: str
    backend: str
    precision: str
    float_nodes: int
    estimated_ms: float
    measured_ms: float | None
    where: str
    bytes: int
    accuracy: float | None
    cosine: float
    verdict: str  # ok | rejected | over budget | does not fit
    reason: str

    @property
    def latency_ms(self) -> float:
        return self.measured_ms if self.measured_ms is not None else self.estimated_ms


def _fits(target: Target, nbytes: int) -> bool:
    """Weights plus a working margin must fit in half the device's memory (the OS and app need the rest)."""
    return nbytes * 3 <= float(target.memory.get("size_gb", 1e9)) * 1e9 * 0.5


def plan_model(opts: BuildOptions, budgets: Budgets, out: str | Path) -> tuple[Plan, list[Candidate]]:
    """Build every candidate in a scratch package, judge them, write the chosen plan to `out`."""
    budgets.check()
    target = load_target(opts.target)
    with tempfile.TemporaryDirectory(prefix="edgekit-plan-") as tmp:
        trial = dataclasses.replace(opts, out=str(Path(tmp) / "candidates"), backend=opts.backend or "all",
                                    precisions=opts.precisions or ["all"], force=True, plan=None)
        trial.thresholds = dataclasses.replace(opts.thresholds, max_accuracy_drop=budgets.max_accuracy_drop)
        note("planner: building, verifying and timing every candidate")
        result = build(trial)
        spec = ingest(opts.model, Path(tmp) / "spec", parse_input_shapes(opts.input_shapes), opts.weights)
        tried = Plan.load(result.path / "plan.yaml")
        mixed = _mixed_candidates(spec, trial, result.manifest, tried)
        if mixed:  # rebuild every candidate with the mixed ones, so all are timed in the same rounds
            note(f"planner: {len(mixed)} mixed-precision candidate(s); timing all candidates together")
            tried.artifacts = [ap for ap in tried.artifacts
                               if not (ap.precision == "int8" and ap.backend in {m.backend for m in mixed})] + mixed
            tried.save(Path(tmp) / "with-mixed.yaml")
            result = build(dataclasses.replace(trial, out=str(Path(tmp) / "candidates2"),
                                               plan=str(Path(tmp) / "with-mixed.yaml")))
            tried = Plan.load(result.path / "plan.yaml")
    manifest = result.manifest
    plans = {f"{ap.backend}-{ap.precision}": ap for ap in tried.artifacts}
    candidates = []
    for a in manifest["artifacts"]:
        lat = a.get("latency_ms") or {}
        est = estimate_latency(spec, target, a["precision"], backend=a["backend"]).p50
        where = str(lat.get("where", "estimate"))
        # A measurement counts for the target only when taken on it: this host for host-cpu, or the device.
        on_target = where.startswith("ssh://") or (target.is_host and where.startswith("local:"))
        measured = lat.get("p50") if on_target else None
        v = a["verification"]
        q = plans[a["key"]].quantization
        c = Candidate(a["key"], a["backend"], a["precision"], len(q.exclude_nodes) if q else 0, est, measured,
                      lat.get("where", "estimate"), a["bytes"], v.get("accuracy"), v["cosine_min"], "ok", "")
        if not v["passed"]:
            c.verdict, c.reason = "rejected", "; ".join(v["failures"])
        elif not _fits(target, c.bytes):
            c.verdict, c.reason = "does not fit", f"{c.bytes / 1e6:.1f} MB x3 > half of {target.memory['size_gb']} GB"
        elif budgets.max_latency_ms is not None and c.latency_ms > budgets.max_latency_ms:
            c.verdict, c.reason = "over budget", f"{c.latency_ms:.3f} ms > {budgets.max_latency_ms} ms"
        elif budgets.max_size_mb is not None and c.bytes / 1e6 > budgets.max_size_mb:
            c.verdict, c.reason = "over budget", f"{c.bytes / 1e6:.2f} MB > {budgets.max_size_mb} MB"
        candidates.append(c)
    ok = [c for c in candidates if c.verdict == "ok"]
    if not ok:
        raise BadInput("no candidate meets the budgets: " + "; ".join(f"{c.key}: {c.reason}" for c in candidates))
    rank = {b: i for i, b in enumerate(target.backends)}  # ties go to the backend the target lists first

    def key(c: Candidate) -> tuple[float, ...]:
        first, second = (c.bytes, c.latency_ms) if budgets.objective == "size" else (c.latency_ms, c.bytes)
        return (round(first, 6), rank.get(c.backend, 99), second)

    chosen = min(ok, key=key)
    basis = "measured" if chosen.measured_ms is not None else "estimated (no measurement possible here)"
    why = (f"{chosen.key}: the {'smallest' if budgets.objective == 'size' else 'fastest'} of {len(ok)} candidates "
           f"meeting the budgets ({basis} p50 {chosen.latency_ms:.3f} ms, {chosen.bytes:,} B"
           + (f", accuracy {chosen.accuracy:.2%}" if chosen.accuracy is not None else "") + ")")
    chosen.reason = why
    measured = [c for c in candidates if c.measured_ms]
    mape = (sum(abs(c.estimated_ms - c.measured_ms) / c.measured_ms for c in measured) / len(measured) * 100
            if measured else None)
    ap: ArtifactPlan = plans[chosen.key]
    ap.reasons = [*ap.reasons, why]
    plan = Plan(target=target.name, model_sha256=spec.sha256, artifacts=[ap],
                reasons=[*manifest["plan_reasons"], why],
                budgets=asdict(budgets), candidates=[asdict(c) | {"chosen": c is chosen} for c in candidates],
                cost_model={"mape_percent": round(mape, 1) if mape is not None else None,
                            "compared": len(measured),
                            "note": "roofline over MACs and bytes with prior efficiencies; error vs the "
                                    "measured p50 of each candidate"})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    return plan, candidates


def _mixed_candidates(spec: Any, trial: BuildOptions, manifest: dict[str, Any], tried: Plan) -> list[ArtifactPlan]:
    """For every INT8 candidate that missed the thresholds: keep its most sensitive layers in float
    (fewest that pass, found by measurement) as a new candidate of the same backend."""
    rejected = [a for a in manifest["artifacts"] if a["precision"] == "int8" and not a["verification"]["passed"]]
    if not rejected or trial.calib is None:
        return []
    from edgekit.data import Preprocess, prepare_data
    from edgekit.sensitivity import mixed_precision

    preprocess = Preprocess.from_file(trial.preprocess) if trial.preprocess else None
    data = prepare_data(spec, trial.calib, trial.val, preprocess, trial.calib_samples, trial.val_samples)
    plans = {f"{ap.backend}-{ap.precision}": ap for ap in tried.artifacts}
    found = []
    for a in rejected:
        ap = plans[a["key"]]
        assert ap.quantization is not None and data.calibration is not None
        note(f"planner: {a['key']} missed the thresholds; searching which layers to keep in float")
        res = mixed_precision(spec, ap.backend, data.calibration, data.validation, trial.thresholds, ap.quantization)
        if res.passed and res.float_nodes:
            why = (f"mixed precision: {len(res.float_nodes)} most sensitive layer(s) kept in float "
                   f"({', '.join(res.float_nodes)}) so INT8 meets the thresholds that uniform INT8 missed")
            found.append(dataclasses.replace(ap, quantization=res.settings, reasons=[*ap.reasons, why]))
        else:
            note(f"planner: no mixed-precision {a['key']} met the thresholds ({res.reason})")
    return found


def candidate_rows(candidates: list[Candidate]) -> list[dict[str, Any]]:
    return [{
        "candidate": c.key, "float nodes": str(c.float_nodes), "est. ms": f"{c.estimated_ms:.3f}",
        "measured ms": f"{c.measured_ms:.3f}" if c.measured_ms is not None else "–", "bytes": f"{c.bytes:,}",
        "accuracy": f"{c.accuracy:.2%}" if c.accuracy is not None else "–", "cosine": f"{c.cosine:.5f}",
        "verdict": c.verdict, "reason": c.reason,
    } for c in candidates]
