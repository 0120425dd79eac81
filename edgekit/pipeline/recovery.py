"""The INT8 recovery ladder: what is tried, in order, before an INT8 artifact that misses the thresholds
is rejected. Each step proposes other quantization settings; each proposal is built by the backend and
verified like the first attempt, and kept only if it passes (as NNCF composes its post-training steps).

1. the backend's own retries (Backend.int8_retries: 7-bit weights for ONNX Runtime and OpenVINO, which fix
   u8*s8 saturation and coarse scales; the other calibration method for NCNN);
2. the library's own accuracy-aware quantization (NNCF quantize_with_accuracy_control), which keeps the
   most harmful layers in float, where the backend has it and the calibration data has labels;
3. mixed precision (edgekit.quantize.sensitivity): the fewest most sensitive layers kept in float (FP16
   where the backend runs it), found by real builds of this backend; what was kept is said and recorded.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.console import note
from edgekit.errors import EdgekitError
from edgekit.planning.types import ArtifactPlan, Plan, QuantizationSettings
from edgekit.verify.verifier import Verification

if TYPE_CHECKING:
    from edgekit.data import DataSplit
    from edgekit.ingest import ModelSpec
    from edgekit.pipeline.candidates import Verifier

# The INT8 recovery keeps at most this share of the quantizable layers in float. Past it an "INT8" artifact
# is a float model under an INT8 label (PP-LCNet's ncnn INT8 kept 33 of 33 layers: the FP32 file, byte for
# byte); rejected instead, the user is pointed at FP16.
MAX_FLOAT_FRACTION = 0.25


@dataclass
class Rejected:
    """An INT8 artifact that missed the thresholds, and what the ladder needs to try others."""

    spec: ModelSpec
    plan: ArtifactPlan
    artifact: Artifact
    verification: Verification
    data: DataSplit
    root: Path  # the package folder the artifact lives in
    work: Path  # scratch for the attempts
    verifier: Verifier
    build_plan: Plan | None  # the build's plan: the mixed-precision search records its sensitivities there


@dataclass
class Attempt:
    """Other quantization settings to build and verify; `why` is recorded when they pass."""

    settings: QuantizationSettings
    folder: str
    why: str


def backend_retries(r: Rejected) -> Iterator[Attempt]:
    q = r.plan.quantization
    assert q is not None
    for i, (label, settings) in enumerate(backends.get(r.plan.backend).int8_retries(q)):
        note(f"{r.plan.backend} int8 rejected; retrying with {label}")
        yield Attempt(settings, f"retry{i}-{r.plan.backend}-int8",
                      f"first INT8 attempt rejected ({'; '.join(r.verification.failures)}); {label} passed")


def accuracy_control(r: Rejected) -> Iterator[Attempt]:
    q = r.plan.quantization
    assert q is not None
    labelled = r.data.calibration is not None and r.data.calibration.labels is not None
    if not (backends.get(r.plan.backend).accuracy_control and labelled and not q.accuracy_control):
        return
    label = "accuracy-controlled quantization"
    # numbered after the backend's own retries, as one list of attempts
    i = len(backends.get(r.plan.backend).int8_retries(q))
    note(f"{r.plan.backend} int8 rejected; retrying with {label}")
    yield Attempt(dataclasses.replace(q, accuracy_control=True), f"retry{i}-{r.plan.backend}-int8",
                  f"first INT8 attempt rejected ({'; '.join(r.verification.failures)}); {label} passed")


def mixed_precision(r: Rejected) -> Iterator[Attempt]:
    from edgekit.quantize.sensitivity import mixed_precision as search

    q, ap = r.plan.quantization, r.plan
    assert q is not None
    if r.data.calibration is None:
        return
    note(f"{ap.backend} int8 rejected; searching the fewest layers to keep in float (mixed precision)")
    try:
        res = search(r.spec, ap.backend, r.data.calibration, r.data.validation, r.verifier.thresholds, q,
                     max_float_fraction=MAX_FLOAT_FRACTION, options=ap.options, threads=r.verifier.threads)
    except EdgekitError as e:
        note(f"mixed-precision search for {ap.backend} int8 failed: {e}")
        return
    if r.build_plan is not None and res.sensitivities:
        r.build_plan.sensitivity[ap.backend] = {s.node: round(s.snr_gain_db, 3) for s in res.sensitivities
                                                if math.isfinite(s.snr_gain_db)}
    if not (res.passed and res.float_nodes):
        note(f"no mixed-precision {ap.backend} int8 met the thresholds ({res.reason})")
        return
    yield Attempt(res.settings, f"mixed-{ap.backend}-int8",
                  f"mixed precision: {len(res.float_nodes)} most sensitive layer(s) kept in float "
                  f"({', '.join(res.float_nodes)}) so INT8 meets the thresholds that uniform INT8 missed "
                  f"({'; '.join(r.verification.failures)})")


# The ladder, in order: cheap retries first, the per-layer search last.
RECOVERY_STEPS: tuple[Callable[[Rejected], Iterator[Attempt]], ...] = (backend_retries, accuracy_control,
                                                                       mixed_precision)


def recover_int8(r: Rejected) -> tuple[Artifact, Verification]:
    """The first attempt of the ladder that passes replaces the artifact (and the plan's settings);
    none passing leaves the rejected one."""
    if r.plan.quantization is None:
        return r.artifact, r.verification
    for step in RECOVERY_STEPS:
        for attempt in step(r):
            found = _try(r, attempt)
            if found is not None:
                return found
    return r.artifact, r.verification


def _try(r: Rejected, attempt: Attempt) -> tuple[Artifact, Verification] | None:
    """Build and verify INT8 with other settings; on a pass it replaces the artifact and the plan's settings."""
    ap = r.plan
    retry = dataclasses.replace(ap, quantization=attempt.settings, reasons=list(ap.reasons))
    folder = r.work / attempt.folder
    second = r.verifier.stages.export(r.spec, retry, r.data, folder)
    v2 = r.verifier.check(second)
    if not v2.passed:
        return None
    final = r.root / f"{ap.backend}-int8"
    shutil.rmtree(final)
    shutil.move(str(folder), final)
    second.root = str(final)
    second.notes.append(attempt.why)
    ap.quantization, ap.reasons = attempt.settings, [*ap.reasons, attempt.why]
    return second, v2
