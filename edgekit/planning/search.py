"""The planner: which backend, pruning ratio and precision (mix) to ship, chosen by measurement under budgets.

Every candidate the target allows (each of its backends usable here x each precision it supports, and
with `--prune R,..` each pruning ratio) is built, verified against the FP32 model and timed side by side
by the ordinary build pipeline; INT8 that misses the accuracy budget gets a mixed-precision candidate
(the most sensitive layers kept in float, `edgekit.quantize.sensitivity`). Pruned candidates are pruned per
group by measured sensitivity (`edgekit.compress.group_sensitivity`), distilled from the original, and
their latencies are scaled to the first build's rounds through the original model timed in both.

The cost model (fitted to the target's benchmarks and profiles/) estimates every candidate; where a
measurement on the target exists (this host for host-cpu, or a device with `--device`) it decides, and
the plan states the cost model's error against it. Where only estimates exist, a candidate must be
estimated more than ESTIMATE_TIE_TOLERANCE faster to beat a more accurate one: closer estimates are
within the model's own error. The result is an editable plan.yaml that `edgekit build --plan` applies.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.console import note
from edgekit.data import DataSplit
from edgekit.errors import BadInput
from edgekit.ingest import ModelSpec
from edgekit.pipeline.evaluate import Evaluation, evaluate
from edgekit.pipeline.options import BuildOptions
from edgekit.pipeline.stages import CachedStages
from edgekit.planning.types import ArtifactPlan, Plan
from edgekit.profiling.costmodel import CostModel, LayerFeatures, manifest_points
from edgekit.targets import Target, load_target

OBJECTIVES = ("latency", "size")
ESTIMATE_TIE_TOLERANCE = 0.10  # the fitted cost models reproduce their calibration points to ~3-30%
PLAYOFF_MARGIN = 0.15  # measured candidates this close to the fastest are timed again before choosing
PRECISION_FIDELITY = {"fp32": 3, "bf16": 2, "fp16": 2, "int8": 1}


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
class PruneSearch:
    """Pruning candidates: each ratio is pruned (per-group ratios from measured sensitivity), distilled
    from the original on the training data, and built like the unpruned candidates."""

    ratios: list[float]
    train: str | None = None  # default: the calibration data, unlabelled (pure distillation)
    epochs: int = 10
    time_budget_s: float | None = None
    importance: str = "l1"
    by_sensitivity: bool = True
    augment: str = "hflip"  # distill.AUGMENTATIONS

    def check(self) -> None:
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise BadInput(f"--prune {r}: pruning ratios are fractions of channels, 0 < r < 1")


STABLE_WITHIN = 0.03  # the planner's rounds stop once every speed ratio is known within 3% (the playoff: 1.5%)

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
    prune_ratio: float = 0.0
    macs: int = 0
    task: str = ""  # the task metric that decided, e.g. "mAP50-95 61.20 (-0.40)"

    @property
    def latency_ms(self) -> float:
        return self.measured_ms if self.measured_ms is not None else self.estimated_ms


@dataclass
class _Round:
    """One evaluation of candidates (in memory, never read back from files): its manifest record, plans,
    artifacts, and how its timings map onto the first round's."""

    manifest: dict[str, Any]
    plans: dict[str, ArtifactPlan]
    spec: ModelSpec  # the model given to the planner (a pruned round's own model is in manifest["layers"])
    path: Path  # the scratch folder holding the round's artifacts
    artifacts: dict[str, Artifact]
    data: DataSplit
    evaluation: Evaluation
    prune_ratio: float = 0.0
    compress: dict[str, Any] | None = None
    latency_scale: float = 1.0
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)


def _fits(target: Target, nbytes: int) -> bool:
    """Weights plus a working margin must fit in half the device's memory (the OS and app need the rest)."""
    return nbytes * 3 <= float(target.memory.get("size_gb", 1e9)) * 1e9 * 0.5


def plan_model(opts: BuildOptions, budgets: Budgets, out: str | Path, prune: PruneSearch | None = None,
               device: str | None = None) -> tuple[Plan, list[Candidate]]:
    """Build every candidate in scratch packages, judge them, write the chosen plan to `out`."""
    budgets.check()
    if prune is not None:
        prune.check()
    target = load_target(opts.target)
    dev = _device(device, target)
    model = CostModel.for_target(target)
    with tempfile.TemporaryDirectory(prefix="edgekit-plan-") as tmp:
        # strict: the round keeps every candidate, the rejected ones too (the table shows them)
        trial = dataclasses.replace(opts, out=str(Path(tmp) / "candidates"), backend=opts.backend or "all",
                                    precisions=opts.precisions or ["all"], force=True, plan=None, strict=True)
        trial.thresholds = dataclasses.replace(opts.thresholds, max_accuracy_drop=budgets.max_accuracy_drop)
        # The plan's budget in points is the task metric's too (accuracy, mAP50-95, mIoU)
        trial.task_settings = dataclasses.replace(opts.task_settings, max_metric_drop=budgets.max_accuracy_drop)
        # The rounds end when every candidate's ratio to its reference is settled (the time stays an upper bound):
        # a plan waits for the comparison, not for a fixed number of rounds.
        trial.profile = dataclasses.replace(opts.profile, stable_within=opts.profile.stable_within or STABLE_WITHIN)
        note("planner: building, verifying and timing every candidate")
        stages = CachedStages(trial)
        base = _base_round(trial, target, Path(tmp), stages)
        if target.is_host:  # each backend's FP32 build was timed here: the host's model fits them first
            model.add_points(manifest_points(base.manifest))
        rounds = [base]
        for ratio in (prune.ratios if prune else []):
            rounds.append(_pruned_round(trial, target, prune, ratio, base, Path(tmp), stages))  # type: ignore[arg-type]
        if dev is not None:
            for r in rounds:
                _measure_on_device(r, dev, opts)
        original_accuracy = _original_accuracy(base.manifest)
        candidates, sources = [], {}
        for r in rounds:
            for c in _candidates(r, target, model, budgets, original_accuracy):
                candidates.append(c)
                sources[c.key] = (r, _plain_key(c.key))
        _playoff(candidates, sources, opts, base)
    ok = [c for c in candidates if c.verdict == "ok"]
    if not ok:
        raise BadInput("no candidate meets the budgets: " + "; ".join(f"{c.key}: {c.reason}" for c in candidates))
    chosen, why = choose(ok, target, budgets.objective)
    chosen.reason = why
    # On the host the FP32 builds calibrated the model: its error is judged on the other candidates only.
    measured = [c for c in candidates if c.measured_ms and not (target.is_host and c.precision == "fp32")]
    mape = (sum(abs(c.estimated_ms - c.measured_ms) / c.measured_ms for c in measured) / len(measured) * 100
            if measured else None)
    owner = next(r for r in rounds if any(_key(r, k) == chosen.key for k in r.plans))
    ap = owner.plans[_plain_key(chosen.key)]
    ap.reasons = [*ap.reasons, why]
    reasons = [*base.manifest["plan_reasons"], *_prune_reasons(owner), why]
    plan = Plan(target=target.name, model_sha256=base.spec.sha256, artifacts=[ap], reasons=reasons,
                budgets=asdict(budgets) | ({"prune": asdict(prune)} if prune else {}),
                candidates=[asdict(c) | {"chosen": c is chosen} for c in candidates],
                cost_model={"mape_percent": round(mape, 1) if mape is not None else None,
                            "compared": len(measured),
                            "note": "roofline over each layer's MACs and bytes; error vs the measured p50 of "
                                    "each candidate measured on the target"
                                    + (" (on the host: each backend's FP32 build calibrates the model, so the "
                                       "error is over the FP16 and INT8 candidates)" if target.is_host else ""),
                            "fit": model.fit_report()},
                sensitivity=owner.sensitivity, compress=owner.compress, run=_run_record(rounds))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    return plan, candidates


def _run_record(rounds: list[_Round]) -> dict[str, Any] | None:
    """Where each round's candidates ran and what was retried (a cluster run); None when all ran here."""
    runs = [r.manifest["run"] for r in rounds if r.manifest.get("run")]
    if not runs:
        return None
    last = runs[-1]
    return {"cluster": last["cluster"], "nodes": last["nodes"], "measured_by": last["measured_by"],
            "rounds": [{"tasks": run["tasks"], "retried": run["retried"]} for run in runs]}


def choose(ok: list[Candidate], target: Target, objective: str) -> tuple[Candidate, str]:
    """The fastest (or smallest) candidate. On estimates alone, one that is not more than the tolerance
    slower wins if it runs on the target's preferred backend or is more faithful to the FP32 model:
    the estimate cannot tell them apart."""
    rank = {b: i for i, b in enumerate(target.backends)}  # ties go to the backend the target lists first
    if objective == "size":
        chosen = min(ok, key=lambda c: (c.bytes, c.latency_ms, rank.get(c.backend, 99)))
        return chosen, _why(chosen, ok, "smallest", "")
    fastest = min(ok, key=lambda c: (round(c.latency_ms, 6), rank.get(c.backend, 99), c.bytes))
    if fastest.measured_ms is not None:
        return fastest, _why(fastest, ok, "fastest", "")
    near = [c for c in ok if c.measured_ms is None
            and c.latency_ms <= fastest.latency_ms * (1 + ESTIMATE_TIE_TOLERANCE)]
    # Within the estimate's uncertainty the target's own backend (listed first: ncnn on a Pi, TensorRT on
    # a Jetson) goes first, then the candidate closest to the FP32 model.
    chosen = max(near, key=lambda c: (-rank.get(c.backend, 99), _fidelity(c), -c.latency_ms))
    extra = ""
    if chosen is not fastest:
        why = (f"the more faithful {chosen.precision} wins" if chosen.backend == fastest.backend
               else f"the target's preferred backend {chosen.backend} wins")
        extra = (f"; {fastest.key} is estimated {fastest.latency_ms:.3f} ms, within the cost model's "
                 f"{ESTIMATE_TIE_TOLERANCE:.0%} uncertainty, so {why}")
    return chosen, _why(chosen, ok, "fastest", extra)


def _fidelity(c: Candidate) -> tuple[float, ...]:
    """Closeness to the FP32 model: output cosine, then precision, then fewer pruned channels. Not
    accuracy: on a few hundred samples an INT8 model often scores a hair above FP32 by chance."""
    return (round(c.cosine, 4), PRECISION_FIDELITY.get(c.precision, 0), -c.prune_ratio)


def _why(chosen: Candidate, ok: list[Candidate], what: str, extra: str) -> str:
    basis = "measured" if chosen.measured_ms is not None else "estimated (no measurement possible here)"
    return (f"{chosen.key}: the {what} of {len(ok)} candidates meeting the budgets ({basis} p50 "
            f"{chosen.latency_ms:.3f} ms, {chosen.bytes:,} B"
            + (f", accuracy {chosen.accuracy:.2%}" if chosen.accuracy is not None else "") + f"){extra}")


# ---------------------------------------------------------------- rounds of candidates


def _evaluate(trial: BuildOptions, target: Target, folder: Path, stages: CachedStages) -> Evaluation:
    """One round of candidates evaluated in memory (the build's own candidate path), artifacts in `folder`."""
    folder.mkdir(parents=True)
    work = folder.with_name(folder.name + "-work")
    work.mkdir()
    return evaluate(trial, target, folder, folder, work, stages)


def _round(ev: Evaluation, spec: ModelSpec, folder: Path, **extra: Any) -> _Round:
    plans = {f"{ap.backend}-{ap.precision}": ap for ap in ev.plan.artifacts}
    return _Round(ev.manifest, plans, spec, folder, {a.key: a for a in ev.artifacts}, ev.data, ev, **extra)


def _base_round(trial: BuildOptions, target: Target, tmp: Path, stages: CachedStages) -> _Round:
    """Every candidate built, verified (an INT8 one that misses the thresholds recovered by the build's own
    ladder: retries, then the fewest sensitive layers in float) and timed in one evaluation."""
    folder = tmp / "candidates"
    ev = _evaluate(trial, target, folder, stages)
    return _round(ev, ev.spec, folder, sensitivity=ev.plan.sensitivity)


def _pruned_round(trial: BuildOptions, target: Target, prune: PruneSearch, ratio: float, base: _Round, tmp: Path,
                  stages: CachedStages) -> _Round:
    from edgekit.compress.stage import CompressOptions

    # One rounding for every precision of the candidates: the largest multiple the target asks for.
    round_to = max(target.channel_multiple.values()) if target.channel_multiple else None
    layer_ratios: dict[str, float] = {}
    if prune.by_sensitivity:
        from edgekit.compress.group_sensitivity import group_sensitivity, ratios_from_sensitivity
        from edgekit.pipeline.stages import task_guide

        guide = task_guide(base.spec, base.data.validation, trial.task_settings)  # mAP ranks a detector's groups
        groups = group_sensitivity(base.spec, base.data.validation, ratio, prune.importance, guide=guide)
        layer_ratios = ratios_from_sensitivity(groups, ratio)
    compress = CompressOptions(prune=ratio, importance=prune.importance, round_to=round_to,
                               layer_ratios=layer_ratios, distill=True, train=prune.train or trial.calib,
                               train_from_calibration=prune.train is None,
                               epochs=prune.epochs, time_budget_s=prune.time_budget_s, finetune_baseline=False,
                               augment=prune.augment)
    note(f"planner: pruning {ratio:.0%} of channels (per-group ratios by sensitivity), distilling, building")
    folder = tmp / f"pruned-{ratio}"
    ev = _evaluate(dataclasses.replace(trial, out=str(folder), compress=compress), target, folder, stages)
    m = ev.manifest
    # The original model was timed in this build's rounds too: scale onto the first build's rounds.
    original_here = m["compression"]["latency_before_ms"]["p50"]
    original_base = base.manifest["reference"]["latency_ms"]["p50"]
    scale = original_base / original_here if original_here else 1.0
    return _round(ev, base.spec, folder, prune_ratio=ratio, compress=asdict(compress), latency_scale=scale)


def _playoff(candidates: list[Candidate], sources: dict[str, tuple[_Round, str]], opts: BuildOptions,
             base: _Round) -> None:
    """The candidates measured here within PLAYOFF_MARGIN of the fastest are timed again, longer, in one
    interleaved run of their own: a fast model's ranking from the short first rounds is mostly noise."""
    from edgekit.profiling.measurer import LocalMeasurer
    from edgekit.profiling.timing import ProfileSettings

    here = [c for c in candidates if c.verdict == "ok" and c.measured_ms is not None and c.where.startswith("local:")]
    if len(here) < 2:
        return
    best = min(c.latency_ms for c in here)
    finalists = [c for c in here if c.latency_ms <= best * (1 + PLAYOFF_MARGIN)]
    if len(finalists) < 2:
        return
    arts, threads = {}, 1
    for c in finalists:
        r, key = sources[c.key]
        record = next(a for a in r.manifest["artifacts"] if a["key"] == key)
        arts[c.key] = r.artifacts[key]
        threads = max(threads, int((record.get("latency_ms") or {}).get("threads") or 1))
    feeds = base.data.validation.batches(base.spec)[0]  # what the rounds were timed on
    settings = ProfileSettings(seconds=max(2 * opts.profile.seconds, 3.0), min_runs=max(opts.profile.min_runs, 200),
                               stable_within=opts.profile.stable_within or STABLE_WITHIN / 2)
    note(f"planner: {len(finalists)} candidates within {PLAYOFF_MARGIN:.0%} of the fastest: timing them again, "
         f"longer, side by side")
    latencies = LocalMeasurer(threads).measure(arts, feeds, settings)
    # The others stay comparable: scaled by how much the finalists' times moved between the two runs.
    drift = float(np.median([latencies[c.key].p50 / c.latency_ms for c in finalists]))
    final_keys = {c.key for c in finalists}
    for c in here:
        if c.key in final_keys:
            c.measured_ms, c.where = latencies[c.key].p50, latencies[c.key].where
            c.reason = f"re-timed with the other finalists ({latencies[c.key].runs} interleaved runs)"
        elif c.measured_ms is not None:
            c.measured_ms = round(c.measured_ms * drift, 4)


def _measure_on_device(r: _Round, device: Any, opts: BuildOptions) -> None:
    """Time the round's candidates on the device; its latencies become the measurements (latency_ms,
    where: ssh://...). The device runner reads a package, so the round is written as one first."""
    from edgekit.packaging.model import Package
    from edgekit.pipeline.assemble import write_package
    from edgekit.profiling.measurer import DeviceMeasurer
    from edgekit.profiling.timing import ProfileSettings

    note(f"planner: measuring {len(r.manifest['artifacts'])} candidates on {device.name}")
    write_package(r.path, r.manifest, r.evaluation.plan, r.evaluation.preprocess)
    measurer = DeviceMeasurer(device, r.path)
    measurer.measure({a["key"]: r.artifacts[a["key"]] for a in r.manifest["artifacts"]}, {},
                     ProfileSettings(seconds=opts.profile.seconds, min_runs=opts.profile.min_runs))
    # the device's whole records (where: ssh://..., conditions), as the package's manifest now holds them
    r.manifest = Package(r.path, r.manifest).with_device_latencies(measurer.records).to_dict()


def _device(name: str | None, target: Target) -> Any:
    if name is None:
        return None
    from edgekit.profiling.devices import get_device

    dev = get_device(name)
    if dev.target != target.name:
        raise BadInput(f"device {name} is a {dev.target}, not a {target.name}")
    return dev


def _key(r: _Round, plain: str) -> str:
    return f"prune{round(r.prune_ratio * 100)}-{plain}" if r.prune_ratio else plain


def _plain_key(key: str) -> str:
    return key.split("-", 1)[1] if key.startswith("prune") else key


def _prune_reasons(r: _Round) -> list[str]:
    if not r.compress:
        return []
    c = r.manifest.get("compression") or {}
    return [f"pruned {r.prune_ratio:.0%} of channels (per-group ratios from measured sensitivity, channels rounded "
            f"to {r.compress.get('round_to')}), distilled from the original: MACs x{c.get('macs_ratio', 1):.2f}, "
            f"accuracy change {-c.get('accuracy_drop_points', 0):+.2f} points"]


def _original_accuracy(manifest: dict[str, Any]) -> float | None:
    return next((a["verification"].get("reference_accuracy") for a in manifest["artifacts"]
                 if a["verification"].get("reference_accuracy") is not None), None)


def _candidates(r: _Round, target: Target, model: CostModel, budgets: Budgets,
                original_accuracy: float | None) -> list[Candidate]:
    out = []
    compression = r.manifest.get("compression") or {}
    compressed_ok = compression.get("passed", True)
    ct = compression.get("task")  # the pruned FP32 model judged against the original
    macs = int(compression.get("macs_after") or r.manifest["source"]["macs"])
    # The layers of the model this round built (pruned or not), as the package recorded them.
    features = [LayerFeatures(la["op_type"], la["macs"], la["params"], math.prod(max(d, 1) for d in la["output_shape"]))
                for la in r.manifest["layers"]]
    for a in r.manifest["artifacts"]:
        lat = a.get("latency_ms") or {}
        arithmetic = (backends.get(a["backend"]).arithmetic_precision(a["precision"], a.get("details") or {})
                      if a["backend"] in backends.names() else None)
        est = model.estimate_ms(features, a["precision"], a["backend"], arithmetic=arithmetic)
        where = str(lat.get("where", "estimate"))
        # A measurement counts for the target only when taken on it: this host for host-cpu, or the device.
        on_target = where.startswith("ssh://") or (target.is_host and where.startswith("local:"))
        measured = lat.get("p50") * (r.latency_scale if where.startswith("local:") else 1.0) if on_target else None
        v = a["verification"]
        q = r.plans[a["key"]].quantization
        c = Candidate(_key(r, a["key"]), a["backend"], a["precision"], len(q.exclude_nodes) if q else 0,
                      round(est, 4), round(measured, 4) if measured is not None else None, where, a["bytes"],
                      v.get("accuracy"), v["cosine_min"], "ok", "", r.prune_ratio, macs)
        total_drop = None  # a pruned candidate's task-metric loss against the original: pruning and quantization
        if t := v.get("task"):
            if ct and t.get("vs") == ct.get("vs") == "labels":  # one scale: both against the labels
                total_drop = ct["reference"] - t["value"]
            elif ct:  # against each one's FP32: the two losses add up (at most)
                total_drop = ct["drop_points"] + t["drop_points"]
            shown = t["drop_points"] if total_drop is None else total_drop
            c.task = f"{t['metric']} {t['value']:.2f} ({-shown:+.2f}" + (" vs the original)" if ct else ")")
        drop = (original_accuracy - c.accuracy) * 100 if original_accuracy is not None and c.accuracy is not None \
            else total_drop
        if not v["passed"]:
            c.verdict, c.reason = "rejected", "; ".join(v["failures"])
        elif not compressed_ok:
            c.verdict, c.reason = "rejected", (f"pruning lost {compression.get('accuracy_drop_points', 0):.2f} points "
                                               f"of {compression.get('metric', 'accuracy')}, more than the budget")
        elif drop is not None and drop > budgets.max_accuracy_drop + 1e-9:
            what = t["metric"] if total_drop is not None and (t := v.get("task")) else "accuracy"
            c.verdict, c.reason = "over budget", f"{what} {drop:.2f} points below the original"
        elif not _fits(target, c.bytes):
            c.verdict, c.reason = "does not fit", f"{c.bytes / 1e6:.1f} MB x3 > half of {target.memory['size_gb']} GB"
        elif budgets.max_latency_ms is not None and c.latency_ms > budgets.max_latency_ms:
            c.verdict, c.reason = "over budget", f"{c.latency_ms:.3f} ms > {budgets.max_latency_ms} ms"
        elif budgets.max_size_mb is not None and c.bytes / 1e6 > budgets.max_size_mb:
            c.verdict, c.reason = "over budget", f"{c.bytes / 1e6:.2f} MB > {budgets.max_size_mb} MB"
        out.append(c)
    return out


def candidate_rows(candidates: list[Candidate]) -> list[dict[str, Any]]:
    return [{
        "candidate": c.key, "pruned": f"{c.prune_ratio:.0%}" if c.prune_ratio else "–",
        "float nodes": str(c.float_nodes), "est. ms": f"{c.estimated_ms:.3f}",
        "measured ms": f"{c.measured_ms:.3f}" if c.measured_ms is not None else "–", "bytes": f"{c.bytes:,}",
        "accuracy": f"{c.accuracy:.2%}" if c.accuracy is not None else "–",
        **({"task": c.task or "–"} if any(x.task for x in candidates) else {}), "cosine": f"{c.cosine:.5f}",
        "verdict": c.verdict, "reason": c.reason,
    } for c in candidates]
