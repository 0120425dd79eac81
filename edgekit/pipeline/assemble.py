"""The package's manifest assembled in memory from a build's typed results (dicts from here on: this is
the JSON edge), and the package folder written from it: manifest.json, plan.yaml, report.md/html."""

from __future__ import annotations

import datetime as dt
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

from edgekit import backends
from edgekit.backends import REFERENCE_BACKEND
from edgekit.backends.base import Artifact, Backend
from edgekit.console import note
from edgekit.data import DataSplit, Preprocess
from edgekit.ingest import ModelSpec
from edgekit.packaging.manifest import MANIFEST_SCHEMA_ID, file_records, render_report, validate_manifest, write_json
from edgekit.pipeline.options import BuildOptions
from edgekit.pipeline.stages import CachedStages
from edgekit.planning.types import Plan
from edgekit.profiling.timing import Latency
from edgekit.targets import Target, detect_host
from edgekit.tasks.base import TaskResult
from edgekit.verify.verifier import Thresholds, Verification
from edgekit.version import __version__


def write_package(folder: Path, manifest: dict[str, Any], plan: Plan, preprocess: Preprocess | None) -> None:
    """Every file of the package beside its artifacts; the manifest is validated before it is written."""
    write_example_images(folder, manifest, preprocess)
    plan.save(folder / "plan.yaml")
    if preprocess:
        (folder / "preprocess.yaml").write_text(yaml.safe_dump(preprocess.to_dict(), sort_keys=False))
    if manifest["labels"]:
        (folder / "labels.txt").write_text("\n".join(manifest["labels"]) + "\n")
    validate_manifest(manifest)
    write_json(folder / "manifest.json", manifest)
    (folder / "report.md").write_text(render_report(manifest))
    from edgekit.packaging.report_html import render_html  # the HTML report beside report.md, rejected builds too

    (folder / "report.html").write_text(render_html(manifest, folder), encoding="utf-8")


def assemble_manifest(opts: BuildOptions, target: Target, spec: ModelSpec, preprocess: Preprocess | None,
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
            "details": {k: v for k, v in a.details.items() if k not in ("recovery", "recovery_kept")},
            "notes": notes,
        })
        if ap.quantization is not None:  # INT8: the settings that were kept, and what the recovery ladder tried
            records[-1]["quantization"] = {
                "method": ap.quantization.method, "samples": ap.quantization.samples,
                "exclude_nodes": list(ap.quantization.exclude_nodes),
                "recovery": a.details.get("recovery", []), "kept": a.details.get("recovery_kept")}
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


def task_record(verifier: Any) -> dict[str, Any] | None:
    """data.task: which task metric judged the artifacts and against what (None: tensor figures only)."""
    ev = verifier.task
    if ev is None:
        return {"task": None, "notes": list(verifier.task_notes)} if verifier.task_notes else None
    s = verifier.task_settings
    record = {"task": ev.task, "metric": ev.metric, "vs": ev.vs, "max_metric_drop": s.max_metric_drop,
              "strict_tensors": s.strict_tensors, "notes": list(ev.notes)}
    if ev.task == "detect":
        record.update(decoder=ev.decoder_name, iou=s.iou, conf=s.conf, max_det=s.max_det,
                      annotations=Path(s.val_annotations).name if s.val_annotations else None)
    return record


def write_example_images(folder: Path, manifest: dict[str, Any], preprocess: Preprocess | None) -> None:
    """The few images the report draws boxes on, as small JPEGs inside the package (report-images/), each
    example's `image` rewritten to that relative path: a package never names a file outside itself."""
    from PIL import Image

    written: dict[str, str | None] = {}
    for a in manifest["artifacts"]:
        task = (a.get("verification") or {}).get("task") or {}
        for ex in task.get("examples", []):
            src = ex.get("image")
            if src is None:  # .npz validation data: boxes on a blank frame
                continue
            if src not in written:
                written[src] = None
                try:
                    with Image.open(src) as im:
                        im = im.convert("RGB")
                        if ex.get("frame") == "input" and preprocess is not None:
                            im = preprocess._resize(im)
                        im.thumbnail((320, 320))
                        rel = f"report-images/{len(written)}.jpg"
                        (folder / "report-images").mkdir(exist_ok=True)
                        im.save(folder / rel, quality=85)
                        written[src] = rel
                except (OSError, ValueError, TypeError):
                    pass  # no picture, only the per-class table: a drawing is never a reason to fail a build
            ex["image"] = written[src]


def record_compression(manifest: dict[str, Any], report: dict[str, Any], original: ModelSpec | None,
                        spec: ModelSpec, latencies: dict[str, Latency], thresholds: Thresholds,
                        task: TaskResult | None = None) -> None:
    """manifest.compression. With a task metric (`task`: the compressed FP32 model judged against the original,
    evaluate._compression_task) that metric decides; else the distillation's own figure (accuracy with labels,
    top-1 agreement with the teacher), which is a classifier's."""
    assert original is not None
    before, after = latencies["original:fp32"], latencies[f"reference:{REFERENCE_BACKEND}"]
    acc = report["accuracy"]
    stages = ("distilled", "fine-tuned (hard labels)", "low-rank", "pruned", "original")  # last stage run first
    final = next(acc[k] for k in stages if k in acc)
    drop = round((acc["original"] - final) * 100, 3)
    passed, budget = drop <= thresholds.max_accuracy_drop, thresholds.max_accuracy_drop
    extra: dict[str, Any] = {}
    if task is not None and not (task.task == "classify" and task.vs == "fp32"):
        drop, passed, budget = round(task.drop_points, 3), task.passed, task.max_drop
        # what the distillation loop itself watched, kept beside the task metric that decides
        extra["training_metric"] = {"metric": report["metric"], "values": acc}
        extra["task"] = {k: v for k, v in task.to_dict().items() if k != "examples"}
        report = {**report, "metric": task.metric}
    manifest["compression"] = {
        **report, **extra,
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
                                        f"{budget:g} allowed: distill longer or prune less")


def layer_rows(spec: ModelSpec, target: Target, artifacts: list[Artifact], plan: Plan, reference: Artifact,
            data: DataSplit, threads: int, stages: CachedStages) -> list[dict[str, Any]]:
    """The per-layer table; ONNX Runtime's profiler times each node of the FP32 reference on this host."""
    from edgekit.packaging.layer_table import layer_table

    try:
        node_ms = stages.node_times(reference, data.validation.batches(spec)[0], threads)
    except Exception as e:  # a per-layer profile is a nicety of the report, never a reason to fail a build
        note(f"per-layer timing skipped: {type(e).__name__}: {e}")
        node_ms = None
    sensitivity = plan.sensitivity.get(artifacts[0].backend) if plan.sensitivity and artifacts else None
    return layer_table(spec, target, artifacts, plan.artifacts, node_ms, sensitivity)
