"""build = ingest -> target -> data -> plan -> export -> verify -> profile -> package.

Every check that can fail on bad input runs before the first expensive step (calibration).
Every artifact, of every backend, is verified against the FP32 canonical ONNX run by ONNX Runtime,
and timed in one interleaved run with its own backend's FP32 model and with ONNX Runtime's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgekit import backends
from edgekit.backends.base import Artifact, Backend
from edgekit.compress.stage import CompressOptions
from edgekit.console import note, progress
from edgekit.data import DataSplit, Preprocess, prepare_data
from edgekit.errors import EXIT_FAILED, EXIT_OK, BadInput, EdgekitError, UnsupportedOp
from edgekit.ingest import ModelSpec, ingest, parse_input_shapes
from edgekit.packaging.manifest import MANIFEST_SCHEMA_ID, file_records, render_report, validate_manifest, write_json
from edgekit.planning.types import ArtifactPlan, Plan, default_plan
from edgekit.profiling.costmodel import estimate_latency
from edgekit.profiling.timing import Latency, ProfileSettings, peak_memory_mb, time_artifacts
from edgekit.targets import Target, detect_host, load_target
from edgekit.verify.verifier import Thresholds, Verification, compare, describe_slice, run_all
from edgekit.version import __version__
from edgekit.workspace import Staging

REFERENCE_BACKEND = "onnxruntime"  # runs the canonical FP32 ONNX: the yardstick for every artifact
RECOVER_MODES = ("auto", "none")


@dataclass
class BuildOptions:
    model: str
    target: str
    out: str | None = None
    backend: str | None = None  # a name, a comma list, or "all"; None: the target's first usable
    precisions: list[str] | None = None  # None: the lowest precision the target supports
    calib: str | None = None
    val: str | None = None
    preprocess: str | None = None
    input_shapes: list[str] = field(default_factory=list)
    weights: str | None = None
    calib_method: str = "minmax"
    calib_samples: int = 300
    val_samples: int = 500
    exclude_nodes: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    threads: int | None = None
    memory: bool = True
    force: bool = False
    dla_core: int | None = None  # TensorRT: build for this DLA core (GPU fallback on)
    compress: CompressOptions | None = None  # pruning / distillation before quantization
    plan: str | None = None  # plan.yaml from `edgekit plan`: applied exactly instead of the default rules
    # Without a plan and with no precision asked for (auto), the planner chooses backend and precision
    # first (`edgekit plan`); False keeps the target's default rules (the lowest precision it runs).
    auto_plan: bool = True
    train: str | None = None  # training data for a plan that prunes and distills (overrides the plan's)
    device: str | None = None  # the planner measures its candidates on this device (`edgekit devices`)
    cache: bool = True  # reuse finished stages whose inputs are unchanged (edgekit/cache.py)
    remeasure: bool = False  # time again even when the cache holds a measurement of the same artifacts here
    # All-or-nothing even for --backend all / --precision all (each failed artifact then rejects the build).
    strict: bool = False
    recover: str = "auto"  # INT8 that misses the thresholds: auto = the retries below before rejecting; none
    detector_head: bool = True  # INT8 of a detector keeps its head in float (quantize.detection_head)


@dataclass
class BuildResult:
    manifest: dict[str, Any]
    path: Path
    exit_code: int


# ---------------------------------------------------------------- choosing what to build


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


# ---------------------------------------------------------------- build


def build(opts: BuildOptions) -> BuildResult:
    if opts.plan is None and opts.auto_plan and opts.precisions in (None, [], ["auto"]) and opts.backend != "all":
        return _build_planned(opts)
    target = load_target(opts.target)
    out = Path(opts.out or _default_out(opts.model, target.name))
    staging = Staging(out, force=opts.force)  # refuses an existing DIR before any work
    preprocess = Preprocess.from_file(opts.preprocess) if opts.preprocess else None
    reasons: list[str] = []
    given_plan = _load_plan(opts.plan, target) if opts.plan else None
    if given_plan is not None:
        names = list(dict.fromkeys(ap.backend for ap in given_plan.artifacts))
        chosen = [backends.get_installed(n) for n in names]
        precisions = {n: [ap.precision for ap in given_plan.artifacts if ap.backend == n] for n in names}
        if any(p == "int8" for ps in precisions.values() for p in ps) and not opts.calib:
            raise BadInput("the plan has an INT8 artifact: pass --calib DIR|FILE.npz")
        reasons += [f"plan {opts.plan} applied as written", *given_plan.reasons]
    else:
        chosen = resolve_backends(target, opts.backend, reasons)
        several = len(chosen) > 1
        precisions = {b.name: resolve_precisions(target, b, opts.precisions, bool(opts.calib), reasons, several)
                      for b in chosen}
        chosen = [b for b in chosen if precisions[b.name]]
        if not chosen:
            raise BadInput(f"none of the backends builds {', '.join(opts.precisions or [])}")
    threads = opts.threads or (target.cpu["cores"] if target.is_host else detect_host()["cpu"]["cores"])

    # --backend all / --precision all: every artifact the target can have, verified; the package ships those
    # that pass (exit 0 when one does) and lists the rest. An explicit list is all-or-nothing, as --strict.
    best_effort = given_plan is None and not opts.strict and (opts.backend == "all" or opts.precisions == ["all"])
    # INT8 that misses the thresholds is retried before it is rejected; a given plan is applied as written.
    recover = opts.recover != "none" and given_plan is None
    if opts.recover not in RECOVER_MODES:
        raise BadInput(f"--recover {opts.recover}: use {' or '.join(RECOVER_MODES)}")
    stages = _Stages(opts)
    with tempfile.TemporaryDirectory(prefix="edgekit-work-") as work, staging:
        note(f"ingest {opts.model}")
        spec = stages.ingest(opts.model, Path(work), parse_input_shapes(opts.input_shapes), opts.weights)
        for n in spec.notes:
            note(n)
        explicit = bool(opts.backend) and opts.backend != "all"
        chosen = check_ops(spec, chosen, explicit, reasons)
        data = prepare_data(spec, opts.calib, opts.val, preprocess, opts.calib_samples, opts.val_samples)
        note(data.note)
        if given_plan is not None and given_plan.model_sha256 != spec.sha256:
            raise BadInput(f"plan {opts.plan} was made for another model (sha256 {given_plan.model_sha256[:12]}, "
                           f"this one is {spec.sha256[:12]}): run `edgekit plan` for this model")
        original, compression = None, None
        wanted = opts.compress
        if wanted is None and given_plan is not None and given_plan.compress:
            wanted = CompressOptions(**given_plan.compress)
            wanted.train = opts.train or wanted.train
            reasons.append("the plan prunes and distills the model first (its compress settings)")
        if wanted is not None and (wanted.prune or wanted.distill or wanted.low_rank_energy):
            original = spec
            spec, compression = _compress(spec, target, wanted, preprocess, data, Path(work), stages)
        plan = Plan(target=target.name, model_sha256=spec.sha256, artifacts=[], reasons=reasons)
        if given_plan is not None:
            plan.model_sha256, plan.compress = given_plan.model_sha256, given_plan.compress
            plan.artifacts = [dataclasses.replace(ap, options=dict(ap.options)) for ap in given_plan.artifacts]
            plan.budgets, plan.candidates, plan.cost_model, plan.sensitivity = (
                given_plan.budgets, given_plan.candidates, given_plan.cost_model, given_plan.sensitivity)
        for b in chosen if given_plan is None else []:
            # The samples the calibration really has (fewer than asked when the folder is small).
            samples = min(opts.calib_samples, len(data.calibration)) if data.calibration else opts.calib_samples
            sub = default_plan(spec, target, b.name, precisions[b.name], opts.calib_method, samples,
                               opts.exclude_nodes, {"dla_core": opts.dla_core, "detector_head": opts.detector_head})
            plan.artifacts += sub.artifacts
        for ap in plan.artifacts:
            ap.options.setdefault("max_accuracy_drop", opts.thresholds.max_accuracy_drop)

        # FP32 on ONNX Runtime (the verification yardstick) and on each chosen backend (its speedup base).
        ref_backends = [REFERENCE_BACKEND, *[c.name for c in chosen if c.name != REFERENCE_BACKEND]]
        artifacts, verifications, failed, built = [], {}, [], []
        several = len(plan.artifacts) > 1
        references = {}
        for name in ref_backends:
            try:
                references[name] = stages.export(spec, ArtifactPlan(name, "fp32",
                                                                    options=backends.get(name).plan_options(target)),
                                                 data, Path(work) / f"ref-{name}")
            except EdgekitError as e:  # a backend that cannot convert the model: its artifacts fail, not the build
                if name == REFERENCE_BACKEND or not several or (isinstance(e, BadInput) and not best_effort):
                    raise
                why = _public(e, staging, out)
                failed += [{"key": f"{ap.backend}-{ap.precision}", "stage": "export", "error": why}
                           for ap in plan.artifacts if ap.backend == name]
                plan.artifacts = [ap for ap in plan.artifacts if ap.backend != name]
                chosen = [c for c in chosen if c.name != name]
                note(f"export {name} FAILED: {why}")
        verifier = _Verifier(spec, references[REFERENCE_BACKEND], data, opts.thresholds, threads, stages)
        for ap in plan.artifacts:
            key = f"{ap.backend}-{ap.precision}"
            folder = staging.path / key
            try:
                art = stages.export(spec, ap, data, folder)
            except EdgekitError as e:  # one converter failing must not lose the others: recorded
                if not several or (isinstance(e, BadInput) and not best_effort):
                    raise
                shutil.rmtree(folder, ignore_errors=True)
                failed.append({"key": key, "stage": "export", "error": _public(e, staging, out)})
                note(f"export {ap.backend} {ap.precision} FAILED: {_public(e, staging, out)}")
                continue
            try:
                v = verifier.check(art)
                if not v.passed and ap.precision == "int8" and recover:
                    art, v = _retry_int8(spec, ap, art, v, data, staging.path, verifier, work, plan)
            except Exception as e:  # a runtime that cannot load or run it: that artifact fails, not the build
                if not several or (isinstance(e, BadInput) and not best_effort):
                    raise
                shutil.rmtree(folder, ignore_errors=True)
                why = _public(e, staging, out)
                failed.append({"key": key, "stage": "verification", "error": why})
                note(f"verify {ap.backend} {ap.precision} FAILED: {why}")
                continue
            if not v.passed:
                _localise_into(spec, art, v, data, staging.path, threads, opts.thresholds)
            built.append(ap)
            artifacts.append(art)
            verifications[art.key] = v
        if best_effort and any(verifications[a.key].passed for a in artifacts):
            # "all" = everything this target can do, verified: the package ships what passed; each rejected
            # one is listed with its reason (its per-layer diagnosis stays in debug/), not shipped.
            for a, ap in list(zip(artifacts, built)):
                v = verifications[a.key]
                if v.passed:
                    continue
                shutil.rmtree(a.root, ignore_errors=True)
                failed.append({"key": a.key, "stage": "verification", "error": "; ".join(v.failures),
                               "verification": v.to_dict()})
                artifacts.remove(a)
                built.remove(ap)

        plan.artifacts = built
        plan.reasons += [f"{f['key']} was not built: {f['error']}" if f["stage"] == "export"
                         else f"{f['key']} left out: {f['error']}" for f in failed]
        # Measured where the backend runs here; otherwise the cost model's estimate, marked as one.
        candidates = {f"reference:{k}": a for k, a in references.items()} | {a.key: a for a in artifacts}
        if original is not None:  # the uncompressed model, timed in the same rounds: the pruning speedup
            candidates["original:fp32"] = stages.export(original, ArtifactPlan(REFERENCE_BACKEND, "fp32"), data,
                                                        Path(work) / "original-fp32")
        estimated = {k: a for k, a in candidates.items() if backends.get(a.backend).measure_here() is not None}
        timed = {k: a for k, a in candidates.items() if k not in estimated}
        latencies = stages.timing(timed, data.validation.batches(spec)[0], opts.profile, threads)
        latencies |= {k: estimate_latency(spec, target, a.precision, backend=a.backend) for k, a in estimated.items()}
        for a in artifacts:
            if a.key in estimated:
                a.notes.append(f"latency is a cost-model estimate for {target.name} "
                               f"({backends.get(a.backend).measure_here()}); measure it on the device with "
                               "`edgekit profile PACKAGE --device NAME`")
        memory = {a.key: stages.memory(a, threads, data.validation.batches(spec)[0])
                  if opts.memory and a.key not in estimated else None for a in artifacts}
        manifest = _manifest(opts, target, spec, preprocess, data, plan, chosen, artifacts, verifications,
                             latencies, memory, verifier.warnings)
        manifest["layers"] = _layers(spec, target, artifacts, plan, references[REFERENCE_BACKEND], data, threads,
                                     stages)
        if plan.candidates:
            manifest["candidates"] = plan.candidates
            manifest["cost_model"] = plan.cost_model
        if compression is not None:
            _record_compression(manifest, compression, original, spec, latencies, opts.thresholds)
        if failed:
            manifest["failed_artifacts"] = failed
            manifest["passed"] = manifest["passed"] and best_effort
        manifest["cache"] = {"enabled": stages.cache.enabled, "reused": list(dict.fromkeys(stages.cache.reused)),
                             "dir": str(stages.cache.root)}
        plan.save(staging.path / "plan.yaml")
        if preprocess:
            (staging.path / "preprocess.yaml").write_text(yaml.safe_dump(preprocess.to_dict(), sort_keys=False))
        if manifest["labels"]:
            (staging.path / "labels.txt").write_text("\n".join(manifest["labels"]) + "\n")
        validate_manifest(manifest)
        write_json(staging.path / "manifest.json", manifest)
        (staging.path / "report.md").write_text(render_report(manifest))
        from edgekit.packaging.report_html import render_html  # the HTML report beside report.md, rejected builds too

        (staging.path / "report.html").write_text(render_html(manifest, staging.path), encoding="utf-8")
        # Never leave a package that looks valid: a rejected build goes beside DIR, named so.
        path = staging.commit(out if manifest["passed"] else out.with_name(out.name + ".rejected"))
    return BuildResult(manifest, path, EXIT_OK if manifest["passed"] else EXIT_FAILED)


def _layers(spec: ModelSpec, target: Target, artifacts: list[Artifact], plan: Plan, reference: Artifact,
            data: DataSplit, threads: int, stages: _Stages) -> list[dict[str, Any]]:
    """The per-layer table; ONNX Runtime's profiler times each node of the FP32 reference on this host."""
    from edgekit.packaging.layer_table import layer_table

    try:
        node_ms = stages.node_times(reference, data.validation.batches(spec)[0], threads)
    except Exception as e:  # a per-layer profile is a nicety of the report, never a reason to fail a build
        note(f"per-layer timing skipped: {type(e).__name__}: {e}")
        node_ms = None
    sensitivity = plan.sensitivity.get(artifacts[0].backend) if plan.sensitivity and artifacts else None
    return layer_table(spec, target, artifacts, plan.artifacts, node_ms, sensitivity)


def _public(e: BaseException, staging: Staging, out: Path) -> str:
    """An error of one artifact as the user reads it: one line, naming the package path, not the staging."""
    text = " ".join(str(e).split())
    text = text if isinstance(e, EdgekitError) else f"{type(e).__name__}: {text}"
    return text.replace(str(staging.path), str(out))


def _default_out(model: str, target: str) -> str:
    return f"build/{Path(model.split(':')[-1]).stem}-{target}"


def _load_plan(path: str, target: Target) -> Plan:
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


def _build_planned(opts: BuildOptions) -> BuildResult:
    """`edgekit build` without a plan or a precision: plan first (every candidate built, verified and
    timed), then build exactly what the plan chose; the package keeps the candidates for the report."""
    from edgekit.planning.search import Budgets, plan_model

    # An existing or unwritable --out is refused before the planner's work.
    Staging(opts.out or _default_out(opts.model, load_target(opts.target).name), force=opts.force)
    with tempfile.TemporaryDirectory(prefix="edgekit-autoplan-") as tmp:
        plan_path = Path(tmp) / "plan.yaml"
        note("no plan and no precision given: planning first (`edgekit plan`), then building its choice")
        plan_model(opts, Budgets(max_accuracy_drop=opts.thresholds.max_accuracy_drop), plan_path,
                   device=opts.device)
        return build(dataclasses.replace(opts, plan=str(plan_path)))


def _compress(spec: ModelSpec, target: Target, c: CompressOptions, preprocess: Preprocess | None,
              data: DataSplit, work: Path, stages: _Stages) -> tuple[ModelSpec, dict[str, Any]]:
    """Prune / distill, then ingest the result: later stages verify quantization against the compressed
    FP32 model, and the accuracy change of compression itself is checked against the original."""
    from edgekit.cache import digest
    from edgekit.compress.stage import compress
    from edgekit.data import open_source

    train = None
    if c.train:
        src = open_source(c.train, spec, preprocess, "training")
        train = src.load(np.arange(src.count), spec, "training")
    folder = work / "compress"
    settings = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("train", "checkpoint")}
    key = digest("compress", spec.sha256, settings, stages.data(train), stages.data(data.validation),
                 target.channel_multiple, _versions("torch", "torch-pruning"))
    report = stages.cache.get_tree("compress", key, folder, "compression (prune/distill)")
    if report is None:
        folder.mkdir()
        result = compress(spec, target, c, train, data.validation, folder)
        report = result.report
        stages.cache.put_tree("compress", key, folder, ["model.onnx"], report)
    compressed = stages.ingest(str(folder / "model.onnx"), work / "compressed", {}, None)
    note(f"compressed: {spec.macs / 1e6:.1f} -> {compressed.macs / 1e6:.1f} M MACs, "
         f"{spec.params:,} -> {compressed.params:,} parameters")
    return compressed, report


def _record_compression(manifest: dict[str, Any], report: dict[str, Any], original: ModelSpec | None,
                        spec: ModelSpec, latencies: dict[str, Latency], thresholds: Thresholds) -> None:
    assert original is not None
    before, after = latencies["original:fp32"], latencies[f"reference:{REFERENCE_BACKEND}"]
    acc = report["accuracy"]
    stages = ("distilled", "fine-tuned (hard labels)", "low-rank", "pruned", "original")  # last stage run first
    final = next(acc[k] for k in stages if k in acc)
    drop = round((acc["original"] - final) * 100, 3)
    passed = drop <= thresholds.max_accuracy_drop
    manifest["compression"] = {
        **report,
        "macs_before": original.macs, "macs_after": spec.macs, "macs_ratio": round(spec.macs / original.macs, 4),
        "params_before": original.params, "params_after": spec.params,
        "latency_before_ms": before.to_dict(), "latency_after_ms": after.to_dict(),
        "speedup_fp32": round(before.p50 / after.p50, 4),
        "accuracy_drop_points": drop, "passed": passed,
        "note": "the compressed FP32 model is the reference its quantized artifacts are verified against; "
                "accuracy_drop_points compares it with the original",
    }
    if not passed:
        manifest["passed"] = False
        manifest["plan_reasons"].append(f"compression lost {drop} points ({report['metric']}), more than the "
                                        f"{thresholds.max_accuracy_drop} allowed: distill longer or prune less")


class _Stages:
    """The build's expensive stages, each through the build cache (edgekit/cache.py): the key of a stage
    hashes exactly what its result depends on, so a changed input reruns only what depends on it."""

    def __init__(self, opts: BuildOptions) -> None:
        from edgekit.cache import BuildCache

        self.cache = BuildCache(enabled=opts.cache)
        self.remeasure = opts.remeasure
        self._digests: dict[int, tuple[Any, str | None]] = {}

    def data(self, dataset: Any) -> str | None:
        from edgekit.cache import dataset_digest

        if id(dataset) not in self._digests:  # the dataset is kept alive with its digest: ids stay unique
            self._digests[id(dataset)] = (dataset, dataset_digest(dataset))
        return self._digests[id(dataset)][1]

    def ingest(self, source: str, workdir: Path, shapes: dict[str, list[int]], weights: str | None) -> ModelSpec:
        from edgekit.cache import digest
        from edgekit.ingest import sha256_file

        path = Path(source)
        origin = sha256_file(path) if path.is_file() else [source, sha256_file(weights) if weights else None]
        key = digest("ingest", origin, shapes, _versions("onnx", "onnxslim", "torch", "onnxscript"))
        meta = self.cache.get_tree("ingest", key, workdir, "ingest")
        if meta is not None:
            return ModelSpec.from_dict({**meta, "source": source, "onnx_path": str(workdir / "model.onnx"),
                                        "torch_weights": weights if meta.get("torch_factory") else None})
        spec = ingest(source, workdir, shapes, weights)
        self.cache.put_tree("ingest", key, workdir, ["model.onnx"], spec.to_dict(layers=True))
        return spec

    def export(self, spec: ModelSpec, ap: ArtifactPlan, data: DataSplit, folder: Path) -> Artifact:
        from edgekit.cache import digest

        backend = backends.get(ap.backend)
        calibration = self.data(data.calibration) if ap.precision == "int8" else None
        key = digest("export", spec.sha256, dataclasses.asdict(ap), calibration, backend.versions())
        meta = self.cache.get_tree("export", key, folder, f"export {ap.backend}-{ap.precision}")
        if meta is not None:
            return Artifact(**{**meta, "root": str(folder)})
        note(f"export {ap.backend} {ap.precision}")
        folder.mkdir(parents=True)
        art = backend.export(spec, ap, data.calibration, folder)
        self.cache.put_tree("export", key, folder, art.files, art.to_dict())
        return art

    def outputs(self, art: Artifact, batches: list[dict[str, np.ndarray]], threads: int) -> list[np.ndarray]:
        """The artifact's outputs on the validation batches (what verification compares)."""
        from edgekit.cache import digest, files_digest

        key = digest("outputs", art.backend, art.precision, files_digest(Path(art.root), art.files), batches)
        cached = self.cache.get_arrays("outputs", key, f"outputs {art.key}")
        if cached is not None:
            return cached
        outputs = run_all(backends.get(art.backend).load(art, threads), batches)
        self.cache.put_arrays("outputs", key, outputs)
        return outputs

    def _measurement_key(self, stage: str, arts: dict[str, Artifact], *parts: Any) -> str:
        from edgekit.cache import digest, files_digest, host_identity

        contents = sorted((k, a.backend, files_digest(Path(a.root), a.files)) for k, a in arts.items())
        return digest(stage, contents, host_identity(), *parts)

    def timing(self, timed: dict[str, Artifact], feeds: dict[str, np.ndarray], settings: ProfileSettings,
               threads: int) -> dict[str, Latency]:
        key = self._measurement_key("timing", timed, feeds, dataclasses.asdict(settings), threads)
        cached = None if self.remeasure else self.cache.get_json("timing", key, "timing")
        if cached is not None:
            return {k: Latency(**v) for k, v in cached.items()}
        with progress() as bar:
            bar.add_task("profiling (interleaved, own process)", total=None)
            latencies = time_artifacts(timed, feeds, settings, threads)
        self.cache.put_json("timing", key, {k: v.to_dict() for k, v in latencies.items()})
        return latencies

    def memory(self, art: Artifact, threads: int, feeds: dict[str, np.ndarray]) -> float | None:
        key = self._measurement_key("memory", {art.key: art}, feeds, threads)
        cached = None if self.remeasure else self.cache.get_json("memory", key, f"memory {art.key}")
        if cached is not None:
            return cached["mb"]
        mb = peak_memory_mb(art, threads, feeds)
        if mb is not None:
            self.cache.put_json("memory", key, {"mb": mb})
        return mb

    def node_times(self, reference: Artifact, feeds: dict[str, np.ndarray], threads: int) -> dict[str, float]:
        from edgekit.profiling.timing import onnxruntime_node_times

        key = self._measurement_key("node-times", {"reference": reference}, feeds, threads)
        cached = None if self.remeasure else self.cache.get_json("node-times", key, "per-layer times")
        if cached is not None:
            return cached
        times = onnxruntime_node_times(reference.entry_path, feeds, threads)
        self.cache.put_json("node-times", key, times)
        return times


def _versions(*modules: str) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for m in modules:
        try:
            out[m] = metadata.version(m)
        except metadata.PackageNotFoundError:
            out[m] = None
    return out


# The INT8 recovery keeps at most this share of the quantizable layers in float. Past it an "INT8" artifact
# is a float model under an INT8 label (PP-LCNet's ncnn INT8 kept 33 of 33 layers: the FP32 file, byte for
# byte); rejected instead, the user is pointed at FP16.
MAX_FLOAT_FRACTION = 0.25


def _retry_int8(spec: ModelSpec, ap: ArtifactPlan, art: Artifact, v: Verification, data: DataSplit,
                root: Path, verifier: _Verifier, work: str, plan: Plan | None = None) -> tuple[Artifact, Verification]:
    """Measured fallbacks for a rejected INT8 artifact, on every backend, each kept only if it passes:
    1. the backend's own retries (Backend.int8_retries: 7-bit weights for ONNX Runtime and OpenVINO, which
       fix u8*s8 saturation and coarse scales; the other calibration method for NCNN);
    2. the library's own accuracy-aware quantization (NNCF quantize_with_accuracy_control), which keeps
       the most harmful layers in float, where the backend has it and the calibration data has labels;
    3. mixed precision (edgekit.quantize.sensitivity): the fewest most sensitive layers kept in float (FP16 where
       the backend runs it), found by real builds of this backend; what was kept is said and recorded."""
    q = ap.quantization
    if q is None:
        return art, v
    attempts = backends.get(ap.backend).int8_retries(q)
    labelled = data.calibration is not None and data.calibration.labels is not None
    if backends.get(ap.backend).accuracy_control and labelled and not q.accuracy_control:
        attempts.append(("accuracy-controlled quantization", dataclasses.replace(q, accuracy_control=True)))
    for i, (label, settings) in enumerate(attempts):
        note(f"{ap.backend} int8 rejected; retrying with {label}")
        found = _try_int8(spec, ap, settings, data, root, verifier, Path(work) / f"retry{i}-{ap.backend}-int8",
                          f"first INT8 attempt rejected ({'; '.join(v.failures)}); {label} passed")
        if found is not None:
            return found
    found = _mixed_precision(spec, ap, q, v, data, root, verifier, work, plan)
    return found if found is not None else (art, v)


def _try_int8(spec: ModelSpec, ap: ArtifactPlan, settings: Any, data: DataSplit, root: Path, verifier: _Verifier,
              folder: Path, why: str) -> tuple[Artifact, Verification] | None:
    """Build and verify INT8 with other settings; on a pass it replaces the artifact and the plan's settings."""
    retry = dataclasses.replace(ap, quantization=settings, reasons=list(ap.reasons))
    second = verifier.stages.export(spec, retry, data, folder)
    v2 = verifier.check(second)
    if not v2.passed:
        return None
    final = root / f"{ap.backend}-int8"
    shutil.rmtree(final)
    shutil.move(str(folder), final)
    second.root = str(final)
    second.notes.append(why)
    ap.quantization, ap.reasons = settings, [*ap.reasons, why]
    return second, v2


def _mixed_precision(spec: ModelSpec, ap: ArtifactPlan, q: Any, v: Verification, data: DataSplit, root: Path,
                     verifier: _Verifier, work: str, plan: Plan | None) -> tuple[Artifact, Verification] | None:
    import math

    from edgekit.quantize.sensitivity import mixed_precision

    if data.calibration is None:
        return None
    note(f"{ap.backend} int8 rejected; searching the fewest layers to keep in float (mixed precision)")
    try:
        res = mixed_precision(spec, ap.backend, data.calibration, data.validation, verifier.thresholds, q,
                              max_float_fraction=MAX_FLOAT_FRACTION, options=ap.options, threads=verifier.threads)
    except EdgekitError as e:
        note(f"mixed-precision search for {ap.backend} int8 failed: {e}")
        return None
    if plan is not None and res.sensitivities:
        plan.sensitivity[ap.backend] = {s.node: round(s.snr_gain_db, 3) for s in res.sensitivities
                                        if math.isfinite(s.snr_gain_db)}
    if not (res.passed and res.float_nodes):
        note(f"no mixed-precision {ap.backend} int8 met the thresholds ({res.reason})")
        return None
    why = (f"mixed precision: {len(res.float_nodes)} most sensitive layer(s) kept in float "
           f"({', '.join(res.float_nodes)}) so INT8 meets the thresholds that uniform INT8 missed "
           f"({'; '.join(v.failures)})")
    return _try_int8(spec, ap, res.settings, data, root, verifier, Path(work) / f"mixed-{ap.backend}-int8", why)


def _localise_into(spec: ModelSpec, art: Artifact, v: Verification, data: DataSplit, root: Path, threads: int,
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


class _Verifier:
    """Reference outputs computed once; each artifact compared with them on the validation samples."""

    def __init__(self, spec: ModelSpec, reference: Artifact, data: DataSplit, thresholds: Thresholds,
                 threads: int, stages: _Stages) -> None:
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
        from edgekit.verify.verifier import is_constant

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
        v = compare(self.reference, out, self.names, self.labels, self.thresholds, a.precision)
        centred = f" (mean-centred {v.centred_cosine_min:.5f})" if v.centred_cosine_min is not None else ""
        note(f"verify {a.key}: cosine {v.cosine_min:.5f}{centred}, SNR {v.snr_db_min:.1f} dB"
             + (f", accuracy {v.accuracy:.1%} (FP32 {v.reference_accuracy:.1%})" if v.accuracy is not None else "")
             + (f"; worst slice {describe_slice(v.worst_slice)}" if v.worst_slice else "")
             + ("" if v.passed else f" -> REJECTED: {'; '.join(v.failures)}"))
        return v


def _manifest(opts: BuildOptions, target: Target, spec: ModelSpec, preprocess: Preprocess | None,
              data: DataSplit, plan: Plan, chosen: list[Backend], artifacts: list[Artifact],
              verifications: dict[str, Verification], latencies: dict[str, Latency],
              memory: dict[str, float | None], warnings: list[str]) -> dict[str, Any]:
    host = detect_host()
    ort_ref = latencies[f"reference:{REFERENCE_BACKEND}"]
    records = []
    for a, ap in zip(artifacts, plan.artifacts):
        files = file_records(Path(a.root).parent, [f"{Path(a.root).name}/{f}" for f in a.files])
        lat, ref = latencies[a.key], latencies[f"reference:{a.backend}"]
        notes = list(dict.fromkeys([*a.notes, *ap.reasons]))
        if not target.is_host and lat.where != "estimate":
            notes.append(f"latency measured on this host ({host['cpu']['model']}), not on {target.name}")
        records.append({
            "key": a.key,
            "backend": a.backend,
            "precision": a.precision,
            "entry": f"{Path(a.root).name}/{a.entry}",
            "files": files,
            "bytes": sum(f["bytes"] for f in files),
            "verification": verifications[a.key].to_dict(),
            "latency_ms": lat.to_dict(),
            "reference_latency_ms": ref.to_dict(),
            "speedup": round(ref.p50 / lat.p50, 4) if lat.p50 else None,
            # An estimate for another device and a measurement here do not divide into a speedup.
            "speedup_vs_onnxruntime_fp32": round(ort_ref.p50 / lat.p50, 4)
            if lat.p50 and (lat.where == "estimate") == (ort_ref.where == "estimate") else None,
            "peak_memory_mb": memory.get(a.key),
            "details": a.details,
            "notes": notes,
        })
    toolchain = {"edgekit": __version__, "python": platform.python_version()}
    for b in [backends.get(REFERENCE_BACKEND), *chosen]:
        toolchain.update(b.versions())
    cal = data.calibration
    return {
        "schema": MANIFEST_SCHEMA_ID,
        "edgekit": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "target": target.name,
        "target_spec": target.to_dict(),
        "passed": bool(records) and all(r["verification"]["passed"] for r in records),
        "source": {
            "path": spec.source,
            "format": "pytorch" if spec.torch_factory else "onnx",
            "sha256": spec.source_sha256,
            "bytes": spec.source_bytes,
            "params": spec.params,
            "macs": spec.macs,
            "opset": spec.source_opset,
            "canonical_sha256": spec.sha256,
            "notes": spec.notes,
        },
        "inputs": [vars(t) for t in spec.inputs],
        "outputs": [vars(t) for t in spec.outputs],
        "preprocess": preprocess.to_dict() if preprocess else None,
        "labels": (cal.class_names if cal else None) or data.validation.class_names,
        "data": {
            "calibration": f"{len(cal)} samples from {cal.source}" if cal else "none",
            "validation": f"{len(data.validation)} samples ({data.note})",
            "warnings": warnings,
        },
        "reference": {"backend": REFERENCE_BACKEND, "precision": "fp32", "latency_ms": ort_ref.to_dict(),
                      "note": "every artifact is verified against this model's outputs"},
        "thresholds": opts.thresholds.to_dict(),
        "plan": "plan.yaml",
        "plan_reasons": plan.reasons,
        "toolchain": toolchain,
        "host": {**host["cpu"], "command": " ".join(sys.argv)},
        "artifacts": records,
    }
