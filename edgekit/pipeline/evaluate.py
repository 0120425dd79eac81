"""One evaluation: ingest -> select -> data -> compress -> candidates (export -> verify -> recover) ->
time side by side -> the manifest in memory. `build` writes it as a package; the planner evaluates its
rounds of candidates through here and reads the typed results, never a file it wrote.

Every check that can fail on bad input runs before the first expensive step (calibration).
Every artifact, of every backend, is verified against the FP32 canonical ONNX run by ONNX Runtime,
and timed in one interleaved run with its own backend's FP32 model and with ONNX Runtime's.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import backends
from edgekit.backends import REFERENCE_BACKEND
from edgekit.backends.base import Artifact, Backend
from edgekit.compress.stage import CompressOptions
from edgekit.console import note
from edgekit.data import DataSplit, Preprocess, prepare_data
from edgekit.errors import BadInput, EdgekitError
from edgekit.ingest import ModelSpec, parse_input_shapes
from edgekit.pipeline.assemble import assemble_manifest, layer_rows, record_compression, task_record
from edgekit.pipeline.candidates import CandidateContext, CandidateResult, Verifier, public_error
from edgekit.pipeline.executor import executor_for
from edgekit.pipeline.isa_check import EMULATE_MODES, IsaCheck
from edgekit.pipeline.options import RECOVER_MODES, BuildOptions
from edgekit.pipeline.stages import CachedStages, compress_model
from edgekit.planning.select import check_ops, default_plan, load_plan, resolve_backends, resolve_precisions
from edgekit.planning.types import ArtifactPlan, Plan
from edgekit.profiling.costmodel import estimate_latency
from edgekit.profiling.timing import Latency
from edgekit.targets import Target, detect_host
from edgekit.tasks.base import TaskResult


@dataclass
class Evaluation:
    """A build's results in memory: what the package will hold, before anything is written."""

    manifest: dict[str, Any]  # as manifest.json will hold it (the JSON edge)
    plan: Plan  # the artifacts kept, with the settings that passed
    spec: ModelSpec  # the model the artifacts were built from (the compressed one when compressing)
    original: ModelSpec | None  # the model before compression
    data: DataSplit
    preprocess: Preprocess | None
    artifacts: list[Artifact] = field(default_factory=list)
    latencies: dict[str, Latency] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.manifest["passed"])


@dataclass
class _Selection:
    """What to build, before the model is read: from a given plan, or from the target's rules."""

    chosen: list[Backend]
    precisions: dict[str, list[str]]
    given_plan: Plan | None
    reasons: list[str]


def evaluate(opts: BuildOptions, target: Target, root: Path, shown_root: Path, work: Path,
             stages: CachedStages | None = None) -> Evaluation:
    """Build, verify and time every artifact `opts` asks for into `root` (errors name it `shown_root`)."""
    preprocess = Preprocess.from_file(opts.preprocess) if opts.preprocess else None
    sel = _select(opts, target)
    threads = opts.threads or (target.cpu["cores"] if target.is_host else detect_host()["cpu"]["cores"])
    # --backend all / --precision all: every artifact the target can have, verified; the package ships those
    # that pass (exit 0 when one does) and lists the rest. An explicit list is all-or-nothing, as --strict.
    best_effort = sel.given_plan is None and not opts.strict and (opts.backend == "all"
                                                                   or opts.precisions == ["all"])
    # INT8 that misses the thresholds is retried before it is rejected; a given plan is applied as written.
    recover = opts.recover != "none" and sel.given_plan is None
    if opts.recover not in RECOVER_MODES:
        raise BadInput(f"--recover {opts.recover}: use {' or '.join(RECOVER_MODES)}")
    if opts.emulate not in EMULATE_MODES or opts.emulate_samples < 1:
        raise BadInput(f"--emulate {opts.emulate} --emulate-samples {opts.emulate_samples}: use "
                       f"{', '.join(EMULATE_MODES)} and at least 1 sample")
    stages = stages or CachedStages(opts)
    note(f"ingest {opts.model}")
    spec = stages.ingest(opts.model, work, parse_input_shapes(opts.input_shapes), opts.weights)
    for n in spec.notes:
        note(n)
    explicit = bool(opts.backend) and opts.backend != "all"
    sel.chosen = check_ops(spec, sel.chosen, explicit, sel.reasons)
    data = prepare_data(spec, opts.calib, opts.val, preprocess, opts.calib_samples, opts.val_samples,
                        task=opts.task_settings.task)
    note(data.note)
    if sel.given_plan is not None and sel.given_plan.model_sha256 != spec.sha256:
        raise BadInput(f"plan {opts.plan} was made for another model (sha256 {sel.given_plan.model_sha256[:12]}, "
                       f"this one is {spec.sha256[:12]}): run `edgekit plan` for this model")
    original, compression = None, None
    wanted = opts.compress
    if wanted is None and sel.given_plan is not None and sel.given_plan.compress:
        wanted = CompressOptions(**sel.given_plan.compress)
        wanted.train = opts.train or wanted.train
        sel.reasons.append("the plan prunes and distills the model first (its compress settings)")
    if wanted is not None and (wanted.prune or wanted.distill or wanted.low_rank_energy):
        original = spec
        spec, compression = compress_model(spec, target, wanted, preprocess, data, work, stages, opts.task_settings)
    plan = _artifact_plans(opts, target, spec, data, sel)

    several = len(plan.artifacts) > 1
    failed: list[dict[str, Any]] = []
    references = _references(spec, target, data, plan, sel, stages, work, several, best_effort, failed,
                             (root, shown_root))
    verifier = Verifier(spec, references[REFERENCE_BACKEND], data, opts.thresholds, threads, stages,
                        opts.task_settings)
    verifier.isa = IsaCheck.for_target(target, sel.chosen, opts.emulate, opts.emulate_samples)
    original_fp32, compression_task = None, None
    if original is not None:
        original_fp32 = stages.export(original, ArtifactPlan(REFERENCE_BACKEND, "fp32"), data, work / "original-fp32")
        # Judged whatever the compressed model scores: a pruned detector that finds nothing leaves its own
        # artifacts no task metric to fail on (their reference is that model), so only this check can see it.
        compression_task = _compression_task(original, original_fp32, references[REFERENCE_BACKEND], data, opts,
                                             threads, stages)
    ctx = CandidateContext(spec, data, verifier, root, shown_root, work, threads, opts.thresholds, recover,
                           tolerant=several, best_effort=best_effort, plan=plan,
                           recover_budget_s=opts.recover_budget, train=opts.train, qat_epochs=opts.qat_epochs)
    executor = executor_for(opts.cluster)
    kept = _shipped(executor.map(ctx, plan.artifacts), best_effort, failed)
    artifacts = [r.artifact for r in kept if r.artifact is not None]
    verifications = {r.artifact.key: r.verification for r in kept if r.artifact is not None and r.verification}
    plan.artifacts = [r.plan for r in kept]
    plan.reasons += [f"{f['key']} was not built: {f['error']}" if f["stage"] == "export"
                     else f"{f['key']} left out: {f['error']}" for f in failed]

    # Measured where the backend runs here; otherwise the cost model's estimate, marked as one.
    timed = {f"reference:{k}": a for k, a in references.items()} | {a.key: a for a in artifacts}
    if original_fp32 is not None:  # the uncompressed model, timed in the same rounds: the pruning speedup
        timed["original:fp32"] = original_fp32
    feeds = data.validation.batches(spec)[0]
    latencies, estimated = _latencies(timed, spec, target, feeds, opts, threads, stages)
    memory = {a.key: stages.memory(a, threads, feeds) if opts.memory and a.key not in estimated else None
              for a in artifacts}
    manifest = assemble_manifest(opts, target, spec, preprocess, data, plan, sel.chosen, artifacts, verifications,
                                 latencies, memory, verifier.warnings)
    manifest["data"]["task"] = task_record(verifier)
    if (run := executor.record()) is not None:
        manifest["run"] = run
    manifest["layers"] = layer_rows(spec, target, artifacts, plan, references[REFERENCE_BACKEND], data, threads,
                                    stages)
    if plan.candidates:
        manifest["candidates"] = plan.candidates
        manifest["cost_model"] = plan.cost_model
    if compression is not None:
        record_compression(manifest, compression, original, spec, latencies, opts.thresholds, compression_task)
    if failed:
        manifest["failed_artifacts"] = failed
        manifest["passed"] = manifest["passed"] and best_effort
    manifest["cache"] = {"enabled": stages.cache.enabled, "reused": list(dict.fromkeys(stages.cache.reused)),
                         "dir": str(stages.cache.root)}
    return Evaluation(manifest, plan, spec, original, data, preprocess, artifacts, latencies)


def _select(opts: BuildOptions, target: Target) -> _Selection:
    reasons: list[str] = []
    given_plan = load_plan(opts.plan, target) if opts.plan else None
    if given_plan is not None:
        names = list(dict.fromkeys(ap.backend for ap in given_plan.artifacts))
        chosen = [backends.get_installed(n) for n in names]
        precisions = {n: [ap.precision for ap in given_plan.artifacts if ap.backend == n] for n in names}
        if any(p == "int8" for ps in precisions.values() for p in ps) and not opts.calib:
            raise BadInput("the plan has an INT8 artifact: pass --calib DIR|FILE.npz")
        return _Selection(chosen, precisions, given_plan, [f"plan {opts.plan} applied as written",
                                                           *given_plan.reasons])
    chosen = resolve_backends(target, opts.backend, reasons)
    several = len(chosen) > 1
    precisions = {b.name: resolve_precisions(target, b, opts.precisions, bool(opts.calib), reasons, several)
                  for b in chosen}
    chosen = [b for b in chosen if precisions[b.name]]
    if not chosen:
        raise BadInput(f"none of the backends builds {', '.join(opts.precisions or [])}")
    return _Selection(chosen, precisions, None, reasons)


def _artifact_plans(opts: BuildOptions, target: Target, spec: ModelSpec, data: DataSplit,
                    sel: _Selection) -> Plan:
    """The given plan as written, or the target's default plan for each chosen backend."""
    plan = Plan(target=target.name, model_sha256=spec.sha256, artifacts=[], reasons=sel.reasons)
    given = sel.given_plan
    if given is not None:
        plan.model_sha256, plan.compress = given.model_sha256, given.compress
        plan.artifacts = [dataclasses.replace(ap, options=dict(ap.options)) for ap in given.artifacts]
        plan.budgets, plan.candidates, plan.cost_model, plan.sensitivity = (
            given.budgets, given.candidates, given.cost_model, given.sensitivity)
    for b in sel.chosen if given is None else []:
        # The samples the calibration really has (fewer than asked when the folder is small).
        samples = min(opts.calib_samples, len(data.calibration)) if data.calibration else opts.calib_samples
        sub = default_plan(spec, target, b.name, sel.precisions[b.name], opts.calib_method, samples,
                           opts.exclude_nodes, _backend_requests(opts, b))
        plan.artifacts += sub.artifacts
    for ap in plan.artifacts:
        ap.options.setdefault("max_accuracy_drop", opts.thresholds.max_accuracy_drop)
    return plan


def _backend_requests(opts: BuildOptions, backend: Backend) -> dict[str, Any]:
    """The backend's own options the user set through BuildOptions (e.g. TensorRT's dla_core), passed through
    untouched; which they are is the backend's business (Backend.default_options)."""
    return {**{k: getattr(opts, k) for k in backend.default_options() if hasattr(opts, k)},
            "detector_head": opts.detector_head}


def _references(spec: ModelSpec, target: Target, data: DataSplit, plan: Plan, sel: _Selection,
                stages: CachedStages, work: Path, several: bool, best_effort: bool, failed: list[dict[str, Any]],
                roots: tuple[Path, Path]) -> dict[str, Artifact]:
    """FP32 on ONNX Runtime (the verification yardstick) and on each chosen backend (its speedup base; FP16 on an NPU
    without FP32: Backend.reference_precision). A
    backend that cannot convert the model loses its artifacts (recorded in `failed`), not the build."""
    references: dict[str, Artifact] = {}
    for name in [REFERENCE_BACKEND, *[c.name for c in sel.chosen if c.name != REFERENCE_BACKEND]]:
        try:
            backend = backends.get(name)
            references[name] = stages.export(spec, ArtifactPlan(name, backend.reference_precision,
                                                                options=backend.plan_options(target)),
                                             data, work / f"ref-{name}")
        except EdgekitError as e:
            if name == REFERENCE_BACKEND or not several or (isinstance(e, BadInput) and not best_effort):
                raise
            why = public_error(e, *roots)
            failed += [{"key": f"{ap.backend}-{ap.precision}", "stage": "export", "error": why}
                       for ap in plan.artifacts if ap.backend == name]
            plan.artifacts = [ap for ap in plan.artifacts if ap.backend != name]
            sel.chosen = [c for c in sel.chosen if c.name != name]
            note(f"export {name} FAILED: {why}")
    return references


def _shipped(results: list[CandidateResult], best_effort: bool, failed: list[dict[str, Any]]
             ) -> list[CandidateResult]:
    """The candidates the package keeps. "all" = everything this target can do, verified: when one passed,
    the package ships what passed and lists each rejected one with its reason (its per-layer diagnosis stays
    in debug/); otherwise every built one stays, so the rejected package shows them."""
    failed += [r.failure for r in results if r.failure is not None]
    kept = [r for r in results if r.artifact is not None and r.verification is not None]
    if not (best_effort and any(r.verification.passed for r in kept if r.verification is not None)):
        return kept
    for r in [r for r in kept if r.verification is not None and not r.verification.passed]:
        assert r.artifact is not None and r.verification is not None
        shutil.rmtree(r.artifact.root, ignore_errors=True)
        failed.append({"key": r.artifact.key, "stage": "verification", "error": "; ".join(r.verification.failures),
                       "verification": r.verification.to_dict()})
        kept.remove(r)
    return kept


def _compression_task(original: ModelSpec, original_fp32: Artifact, compressed_fp32: Artifact, data: DataSplit,
                      opts: BuildOptions, threads: int, stages: CachedStages) -> TaskResult | None:
    """The compressed FP32 model judged as an artifact of the original: the task metric (mAP50-95, mIoU, accuracy)
    of its outputs against the original's on the validation data (or the labels). Its INT8 artifacts are verified
    against the compressed model, so this is the one place where what pruning lost is measured by the task's own
    figure: a classifier's top-1 agreement, taken on a detector's [4+nc, N] rows, says nothing about its boxes."""
    note("task: the compressed FP32 model against the original's")
    judge = Verifier(original, original_fp32, data, opts.thresholds, threads, stages, opts.task_settings)
    if judge.task is None:
        return None
    outputs = stages.outputs(compressed_fp32, judge.batches, threads)
    task = judge.judge(outputs, "fp32").task
    if task is not None:
        note(f"compression, judged against the original: {task.summary()}"
             + ("" if task.passed else " -> more than the budget"))
    return task


def _latencies(timed: dict[str, Artifact], spec: ModelSpec, target: Target, feeds: dict[str, Any],
               opts: BuildOptions, threads: int, stages: CachedStages) -> tuple[dict[str, Latency], set[str]]:
    """Every candidate timed side by side here where its backend runs here; a cost-model estimate (marked
    as one, with a note on the artifact) where it cannot. Returns the latencies and the estimated keys."""
    estimated = {k for k, a in timed.items() if backends.get(a.backend).measure_here() is not None}
    latencies = stages.timing({k: a for k, a in timed.items() if k not in estimated}, feeds, opts.profile, threads)
    for k in estimated:
        a = timed[k]
        latencies[k] = estimate_latency(spec, target, a.precision, backend=a.backend,
                                        arithmetic=backends.get(a.backend).arithmetic_precision(a.precision, a.details))
        if not k.startswith(("reference:", "original:")):
            a.notes.append(f"latency is a cost-model estimate for {target.name} "
                           f"({backends.get(a.backend).measure_here()}); measure it on the device with "
                           "`edgekit profile PACKAGE --device NAME`")
    return latencies, estimated
