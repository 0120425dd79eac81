"""build = ingest -> target -> data -> plan -> export -> verify -> profile -> package.

Every check that can fail on bad input runs before the first expensive step (calibration).
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import __version__, backends
from edgekit.backends.base import Artifact, Backend
from edgekit.console import note, progress
from edgekit.data import DataSplit, Preprocess, prepare_data
from edgekit.errors import EXIT_FAILED, EXIT_OK, BadInput, UnsupportedOp
from edgekit.ingest import ModelSpec, ingest, parse_input_shapes
from edgekit.package import (
    MANIFEST_SCHEMA_ID,
    Staging,
    file_records,
    render_report,
    validate_manifest,
    write_json,
)
from edgekit.plan import ArtifactPlan, Plan, default_plan
from edgekit.profile import Latency, ProfileSettings, peak_memory_mb, time_artifacts
from edgekit.targets import Target, detect_host, load_target
from edgekit.verify import Thresholds, Verification, compare, run_all


@dataclass
class BuildOptions:
    model: str
    target: str
    out: str | None = None
    backend: str | None = None
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


@dataclass
class BuildResult:
    manifest: dict[str, Any]
    path: Path
    exit_code: int


def resolve_backend(target: Target, requested: str | None) -> Backend:
    """The requested backend, or the first of the target's backends that edgekit has and can run here."""
    if requested:
        if requested not in target.backends:
            raise BadInput(f"target {target.name} does not list backend {requested} "
                           f"(it lists {', '.join(target.backends)})")
        return backends.get_installed(requested)
    reasons = []
    for name in target.backends:
        if name not in backends.names():
            reasons.append(f"{name}: not implemented in edgekit yet")
            continue
        backend = backends.get(name)
        missing = backend.missing()
        if missing is None:
            return backend
        reasons.append(f"{name}: {missing}")
    raise BadInput(f"no backend of target {target.name} is usable here ({'; '.join(reasons)})")


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


def check_ops(spec: ModelSpec, backend: Backend) -> None:
    issues = backend.unsupported_nodes(spec.load())
    if issues:
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        raise UnsupportedOp(f"{issues[0]}{more}")


def build(opts: BuildOptions) -> BuildResult:
    target = load_target(opts.target)
    out = Path(opts.out or f"build/{Path(opts.model.split(':')[-1]).stem}-{target.name}")
    staging = Staging(out, force=opts.force)  # refuses an existing DIR before any work
    preprocess = Preprocess.from_file(opts.preprocess) if opts.preprocess else None
    backend = resolve_backend(target, opts.backend)
    plan_reasons: list[str] = []
    precisions = resolve_precisions(target, backend, opts.precisions, bool(opts.calib), plan_reasons)
    threads = opts.threads or (target.cpu["cores"] if target.is_host else detect_host()["cpu"]["cores"])

    with tempfile.TemporaryDirectory(prefix="edgekit-work-") as work, staging:
        note(f"ingest {opts.model}")
        spec = ingest(opts.model, work, parse_input_shapes(opts.input_shapes), opts.weights)
        for n in spec.notes:
            note(n)
        check_ops(spec, backend)
        data = prepare_data(spec, opts.calib, opts.val, preprocess, opts.calib_samples, opts.val_samples)
        note(data.note)
        plan = default_plan(spec, target, backend.name, precisions, opts.calib_method, opts.calib_samples,
                            opts.exclude_nodes)
        plan.reasons += plan_reasons
        artifacts = _export_all(spec, plan, backend, data, staging.path)
        reference = _reference(spec, backend, work, threads)
        verifications = _verify_all(spec, artifacts, reference, data, opts.thresholds, threads)
        latencies, ref_latency = _profile_all(spec, artifacts, reference, data, opts.profile, threads)
        memory = {a.key: peak_memory_mb(a, threads, data.validation.batches(spec)[0]) if opts.memory else None
                  for a in artifacts}
        manifest = _manifest(opts, target, spec, preprocess, data, plan, backend, artifacts, verifications,
                             latencies, ref_latency, memory, threads)
        plan.save(staging.path / "plan.yaml")
        if preprocess:
            (staging.path / "preprocess.yaml").write_text(_yaml(preprocess.to_dict()))
        if manifest["labels"]:
            (staging.path / "labels.txt").write_text("\n".join(manifest["labels"]) + "\n")
        validate_manifest(manifest)
        write_json(staging.path / "manifest.json", manifest)
        (staging.path / "report.md").write_text(render_report(manifest))
        # Never leave a package that looks valid: a rejected build goes beside DIR, named so.
        path = staging.commit(out if manifest["passed"] else out.with_name(out.name + ".rejected"))
    return BuildResult(manifest, path, EXIT_OK if manifest["passed"] else EXIT_FAILED)


def _yaml(d: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _export_all(spec: ModelSpec, plan: Plan, backend: Backend, data: DataSplit, root: Path) -> list[Artifact]:
    artifacts = []
    for ap in plan.artifacts:
        note(f"export {ap.backend} {ap.precision}")
        folder = root / f"{ap.backend}-{ap.precision}"
        folder.mkdir()
        artifacts.append(backend.export(spec, ap, data.calibration, folder))
    return artifacts


def _reference(spec: ModelSpec, backend: Backend, work: str, threads: int) -> Artifact:
    """The FP32 canonical model on the same backend: the yardstick for agreement and speedup."""
    ref_plan = ArtifactPlan(backend=backend.name, precision="fp32")
    folder = Path(work) / "reference"
    folder.mkdir()
    return backend.export(spec, ref_plan, None, folder)


def _verify_all(spec: ModelSpec, artifacts: list[Artifact], reference: Artifact, data: DataSplit,
                thresholds: Thresholds, threads: int) -> dict[str, Verification]:
    batches = data.validation.batches(spec)
    if not batches:
        raise BadInput(f"validation data has fewer samples than the model's batch {spec.inputs[0].shape[0]}")
    labels = data.validation.batch_labels(spec)
    names = [o.name for o in spec.outputs]
    backend = backends.get(reference.backend)
    results = {}
    with progress() as bar:
        task = bar.add_task("verifying", total=len(artifacts) + 1)
        ref_out = run_all(backend.load(reference, threads), batches)
        bar.advance(task)
        for a in artifacts:
            out = run_all(backends.get(a.backend).load(a, threads), batches)
            results[a.key] = compare(ref_out, out, names, labels, thresholds)
            v = results[a.key]
            note(f"verify {a.key}: cosine {v.cosine_min:.5f}, SNR {v.snr_db_min:.1f} dB"
                 + (f", accuracy {v.accuracy:.1%} (FP32 {v.reference_accuracy:.1%})" if v.accuracy is not None else "")
                 + ("" if v.passed else f" -> REJECTED: {'; '.join(v.failures)}"))
            bar.advance(task)
    return results


def _profile_all(spec: ModelSpec, artifacts: list[Artifact], reference: Artifact, data: DataSplit,
                 settings: ProfileSettings, threads: int) -> tuple[dict[str, Latency], Latency]:
    feeds = data.validation.batches(spec)[0]
    with progress() as bar:
        bar.add_task("profiling (interleaved, own process)", total=None)
        lat = time_artifacts({"reference": reference, **{a.key: a for a in artifacts}}, feeds, settings, threads)
    ref = lat.pop("reference")
    return lat, ref


def _manifest(opts: BuildOptions, target: Target, spec: ModelSpec, preprocess: Preprocess | None,
              data: DataSplit, plan: Plan, backend: Backend, artifacts: list[Artifact],
              verifications: dict[str, Verification], latencies: dict[str, Latency], ref_latency: Latency,
              memory: dict[str, float | None], threads: int) -> dict[str, Any]:
    host = detect_host()
    on_device = target.is_host
    records = []
    for a, ap in zip(artifacts, plan.artifacts):
        files = file_records(Path(a.root).parent, [f"{Path(a.root).name}/{f}" for f in a.files])
        lat = latencies[a.key]
        notes = list(a.notes) + list(ap.reasons)
        if not on_device:
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
            "reference_latency_ms": ref_latency.to_dict(),
            "speedup": round(ref_latency.p50 / lat.p50, 4) if lat.p50 else None,
            "peak_memory_mb": memory.get(a.key),
            "details": a.details,
            "notes": notes,
        })
    toolchain = {"edgekit": __version__, "python": platform.python_version(), **backend.versions()}
    cal = data.calibration
    return {
        "schema": MANIFEST_SCHEMA_ID,
        "edgekit": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "target": target.name,
        "target_spec": target.to_dict(),
        "passed": all(r["verification"]["passed"] for r in records),
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
        "thresholds": opts.thresholds.to_dict(),
        "plan": "plan.yaml",
        "plan_reasons": plan.reasons,
        "toolchain": toolchain,
        "host": {**host["cpu"], "command": " ".join(sys.argv)},
        "artifacts": records,
    }

