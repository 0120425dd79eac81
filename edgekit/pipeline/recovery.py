"""The INT8 recovery ladder: what is tried, in order, before an INT8 artifact that misses its budgets is rejected.

RECOVERY_STEPS are rungs, each a function Rejected -> Iterator[Attempt]. Every attempt is built by the backend and
judged by the verifier (the task metric where there is one) like the first; the first that passes replaces the
artifact. As NNCF composes its post-training steps, a rung starts from the best settings judged so far.

1. calibration: the backend's own retries (Backend.int8_retries: 7-bit weights for ONNX Runtime and OpenVINO, the
   other method for NCNN), the calibration methods not tried yet, all the calibration samples when more are loaded;
2. float where it matters: the detector-head recipe where the settings lack it, then the fewest most sensitive
   layers kept in float (edgekit.quantize.sensitivity's search, ranked cheaply by one Q/DQ pass of per-layer error,
   quantize.layer_error, and confirmed by real builds of this backend), at most MAX_FLOAT_FRACTION of the layers;
3. accuracy control where the backend has it (NNCF quantize_with_accuracy_control), validated by the task metric
   on the calibration data, or by its labels, at most as many iterations as layers the search may keep in float;
4. quantization-aware training (edgekit.pipeline.qat_rung, appended by candidates.recovery_ladder where it is
   installed: it imports this module, so this one cannot import it);
5. otherwise the artifact stays rejected, with the table of what each attempt reached.

Every attempt is recorded (artifact.details["recovery"]: step, setting, metric, value, passed, seconds; "recovery_kept"
names the one kept) and printed as a table when the ladder ends. No attempt starts once `budget_s` has passed since the
first one (the record says so); the mixed-precision search stops its builds there too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.console import note
from edgekit.errors import EdgekitError
from edgekit.planning.types import ArtifactPlan, Plan, QuantizationSettings
from edgekit.quantize.ops import WEIGHTED_OPS
from edgekit.verify.verifier import DEGENERATE_REFERENCE, Verification, headline

if TYPE_CHECKING:
    from edgekit.data import DataSplit
    from edgekit.ingest import ModelSpec
    from edgekit.pipeline.candidates import Verifier

# The INT8 recovery keeps at most this share of the quantizable layers in float. Past it an "INT8" artifact
# is a float model under an INT8 label (PP-LCNet's ncnn INT8 kept 33 of 33 layers: the FP32 file, byte for
# byte); rejected instead, the user is pointed at FP16.
MAX_FLOAT_FRACTION = 0.25
RANKING_BATCHES = 8  # validation batches the cheap per-layer ranking runs on (the search's builds use all)


@dataclass
class Rejected:
    """An INT8 artifact that missed its budgets, and what the ladder needs to try others."""

    spec: ModelSpec
    plan: ArtifactPlan
    artifact: Artifact
    verification: Verification
    data: DataSplit
    root: Path  # the package folder the artifact lives in
    work: Path  # scratch for the attempts
    verifier: Verifier
    build_plan: Plan | None  # the build's plan: the mixed-precision search records its sensitivities there
    budget_s: float = 900.0  # no attempt starts past this many seconds after the first (--recover-budget)
    train: str | None = None  # --train: data for the quantization-aware training rung
    qat_epochs: int = 3
    first_seconds: float | None = None  # the planned attempt's build and verification
    record: list[dict[str, Any]] = field(default_factory=list)  # one row per attempt, in order
    deadline: float | None = None  # time.monotonic() past which no attempt starts (set when the ladder starts)
    judged: list[tuple[QuantizationSettings, dict[str, Any], float | None]] = field(default_factory=list)

    def best(self) -> tuple[QuantizationSettings, dict[str, Any]]:
        """The settings and plan options of the best attempt judged so far (the planned one at first)."""
        q, options, _ = max(self.judged, key=lambda j: -math.inf if j[2] is None else j[2])
        return q, dict(options)

    def add_row(self, step: str, setting: str, v: Verification | None, seconds: float | None, note: str = "",
                figure: tuple[str, float | None] | None = None) -> dict[str, Any]:
        """One attempt in the record: what decided (the task metric, else cosine) and how long it took."""
        metric, value = headline(v) if v is not None else figure or (None, None)
        row = {"step": step, "setting": setting, "metric": metric, "value": None if value is None else round(value, 4),
               "passed": bool(v is not None and v.passed), "seconds": round(seconds or 0.0, 2)}
        if note:
            row["note"] = note
        self.record.append(row)
        return row


@dataclass
class Attempt:
    """Other quantization settings to build and judge. `setting` names the change in the record; `why` is noted on
    the artifact when it passes (by default: what the first attempt missed, and which setting passed). `options`:
    the plan options to build with (default the plan's); `build(folder)`: makes the artifact itself (a rung whose
    artifact is no plain export: QAT's Q/DQ model, a quantizer given a Python callable), else the build's stages."""

    settings: QuantizationSettings
    folder: str = ""
    why: str = ""
    setting: str = ""
    options: dict[str, Any] | None = None
    build: Callable[[Path], Artifact] | None = None


Step = Callable[[Rejected], Iterator[Attempt]]


def calibration(r: Rejected) -> Iterator[Attempt]:
    """The backend's own retries, the other calibration methods, then every loaded calibration sample."""
    q = r.plan.quantization
    assert q is not None
    for label, settings in backends.get(r.plan.backend).int8_retries(q):
        yield Attempt(settings, setting=label)
    for method in backends.get(r.plan.backend).calibration_methods:
        base, options = r.best()
        if method != base.method:  # one the backend ignores builds the same file: recorded, not judged again
            yield Attempt(dataclasses.replace(base, method=method), setting=f"{method} calibration", options=options)
    base, options = r.best()
    loaded = len(r.data.calibration) if r.data.calibration is not None else 0
    if loaded > base.samples:
        yield Attempt(dataclasses.replace(base, samples=loaded), options=options,
                      setting=f"all {loaded} calibration samples (was {base.samples})")


def float_where_it_matters(r: Rejected) -> Iterator[Attempt]:
    """The detector head in float where the settings lack it, then the fewest most sensitive layers."""
    base, options = r.best()
    head = _detector_head(r)
    new = [n for n in head if n not in base.exclude_nodes]
    if new:
        options["detector_head_nodes"] = list(dict.fromkeys([*options.get("detector_head_nodes", []), *new]))
        yield Attempt(_with_float(base, new), setting=f"detector head in float ({len(new)} nodes)", options=options)
    yield from _mixed_precision(r)


def _mixed_precision(r: Rejected) -> Iterator[Attempt]:
    from edgekit.quantize.sensitivity import MixedPrecisionStep
    from edgekit.quantize.sensitivity import mixed_precision as search

    base, options = r.best()
    if r.data.calibration is None:
        return
    note(f"{r.plan.backend} int8 rejected; searching the fewest layers to keep in float (mixed precision)")
    start = time.monotonic()
    try:
        res = search(r.spec, r.plan.backend, r.data.calibration, r.data.validation, r.verifier.thresholds, base,
                     max_float_fraction=MAX_FLOAT_FRACTION, options=options, threads=r.verifier.threads,
                     method="qdq_error", sensitivity_batches=RANKING_BATCHES, judge=r.verifier.judge,
                     deadline=r.deadline, uniform_rejected=True)
    except EdgekitError as e:
        r.add_row("float", "mixed precision", None, time.monotonic() - start, f"search failed: {e}")
        return
    if r.build_plan is not None and res.sensitivities:
        r.build_plan.sensitivity[r.plan.backend] = {s.node: round(s.snr_gain_db, 3) for s in res.sensitivities
                                                     if math.isfinite(s.snr_gain_db)}
    if not (res.passed and res.float_nodes):
        best = max(res.steps, key=MixedPrecisionStep.rank, default=None)
        r.add_row("float", f"mixed precision ({len(res.steps)} builds)", None, time.monotonic() - start, res.reason,
                  (best.metric, best.value) if best else None)
        note(f"no mixed-precision {r.plan.backend} int8 met the budgets ({res.reason})")
        return
    n = len(res.float_nodes)
    shown = ", ".join(res.float_nodes[:4]) + (f", … ({n - 4} more)" if n > 4 else "")
    yield Attempt(res.settings, options=options, setting=f"{len(res.float_nodes)} most sensitive layer(s) in float "
                  f"({shown}; {len(res.steps)} builds searched)",
                  why=f"mixed precision: {len(res.float_nodes)} most sensitive layer(s) kept in float "
                      f"({', '.join(res.float_nodes)}) so INT8 meets the budgets that uniform INT8 missed "
                      f"({'; '.join(r.verification.failures)})")


def accuracy_control(r: Rejected) -> Iterator[Attempt]:
    """NNCF's accuracy-aware quantization, validated by the task metric (or the labels) on the calibration data."""
    backend = backends.get(r.plan.backend)
    base, options = r.best()
    calib = r.data.calibration
    if not backend.accuracy_control or base.accuracy_control or calib is None:
        return
    metric = r.verifier.task_metric(calib)
    if metric is None and calib.labels is None:
        note(f"{r.plan.backend}: accuracy control skipped: it needs a task metric or labelled calibration data")
        return
    task = r.verification.task
    name, drop = (task.metric, task.max_drop) if task is not None else \
        ("accuracy", r.verifier.thresholds.max_accuracy_drop)
    quantizable = sum(1 for layer in r.spec.layers if layer.op_type in WEIGHTED_OPS)
    options.update(max_accuracy_drop=drop, accuracy_control_iterations=max(1, round(MAX_FLOAT_FRACTION * quantizable)))
    settings = dataclasses.replace(base, accuracy_control=True)
    setting = (f"NNCF accuracy control on {name} of the {'' if metric else 'labelled '}calibration data "
               f"(max drop {drop:g} points, at most {options['accuracy_control_iterations']} iterations)")

    def build(folder: Path) -> Artifact:  # the metric is a Python callable: a plan option for this build only
        folder.mkdir(parents=True)
        plan = ArtifactPlan(r.plan.backend, "int8", settings, options={**options, "accuracy_control_metric": metric})
        return backend.export(r.spec, plan, calib, folder)

    yield Attempt(settings, setting=setting, options=options, build=build if metric is not None else None)


# The ladder, in order: cheap calibration first, the float layers, then the library's own accuracy loop.
RECOVERY_STEPS: tuple[Step, ...] = (calibration, float_where_it_matters, accuracy_control)
STEP_NAMES = {calibration: "calibration", float_where_it_matters: "float", accuracy_control: "accuracy control"}


def recover_int8(r: Rejected, steps: tuple[Step, ...] = RECOVERY_STEPS) -> tuple[Artifact, Verification]:
    """The first attempt of the ladder that passes replaces the artifact (and the plan's settings); none passing
    leaves the rejected one. Either way the artifact carries the record of every attempt."""
    q = r.plan.quantization
    if q is None:
        return r.artifact, r.verification
    r.add_row("planned", _describe(q), r.verification, r.first_seconds)
    r.judged.append((q, dict(r.plan.options), headline(r.verification)[1]))
    if any(f.startswith(DEGENERATE_REFERENCE) for f in r.verification.integrity_failures):
        # The FP32 outputs do not depend on the input: no INT8 setting can be told right from wrong, so every
        # rung (QAT included) would be time spent on a verdict that cannot change.
        r.add_row("skipped", "no rung tried", None, 0.0, "the FP32 reference is degenerate (the same output for "
                  "every validation sample): fix the model or the data")
        note(f"{r.plan.backend} int8: no recovery tried: the FP32 reference itself is degenerate")
        r.artifact.details["recovery"], r.artifact.details["recovery_kept"] = r.record, None
        return r.artifact, r.verification
    seen = {_settings_key(q, r.plan.options)}
    digests = {_digest(r.artifact): "planned", _fingerprint(r.verification): "planned"}
    start = time.monotonic()
    r.deadline = start + r.budget_s
    found, attempts, spent = None, 0, False
    for i, step in enumerate(steps):
        name = STEP_NAMES.get(step) or step.__name__.removesuffix("_rung")
        rungs = step(r)
        while found is None:
            if attempts and time.monotonic() > r.deadline:
                left = ", ".join(STEP_NAMES.get(s) or s.__name__.removesuffix("_rung") for s in steps[i:])
                r.add_row("budget", f"time budget {r.budget_s:g} s spent after {time.monotonic() - start:.0f} s",
                          None, 0.0, f"not tried: the rest of {left}")
                note(f"{r.plan.backend} int8: recovery time budget ({r.budget_s:g} s) spent; not tried: the rest of "
                     f"{left}")
                spent = True
                break
            t0 = time.monotonic()
            try:
                attempt = next(rungs)
            except StopIteration:
                break
            except EdgekitError as e:  # a rung that cannot run here (QAT without its library, say): recorded
                r.add_row(name, "(could not run)", None, time.monotonic() - t0, str(e))
                break
            key = _settings_key(attempt.settings, attempt.options if attempt.options is not None else r.plan.options)
            if key in seen:
                continue
            seen.add(key)
            attempts += 1
            found = _try(r, attempt, name, t0, digests)
        if found is not None or spent:
            break
    kept = f"{r.record[-1]['step']}: {r.record[-1]['setting']}" if found is not None else None
    art, v = found if found is not None else (r.artifact, r.verification)
    art.details["recovery"], art.details["recovery_kept"] = r.record, kept
    _print_table(r, kept)
    return art, v


def _try(r: Rejected, attempt: Attempt, step: str, t0: float, digests: dict[str, str]
         ) -> tuple[Artifact, Verification] | None:
    """Build and judge one attempt, recorded; on a pass it replaces the artifact and the plan's settings. `digests`:
    the files and the figures of the attempts so far, to say when one changed nothing (a setting the backend
    ignores: OpenVINO's NNCF has no calibration methods)."""
    ap = r.plan
    options = dict(attempt.options if attempt.options is not None else ap.options)
    retry = dataclasses.replace(ap, quantization=attempt.settings, options=options, reasons=list(ap.reasons))
    folder = r.work / (attempt.folder or f"recover{len(r.record)}-{ap.backend}-int8")
    setting = attempt.setting or _describe(attempt.settings)
    note(f"{ap.backend} int8 rejected; trying {step}: {setting}")
    try:
        shutil.rmtree(folder, ignore_errors=True)
        art = attempt.build(folder) if attempt.build else r.verifier.stages.export(r.spec, retry, r.data, folder)
        same = digests.get(digest := _digest(art))
        if same is not None:
            r.add_row(step, setting, None, time.monotonic() - t0, f"the same artifact as {same}: not judged again")
            return None
        digests[digest] = setting
        v = r.verifier.check(art)
    except Exception as e:  # one attempt that cannot be built or run must not end the ladder: recorded
        r.add_row(step, setting, None, time.monotonic() - t0, f"failed: {type(e).__name__}: {e}")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    same = digests.setdefault(_fingerprint(v), setting)  # other bytes (names a converter numbers), same model
    r.add_row(step, setting, v, time.monotonic() - t0,
              "" if same == setting else f"the same outputs as {same}")
    r.judged.append((attempt.settings, options, headline(v)[1]))
    if not v.passed:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    final = Path(r.artifact.root)
    shutil.rmtree(final)
    shutil.move(str(folder), final)
    art.root = str(final)
    why = attempt.why or (f"first INT8 attempt rejected ({'; '.join(r.verification.failures)}); "
                          f"{attempt.setting or step} passed")
    art.notes.append(why)
    ap.quantization, ap.options, ap.reasons = attempt.settings, options, [*ap.reasons, why]
    return art, v


def _detector_head(r: Rejected) -> list[str]:
    """The detector head's nodes (quantize.detection_head); the weighted ones only where the backend's INT8
    quantizes weighted layers only (as planning.select keeps them)."""
    from edgekit.quantize.detection_head import detector_head

    head = detector_head(r.spec)
    if head is None:
        return []
    if not backends.get(r.plan.backend).int8_weighted_layers_only:
        return head[1]
    weighted = {n.name for n in r.spec.load().graph.node if n.op_type in WEIGHTED_OPS}
    return [n for n in head[1] if n in weighted]


def _with_float(q: QuantizationSettings, nodes: list[str]) -> QuantizationSettings:
    return dataclasses.replace(q, exclude_nodes=list(dict.fromkeys([*q.exclude_nodes, *nodes])))


def _describe(q: QuantizationSettings) -> str:
    parts = [f"{q.method} calibration", f"{q.samples} samples"]
    parts += ["7-bit weights"] if q.reduce_range else []
    parts += [f"{len(q.exclude_nodes)} node(s) in float"] if q.exclude_nodes else []
    parts += ["accuracy control"] if q.accuracy_control else []
    return ", ".join(parts)


def _settings_key(q: QuantizationSettings, options: dict[str, Any]) -> str:
    return json.dumps([dataclasses.asdict(q), options], sort_keys=True, default=repr)


def _fingerprint(v: Verification) -> str:
    """Every figure of every output (and slice): equal only for the same outputs."""
    return repr(("outputs", [dataclasses.astuple(o) for o in v.outputs], headline(v)))


def _digest(art: Artifact) -> str:
    from edgekit.cache import files_digest

    return files_digest(Path(art.root), art.files)


def _print_table(r: Rejected, kept: str | None) -> None:
    from rich.table import Table

    from edgekit.console import out

    t = Table(title=f"INT8 recovery, {r.plan.backend}: " + (f"kept {kept}" if kept else "nothing passed: rejected"))
    for col in ("step", "setting", "metric", "value", "passed", "seconds"):
        t.add_column(col, justify="right" if col in ("value", "seconds") else "left")
    for row in r.record:
        value = "—" if row["value"] is None else f"{row['value']:.4g}"
        t.add_row(row["step"], row["setting"] + (f" [dim]({row['note']})[/dim]" if row.get("note") else ""),
                  row["metric"] or "—", value, "yes" if row["passed"] else "no", f"{row['seconds']:.1f}")
    out.print(t)
