"""Candidates: one function takes an ArtifactPlan through export -> verify -> recover (the INT8 ladder)
-> localise (a rejected artifact's first diverging layer) and returns a typed CandidateResult. `build`
and the planner both evaluate their candidates through here; timing is done for all of them together
(side by side, interleaved) by the caller."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.console import note, progress
from edgekit.data import DataSplit
from edgekit.errors import BadInput, EdgekitError
from edgekit.ingest import ModelSpec
from edgekit.packaging.manifest import write_json
from edgekit.pipeline.recovery import Rejected, recover_int8
from edgekit.pipeline.stages import CachedStages
from edgekit.planning.types import ArtifactPlan, Plan
from edgekit.verify.metrics import describe_slice
from edgekit.verify.verifier import Thresholds, Verification, verify_outputs


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


def evaluate_candidate(ctx: CandidateContext, ap: ArtifactPlan) -> CandidateResult:
    """Export, verify, recover and (when still rejected) localise one artifact plan."""
    result = CandidateResult(ap)
    folder = ctx.root / result.key
    try:
        art = ctx.verifier.stages.export(ctx.spec, ap, ctx.data, folder)
    except EdgekitError as e:  # one converter failing must not lose the others: recorded
        return _failed(ctx, result, folder, "export", e)
    try:
        v = ctx.verifier.check(art)
        if not v.passed and ap.precision == "int8" and ctx.recover:
            art, v = recover_int8(Rejected(ctx.spec, ap, art, v, ctx.data, ctx.root, ctx.work, ctx.verifier,
                                           ctx.plan))
    except Exception as e:  # a runtime that cannot load or run it: that artifact fails, not the build
        return _failed(ctx, result, folder, "verification", e)
    if not v.passed:
        localise_into(ctx.spec, art, v, ctx.data, ctx.root, ctx.threads, ctx.thresholds)
    result.artifact, result.verification = art, v
    return result


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
                 threads: int, stages: CachedStages) -> None:
        self.stages = stages
        self.batches = data.validation.batches(spec)
        if not self.batches:
            raise BadInput(f"validation data has fewer samples than the model's batch {spec.inputs[0].shape[0]}")
        self.labels = data.validation.batch_labels(spec)
        self.names = [o.name for o in spec.outputs]
        self.thresholds, self.threads = thresholds, threads
        self.reference = stages.outputs(reference, self.batches, threads)
        self.warnings = self._sanity() + self._detector_note(spec)
        for w in self.warnings:
            note(f"[yellow]warning[/yellow]: {w}")

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
        v = verify_outputs(self.reference, out, self.names, self.labels, self.thresholds, a.precision)
        centred = f" (mean-centred {v.centred_cosine_min:.5f})" if v.centred_cosine_min is not None else ""
        note(f"verify {a.key}: cosine {v.cosine_min:.5f}{centred}, SNR {v.snr_db_min:.1f} dB"
             + (f", accuracy {v.accuracy:.1%} (FP32 {v.reference_accuracy:.1%})" if v.accuracy is not None else "")
             + (f"; worst slice {describe_slice(v.worst_slice)}" if v.worst_slice else "")
             + ("" if v.passed else f" -> REJECTED: {'; '.join(v.failures)}"))
        return v
