"""Candidates: one function takes an ArtifactPlan through export -> verify -> recover (the INT8 ladder)
-> localise (a rejected artifact's first diverging layer) and returns a typed CandidateResult. `build`
and the planner both evaluate their candidates through here; timing is done for all of them together
(side by side, interleaved) by the caller."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.console import note, progress
from edgekit.data import Dataset, DataSplit
from edgekit.errors import BadInput, EdgekitError
from edgekit.ingest import ModelSpec
from edgekit.packaging.manifest import write_json
from edgekit.pipeline.isa_check import IsaCheck
from edgekit.pipeline.recovery import RECOVERY_STEPS, Rejected, Step, recover_int8
from edgekit.pipeline.stages import CachedStages
from edgekit.planning.types import ArtifactPlan, Plan
from edgekit.tasks.evaluator import TaskSettings, resolve_task
from edgekit.verify.metrics import describe_slice
from edgekit.verify.verifier import Thresholds, Verification, apply_task, verify_outputs


@dataclass
class CandidateResult:
    """One artifact plan, evaluated: the artifact and its verdict, or the stage where it failed and why."""

    plan: ArtifactPlan
    artifact: Artifact | None = None
    verification: Verification | None = None
    failure: dict[str, Any] | None = None  # {"key", "stage": export|verification, "error"}

    @property
    def key(self) -> str:
        return f"{self.plan.backend}-{self.plan.precision}"


@dataclass
class CandidateContext:
    """What every candidate of one build shares."""

    spec: ModelSpec
    data: DataSplit
    verifier: Verifier
    root: Path  # the package folder the artifacts are written to
    shown_root: Path  # what errors call that folder (the package's final path, not the staging one)
    work: Path  # scratch
    threads: int
    thresholds: Thresholds
    recover: bool  # INT8 that misses the thresholds goes through the recovery ladder
    tolerant: bool  # one failing artifact is recorded, not raised (several artifacts)
    best_effort: bool  # BadInput of one artifact is recorded too (--backend all / --precision all)
    plan: Plan | None = None
    notes: list[str] = field(default_factory=list)
    recover_budget_s: float = 900.0  # seconds the recovery ladder may spend on one artifact
    train: str | None = None  # --train: data for the ladder's quantization-aware training
    qat_epochs: int = 3


def evaluate_candidate(ctx: CandidateContext, ap: ArtifactPlan) -> CandidateResult:
    """Export, verify, recover and (when still rejected) localise one artifact plan."""
    result = CandidateResult(ap)
    folder = ctx.root / result.key
    start = time.monotonic()
    try:
        art = ctx.verifier.stages.export(ctx.spec, ap, ctx.data, folder)
    except EdgekitError as e:  # one converter failing must not lose the others: recorded
        return _failed(ctx, result, folder, "export", e)
    try:
        v = ctx.verifier.check(art)
        if not v.passed and ap.precision == "int8" and ctx.recover:
            rejected = Rejected(ctx.spec, ap, art, v, ctx.data, ctx.root, ctx.work, ctx.verifier, ctx.plan,
                                budget_s=ctx.recover_budget_s, train=ctx.train, qat_epochs=ctx.qat_epochs,
                                first_seconds=time.monotonic() - start)
            art, v = recover_int8(rejected, recovery_ladder())
    except Exception as e:  # a runtime that cannot load or run it: that artifact fails, not the build
        return _failed(ctx, result, folder, "verification", e)
    if not v.passed:
        localise_into(ctx.spec, art, v, ctx.data, ctx.root, ctx.threads, ctx.thresholds)
    result.artifact, result.verification = art, v
    return result


def recovery_ladder() -> tuple[Step, ...]:
    """recovery.RECOVERY_STEPS, then quantization-aware training where edgekit.pipeline.qat_rung is installed
    (it imports recovery for Attempt, so the rung is added here, not there: no import cycle)."""
    if importlib.util.find_spec("edgekit.pipeline.qat_rung") is None:
        return RECOVERY_STEPS
    try:
        from edgekit.pipeline.qat_rung import qat_rung
    except ImportError as e:  # its own dependencies missing: the PTQ rungs still run
        note(f"the QAT recovery rung is unavailable: {e}")
        return RECOVERY_STEPS
    return (*RECOVERY_STEPS, qat_rung)


def _failed(ctx: CandidateContext, result: CandidateResult, folder: Path, stage: str,
            e: Exception) -> CandidateResult:
    """Record one artifact's failure (its folder removed) where several are built; raise it otherwise, and
    raise bad input unless the build is best-effort (--backend all / --precision all)."""
    if not ctx.tolerant or (isinstance(e, BadInput) and not ctx.best_effort):
        raise e
    shutil.rmtree(folder, ignore_errors=True)
    why = public_error(e, ctx.root, ctx.shown_root)
    result.failure = {"key": result.key, "stage": stage, "error": why}
    note(f"{'export' if stage == 'export' else 'verify'} {result.plan.backend} {result.plan.precision} FAILED: {why}")
    return result


def public_error(e: BaseException, staging: Path, out: Path) -> str:
    """An error of one artifact as the user reads it: one line, naming the package path, not the staging."""
    text = " ".join(str(e).split())
    text = text if isinstance(e, EdgekitError) else f"{type(e).__name__}: {text}"
    return text.replace(str(staging), str(out))


def localise_into(spec: ModelSpec, art: Artifact, v: Verification, data: DataSplit, root: Path, threads: int,
                   threshold: Thresholds) -> None:
    """A rejected artifact gets the first diverging layer named, and the per-layer table written."""
    from edgekit.verify.localise import localise

    try:
        session = backends.get(art.backend).load(art, threads)
        loc = localise(spec, art, session, data.validation.batches(spec)[0], threshold)
    except Exception as e:  # the diagnosis must never hide the verdict it explains
        v.failures.append(f"(layer localisation failed: {type(e).__name__}: {e})")
        return
    (root / "debug").mkdir(exist_ok=True)
    write_json(root / "debug" / f"{art.key}.json", loc.to_dict())
    v.diverging_layer = loc.first_divergence
    note(loc.summary())


class Verifier:
    """Reference outputs computed once; each artifact compared with them on the validation samples."""

    def __init__(self, spec: ModelSpec, reference: Artifact, data: DataSplit, thresholds: Thresholds,
                 threads: int, stages: CachedStages, task: TaskSettings | None = None) -> None:
        self.stages, self.spec, self.reference_artifact = stages, spec, reference
        self.validation = data.validation
        self.batches = data.validation.batches(spec)
        if not self.batches:
            raise BadInput(f"validation data has fewer samples than the model's batch {spec.inputs[0].shape[0]}")
        self.labels = data.validation.batch_labels(spec)
        self.names = [o.name for o in spec.outputs]
        self.thresholds, self.threads = thresholds, threads
        self.task_settings = task or TaskSettings()
        self.reference = stages.outputs(reference, self.batches, threads)
        self.isa: IsaCheck | None = None  # the target's own arithmetic (emulated), checked after the host's
        self.task, self.task_notes = resolve_task(spec, data.validation, self.task_settings, self.reference)
        self.warnings = self._sanity() + ([] if self.task_settings.task == "detect" else self._detector_note(spec))
        for w in self.warnings:
            note(f"[yellow]warning[/yellow]: {w}")
        for n in self.task_notes:
            note(f"task: {n}")
        if self.task is not None and self.task.reference is not None:
            r = self.task.reference
            note(f"task {self.task.task}: FP32 {self.task.metric} {r.value:.2f}"
                 + (f", mAP50 {r.map50:.2f}" if r.map50 is not None else "") + f" (vs {self.task.vs})")

    def judge(self, outputs: list[np.ndarray], precision: str | None) -> Verification:
        """The verdict of outputs computed on `self.batches`: tensor figures, then the task metric deciding."""
        v = verify_outputs(self.reference, outputs, self.names, self.labels, self.thresholds, precision)
        if self.task is not None:
            samples = len(self.reference[0])
            result = self.task.result(outputs, self.reference, self.task_settings.max_metric_drop, samples)
            if self.task.task == "classify" and self.task.vs == "fp32":
                # A classifier without labels: agreeing with FP32's top-1 on the samples says little about logits
                # that are otherwise wrong (a broken INT8 at mean-centred cosine 0.08 agreed on 12 of 12), and is
                # judged already (--min-top1-agreement): recorded, the tensor figures decide. With labels,
                # accuracy is the user's own figure and decides.
                v.task = result
            else:
                apply_task(v, result, self.task_settings.strict_tensors)
        return v

    def subset(self, samples: int) -> Verifier:
        """This verifier on the first `samples` validation samples (whole batches): the bounded sample an emulated
        run computes. The task metric is resolved again on those samples (labels or FP32's predictions)."""
        b = max(1, self.spec.inputs[0].shape[0])
        n_batches = max(1, min(len(self.batches), -(-samples // b)))
        n = n_batches * b
        sub = copy.copy(self)
        sub.batches = self.batches[:n_batches]
        sub.labels = None if self.labels is None else self.labels[:n]
        sub.reference = [r[:n] for r in self.reference]
        ds = self.validation
        sub.validation = dataclasses.replace(ds, inputs={k: v[:n] for k, v in ds.inputs.items()},
                                             labels=None if ds.labels is None else ds.labels[:n],
                                             files=None if ds.files is None else ds.files[:n])
        sub.isa = None
        if self.task is not None:
            budget = self.task_settings.max_metric_drop
            if self.task.task == "classify":  # accuracy on n samples moves in steps of 100/n points: one step allowed
                budget = max(budget, 100.0 / n)
            settings = dataclasses.replace(self.task_settings, task=self.task.task, max_metric_drop=budget)
            sub.task_settings = settings
            sub.task, _ = resolve_task(self.spec, sub.validation, settings, sub.reference)
        return sub

    def task_metric(self, dataset: Dataset) -> Callable[[list[np.ndarray]], float] | None:
        """The task metric (points) of a model's outputs over `dataset` (its labels, or the FP32 model's predictions
        on it), for a quantizer's own accuracy loop; None without a task metric."""
        if self.task is None:
            return None
        batches = dataset.batches(self.spec)
        reference = self.stages.outputs(self.reference_artifact, batches, self.threads)
        ev, _ = resolve_task(self.spec, dataset, dataclasses.replace(self.task_settings, task=self.task.task),
                             reference)
        if ev is None:
            return None
        return lambda outputs: ev.score(outputs).value

    @staticmethod
    def _detector_note(spec: ModelSpec) -> list[str]:
        """Until a detection metric exists (--task detect), a detector-like model is told, in the console and
        the manifest's data.warnings, that tensor figures only stand in for mAP."""
        from edgekit.quantize.detection_head import WEAK_PROXY_NOTE, looks_like_detector

        reason = looks_like_detector(spec)
        return [WEAK_PROXY_NOTE.format(reason=reason)] if reason else []

    def _sanity(self) -> list[str]:
        """A labelled classifier that scores near chance in FP32 almost always means data that does not match
        the model (a missing --preprocess, another class order): every verdict after that is moot. A reference
        that is the same for every sample (an untrained model, identical samples) makes every figure moot."""
        from edgekit.verify.metrics import is_constant

        if self.reference and len(self.reference[0]) > 1 and all(is_constant(r) for r in self.reference):
            return ["the FP32 model gives the same output for every validation sample: the model (untrained? a "
                    "constant head?) or the data (identical samples?) is degenerate; no artifact can be verified "
                    "on it, so every one is rejected"]
        out = self.reference[0] if self.reference else None
        if self.labels is None or out is None or out.ndim != 2 or out.shape[1] < 2:
            return []
        accuracy = float((out.argmax(1)[: len(self.labels)] == self.labels[: len(out)]).mean())
        chance = 1.0 / out.shape[1]
        # Twice chance for many classes; for few, halfway from chance to perfect (a binary classifier at
        # 97.5% is fine, where "2 x 50%" would flag every one).
        if accuracy >= min(2 * chance, chance + (1 - chance) / 2):
            return []
        return [f"the FP32 model itself scores {accuracy:.1%} on the labelled validation data (chance: {chance:.0%}): "
                "check --preprocess (size, colour order, scale, mean/std) and that the class folders match the "
                "model's output order"]

    def check(self, a: Artifact) -> Verification:
        with progress() as bar:
            bar.add_task(f"verifying {a.key}", total=None)
            out = self.stages.outputs(a, self.batches, self.threads)
        v = self.judge(out, a.precision)
        v.where = a.details.get("where") or v.where  # a simulator's outputs say so (rknn-simulator)
        centred = f" (mean-centred {v.centred_cosine_min:.5f})" if v.centred_cosine_min is not None else ""
        note(f"verify {a.key}: " + (f"{v.task.summary()}; tensor figures: " if v.task is not None else "")
             + f"cosine {v.cosine_min:.5f}{centred}, SNR {v.snr_db_min:.1f} dB"
             + (f", accuracy {v.accuracy:.1%} (FP32 {v.reference_accuracy:.1%})" if v.accuracy is not None else "")
             + (f"; worst slice {describe_slice(v.worst_slice)}" if v.worst_slice else "")
             + ("" if v.passed else f" -> REJECTED: {'; '.join(v.failures)}"))
        return self.isa.check(self, a, v) if self.isa is not None else v
