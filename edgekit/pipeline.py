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

from edgekit import __version__, backends
from edgekit.backends.base import Artifact, Backend
from edgekit.compress.stage import CompressOptions
from edgekit.console import note, progress
from edgekit.costmodel import estimate_latency
from edgekit.data import DataSplit, Preprocess, prepare_data
from edgekit.errors import EXIT_FAILED, EXIT_OK, BadInput, EdgekitError, UnsupportedOp
from edgekit.ingest import ModelSpec, ingest, parse_input_shapes
from edgekit.package import MANIFEST_SCHEMA_ID, Staging, file_records, render_report, validate_manifest, write_json
from edgekit.plan import ArtifactPlan, Plan, default_plan
from edgekit.profile import Latency, ProfileSettings, peak_memory_mb, time_artifacts
from edgekit.targets import Target, detect_host, load_target
from edgekit.verify import Thresholds, Verification, compare, run_all

REFERENCE_BACKEND = "onnxruntime"  # runs the canonical FP32 ONNX: the yardstick for every artifact


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
                       reasons: list[str]) -> list[str]:
    usable = [p for p in ("fp32", "fp16", "int8") if target.supports(p) and p in backend.precisions]
    if requested in (None, [], ["auto"]):
        pick = next((p for p in ("int8", "fp16", "fp32") if p in usable and (p != "int8" or has_calib)), "fp32")
        if "int8" not in usable:
            why = next((n for n in target.notes if "INT8" in n or "int8" in n), "the target lists no int8")
            reasons.append(f"no INT8 for {target.name}: {why}")
        return [pick]
    if requested == ["all"]:
        return [p for p in usable if p != "int8" or has_calib]
    for p in requested:
        if p not in ("fp32", "fp16", "int8"):
            raise BadInput(f"unknown precision '{p}'; use fp32, fp16, int8, all or auto")
        if not target.supports(p):
            why = next((n for n in target.notes if p.upper() in n or p in n), "")
            raise BadInput(f"target {target.name} does not support {p}" + (f" ({why})" if why else "")
                           + f"; it supports {', '.join(target.precisions)}")
        if p not in backend.precisions:
            raise BadInput(f"backend {backend.name} cannot build {p}")
    if "int8" in requested and not has_calib:
        raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
    return list(dict.fromkeys(requested))


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
    target = load_target(opts.target)
    out = Path(opts.out or f"build/{Path(opts.model.split(':')[-1]).stem}-{target.name}")
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
        precisions = {b.name: resolve_precisions(target, b, opts.precisions, bool(opts.calib), reasons)
                      for b in chosen}
    threads = opts.threads or (target.cpu["cores"] if target.is_host else detect_host()["cpu"]["cores"])

    with tempfile.TemporaryDirectory(prefix="edgekit-work-") as work, staging:
        note(f"ingest {opts.model}")
        spec = ingest(opts.model, work, parse_input_shapes(opts.input_shapes), opts.weights)
        for n in spec.notes:
            note(n)
        explicit = bool(opts.backend) and opts.backend != "all"
        chosen = check_ops(spec, chosen, explicit, reasons)
        data = prepare_data(spec, opts.calib, opts.val, preprocess, opts.calib_samples, opts.val_samples)
        note(data.note)
        original, compression = None, None
        wanted = opts.compress
        if wanted is not None and (wanted.prune or wanted.distill or wanted.low_rank_energy):
            original = spec
            spec, compression = _compress(spec, target, opts, preprocess, data, Path(work))
        plan = Plan(target=target.name, model_sha256=spec.sha256, artifacts=[], reasons=reasons)
        if given_plan is not None:
            if given_plan.model_sha256 != spec.sha256:
                raise BadInput(f"plan {opts.plan} was made for another model (sha256 {given_plan.model_sha256[:12]}, "
                               f"this one is {spec.sha256[:12]}): run `edgekit plan` for this model")
            plan.artifacts = [dataclasses.replace(ap, options=dict(ap.options)) for ap in given_plan.artifacts]
            plan.budgets, plan.candidates, plan.cost_model = (given_plan.budgets, given_plan.candidates,
                                                              given_plan.cost_model)
        for b in chosen if given_plan is None else []:
            sub = default_plan(spec, target, b.name, precisions[b.name], opts.calib_method, opts.calib_samples,
                               opts.exclude_nodes, {"dla_core": opts.dla_core})
            plan.artifacts += sub.artifacts
        for ap in plan.artifacts:
            ap.options.setdefault("max_accuracy_drop", opts.thresholds.max_accuracy_drop)

        # FP32 on ONNX Runtime (the verification yardstick) and on each chosen backend (its speedup base).
        ref_backends = [REFERENCE_BACKEND, *[c.name for c in chosen if c.name != REFERENCE_BACKEND]]
        references = {name: _export(spec, ArtifactPlan(name, "fp32", options=backends.get(name).plan_options(target)),
                                    data, Path(work) / f"ref-{name}")
                      for name in ref_backends}
        verifier = _Verifier(spec, references[REFERENCE_BACKEND], data, opts.thresholds, threads)
        artifacts, verifications, failed, built = [], {}, [], []
        for ap in plan.artifacts:
            folder = staging.path / f"{ap.backend}-{ap.precision}"
            try:
                art = _export(spec, ap, data, folder)
            except BadInput:
                raise
            except EdgekitError as e:  # one converter failing must not lose the others: recorded, build rejected
                if len(plan.artifacts) == 1:
                    raise
                shutil.rmtree(folder, ignore_errors=True)
                failed.append({"key": f"{ap.backend}-{ap.precision}", "error": str(e)})
                note(f"export {ap.backend} {ap.precision} FAILED: {e}")
                continue
            built.append(ap)
            v = verifier.check(art)
            if not v.passed and ap.precision == "int8":
                art, v = _retry_int8(spec, ap, art, v, data, staging.path, verifier, work)
            if not v.passed:
                _localise_into(spec, art, v, data, staging.path, threads, opts.thresholds.min_cosine)
            artifacts.append(art)
            verifications[art.key] = v

        plan.artifacts = built
        plan.reasons += [f"{f['key']} was not built: {f['error']}" for f in failed]
        # Measured where the backend runs here; otherwise the cost model's estimate, marked as one.
        candidates = {f"reference:{k}": a for k, a in references.items()} | {a.key: a for a in artifacts}
        if original is not None:  # the uncompressed model, timed in the same rounds: the pruning speedup
            candidates["original:fp32"] = _export(original, ArtifactPlan(REFERENCE_BACKEND, "fp32"), data,
                                                  Path(work) / "original-fp32")
        estimated = {k: a for k, a in candidates.items() if backends.get(a.backend).measure_here() is not None}
        timed = {k: a for k, a in candidates.items() if k not in estimated}
        with progress() as bar:
            bar.add_task("profiling (interleaved, own process)", total=None)
            latencies = time_artifacts(timed, data.validation.batches(spec)[0], opts.profile, threads)
        latencies |= {k: estimate_latency(spec, target, a.precision, backend=a.backend) for k, a in estimated.items()}
        for a in artifacts:
            if a.key in estimated:
                a.notes.append(f"latency is a cost-model estimate for {target.name} "
                               f"({backends.get(a.backend).measure_here()}); measure it on the device with "
                               "`edgekit profile PACKAGE --device NAME`")
        memory = {a.key: peak_memory_mb(a, threads, data.validation.batches(spec)[0])
                  if opts.memory and a.key not in estimated else None for a in artifacts}
        manifest = _manifest(opts, target, spec, preprocess, data, plan, chosen, artifacts, verifications,
                             latencies, memory)
        if compression is not None:
            _record_compression(manifest, compression, original, spec, latencies, opts.thresholds)
        if failed:
            manifest["failed_artifacts"] = failed
            manifest["passed"] = False
        plan.save(staging.path / "plan.yaml")
        if preprocess:
            (staging.path / "preprocess.yaml").write_text(yaml.safe_dump(preprocess.to_dict(), sort_keys=False))
        if manifest["labels"]:
            (staging.path / "labels.txt").write_text("\n".join(manifest["labels"]) + "\n")
        validate_manifest(manifest)
        write_json(staging.path / "manifest.json", manifest)
        (staging.path / "report.md").write_text(render_report(manifest))
        # Never leave a package that looks valid: a rejected build goes beside DIR, named so.
        path = staging.commit(out if manifest["passed"] else out.with_name(out.name + ".rejected"))
    return BuildResult(manifest, path, EXIT_OK if manifest["passed"] else EXIT_FAILED)


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


def _compress(spec: ModelSpec, target: Target, opts: BuildOptions, preprocess: Preprocess | None, data: DataSplit,
              work: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """Prune / distill, then ingest the result: later stages verify quantization against the compressed
    FP32 model, and the accuracy change of compression itself is checked against the original."""
    from edgekit.compress.stage import compress
    from edgekit.data import open_source

    c = opts.compress
    assert c is not None
    train = None
    if c.train:
        src = open_source(c.train, spec, preprocess, "training")
        train = src.load(np.arange(src.count), spec, "training")
    folder = work / "compress"
    folder.mkdir()
    result = compress(spec, target, c, train, data.validation, folder)
    compressed = ingest(result.onnx_path, work / "compressed")
    note(f"compressed: {spec.macs / 1e6:.1f} -> {compressed.macs / 1e6:.1f} M MACs, "
         f"{spec.params:,} -> {compressed.params:,} parameters")
    return compressed, result.report


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


def _export(spec: ModelSpec, ap: ArtifactPlan, data: DataSplit, folder: Path) -> Artifact:
    note(f"export {ap.backend} {ap.precision}")
    folder.mkdir(parents=True)
    return backends.get(ap.backend).export(spec, ap, data.calibration, folder)


def _retry_int8(spec: ModelSpec, ap: ArtifactPlan, art: Artifact, v: Verification, data: DataSplit,
                root: Path, verifier: _Verifier, work: str) -> tuple[Artifact, Verification]:
    """Measured fallbacks for a rejected INT8 artifact, each kept only if it passes verification:
    1. 7-bit weights (ORT reduce_range, NNCF overflow_fix): fixes u8*s8 saturation and coarse scales;
    2. the library's own accuracy-aware quantization (NNCF quantize_with_accuracy_control), which keeps
       the most harmful layers in float, where the backend has it and the calibration data has labels."""
    q = ap.quantization
    if q is None:
        return art, v
    attempts = []
    if not q.reduce_range:
        attempts.append(("7-bit weights", dataclasses.replace(q, reduce_range=True)))
    labelled = data.calibration is not None and data.calibration.labels is not None
    if backends.get(ap.backend).accuracy_control and labelled and not q.accuracy_control:
        attempts.append(("accuracy-controlled quantization", dataclasses.replace(q, accuracy_control=True)))
    for i, (label, settings) in enumerate(attempts):
        retry = dataclasses.replace(ap, quantization=settings, reasons=list(ap.reasons))
        folder = Path(work) / f"retry{i}-{ap.backend}-int8"
        second = _export(spec, retry, data, folder)
        v2 = verifier.check(second)
        if not v2.passed:
            continue
        final = root / f"{ap.backend}-int8"
        shutil.rmtree(final)
        shutil.move(str(folder), final)
        second.root = str(final)
        why = f"first INT8 attempt rejected ({'; '.join(v.failures)}); {label} passed"
        second.notes.append(why)
        ap.quantization, ap.reasons = settings, [*ap.reasons, why]
        return second, v2
    return art, v


def _localise_into(spec: ModelSpec, art: Artifact, v: Verification, data: DataSplit, root: Path, threads: int,
                   threshold: float) -> None:
    """A rejected artifact gets the first diverging layer named, and the per-layer table written."""
    from edgekit.debug import localise

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
                 threads: int) -> None:
        self.batches = data.validation.batches(spec)
        if not self.batches:
            raise BadInput(f"validation data has fewer samples than the model's batch {spec.inputs[0].shape[0]}")
        self.labels = data.validation.batch_labels(spec)
        self.names = [o.name for o in spec.outputs]
        self.thresholds, self.threads = thresholds, threads
        self.reference = run_all(backends.get(reference.backend).load(reference, threads), self.batches)

    def check(self, a: Artifact) -> Verification:
        with progress() as bar:
            bar.add_task(f"verifying {a.key}", total=None)
            out = run_all(backends.get(a.backend).load(a, self.threads), self.batches)
        v = compare(self.reference, out, self.names, self.labels, self.thresholds)
        note(f"verify {a.key}: cosine {v.cosine_min:.5f}, SNR {v.snr_db_min:.1f} dB"
             + (f", accuracy {v.accuracy:.1%} (FP32 {v.reference_accuracy:.1%})" if v.accuracy is not None else "")
             + ("" if v.passed else f" -> REJECTED: {'; '.join(v.failures)}"))
        return v


def _manifest(opts: BuildOptions, target: Target, spec: ModelSpec, preprocess: Preprocess | None,
              data: DataSplit, plan: Plan, chosen: list[Backend], artifacts: list[Artifact],
              verifications: dict[str, Verification], latencies: dict[str, Latency],
              memory: dict[str, float | None]) -> dict[str, Any]:
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
