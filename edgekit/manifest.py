"""Package: DIR/ with the artifacts, manifest.json (schema docs/manifest.md) and report.md.

Everything is written into a hidden staging folder next to DIR and moved into place only when
complete, so a failed build leaves no DIR (or the previous DIR untouched).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

import jsonschema

from edgekit.errors import BadInput
from edgekit.ingest import sha256_file

MANIFEST_SCHEMA_ID = "edgekit-manifest/1"


def manifest_schema() -> dict[str, Any]:
    return json.loads(resources.files("edgekit.schemas").joinpath("manifest.schema.json").read_text())


def validate_manifest(manifest: dict[str, Any]) -> None:
    jsonschema.validate(manifest, manifest_schema())


def file_records(root: Path, files: list[str]) -> list[dict[str, Any]]:
    return [{"path": f, "bytes": (root / f).stat().st_size, "sha256": sha256_file(root / f)} for f in files]


class Staging:
    """A staging folder for DIR that becomes DIR on commit() and vanishes otherwise."""

    def __init__(self, out: str | Path, force: bool = False) -> None:
        self.out = Path(out).resolve()
        if self.out.exists() and not force:
            raise BadInput(f"output folder {out} exists; choose another --out or pass --force to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise BadInput(f"--out {out} is a file, not a folder")
        self.path = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def __enter__(self) -> Staging:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def commit(self, dest: Path | None = None) -> Path:
        """Move the finished folder to dest (default DIR), replacing what was there."""
        dest = dest or self.out
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
        os.replace(self.path, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return dest

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---------------------------------------------------------------- report


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def artifact_rows(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """One row per artifact with the figures people compare; shared by the console and the report."""
    rows = []
    fp32_bytes = {a["backend"]: a["bytes"] for a in manifest["artifacts"] if a["precision"] == "fp32"}
    for a in manifest["artifacts"]:
        v, lat, ref = a["verification"], a.get("latency_ms") or {}, a.get("reference_latency_ms") or {}
        speed = ref.get("p50") / lat["p50"] if lat.get("p50") and ref.get("p50") else None
        rows.append({
            "backend": a["backend"],
            "precision": a["precision"],
            "bytes": f"{a['bytes']:,}",
            # vs the same backend's FP32 build, else vs the source model
            "size": f"{a['bytes'] / fp32_bytes.get(a['backend'], manifest['source']['bytes']):.0%}",
            "p50 ms": _fmt(lat.get("p50"), ".3f") + (" est." if lat.get("where") == "estimate" else ""),
            "p99 ms": _fmt(lat.get("p99"), ".3f") + (" est." if lat.get("where") == "estimate" else ""),
            "speedup": f"{speed:.2f}x" if speed else "–",
            "vs ORT fp32": f"{a['speedup_vs_onnxruntime_fp32']:.2f}x" if a.get("speedup_vs_onnxruntime_fp32") else "–",
            "accuracy": _fmt(v.get("accuracy") if v.get("accuracy") is None else v["accuracy"] * 100, ".1f"),
            "cosine": _fmt(v.get("cosine_min"), ".5f"),
            "SNR dB": _fmt(v.get("snr_db_min"), ".1f"),
            "top-1 agr.": _fmt(None if v.get("top1_agreement") is None else v["top1_agreement"] * 100, ".1f"),
            "verdict": "ok" if v["passed"] else "REJECTED",
        })
    return rows


def render_report(manifest: dict[str, Any]) -> str:
    src, arts = manifest["source"], manifest["artifacts"]
    lines = [
        f"# edgekit build: {Path(src['path']).name} for {manifest['target']}",
        "",
        f"Built {manifest['created']} with edgekit {manifest['edgekit']}. "
        f"Verdict: **{'passed' if manifest['passed'] else 'REJECTED'}**.",
        "",
        f"- Source: `{src['path']}` ({src['bytes']:,} bytes, sha256 `{src['sha256'][:16]}…`), "
        f"{src['params']:,} parameters, {src['macs'] / 1e6:,.1f} M MACs, opset {src['opset']}",
        "- Inputs: " + ", ".join(f"`{i['name']}` {i['shape']} {i['dtype']}" for i in manifest["inputs"]),
        "- Outputs: " + ", ".join(f"`{o['name']}` {o['shape']} {o['dtype']}" for o in manifest["outputs"]),
        f"- Calibration: {manifest['data']['calibration']}",
        f"- Validation: {manifest['data']['validation']}",
        *[f"- **Warning**: {w}" for w in manifest["data"].get("warnings") or []],
        "",
        "## Artifacts",
        "",
    ]
    rows = artifact_rows(manifest)
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", "Speedup is the same backend's FP32 p50 over the artifact's p50; 'vs ORT fp32' is ONNX Runtime "
              "FP32's p50 over it. All were timed interleaved in one process with the same threads. Every "
              "artifact is verified against the FP32 ONNX in ONNX Runtime. Accuracy and top-1 agreement in %.", ""]
    for a in arts:
        v, lat = a["verification"], a.get("latency_ms") or {}
        lines += [f"### {a['backend']} {a['precision']}", ""]
        lines += ["- Files: " + ", ".join(f"`{f['path']}` ({f['bytes']:,} B)" for f in a["files"])]
        lines += [f"- Verification on {v['samples']} held-out samples: "
                  + ("passed" if v["passed"] else "**rejected**: " + "; ".join(v["failures"]))]
        d = v.get("diverging_layer")
        if d:
            label = "Layer adding the most error" if d.get("criterion") == "most added error" \
                else "First diverging layer"
            lines.append(f"  - {label}: `{d['node']}` ({d['op_type']}), cosine {d['cosine']:.4f}, "
                         f"SNR {d['snr_db']:.1f} dB; inputs from {', '.join(d['inputs_from']) or 'the model input'}; "
                         f"per-layer table in `debug/{a['key']}.json`")
        for o in v["outputs"]:
            lines.append(f"  - `{o['name']}`: cosine {o['cosine']:.5f} (worst sample {o['cosine_worst_sample']:.5f}), "
                         f"SNR {o['snr_db']:.1f} dB, max |err| {o['max_abs_error']:.4g}")
        if lat:
            lines.append(f"- Latency ({lat['where']}, {lat['threads']} threads, {lat['runs']} runs): p50 "
                         f"{lat['p50']:.3f} ms, p90 {lat['p90']:.3f}, p99 {lat['p99']:.3f}, mean {lat['mean']:.3f}")
        if a.get("peak_memory_mb") is not None:
            lines.append(f"- Peak memory added by the model: {a['peak_memory_mb']:.1f} MB")
        for k, val in (a.get("details") or {}).items():
            if val not in (None, [], {}):
                lines.append(f"- {k}: {val}")
        lines += [f"- Note: {n}" for n in a.get("notes", [])]
        lines.append("")
    lines += _planner_section(manifest)
    lines += _compression_section(manifest.get("compression"))
    if manifest["source"].get("notes"):
        lines += ["## What ingest did", ""] + [f"- {n}" for n in manifest["source"]["notes"]] + [""]
    lines += ["## Toolchain", ""] + [f"- {k} {v}" for k, v in manifest["toolchain"].items()] + [""]
    host = manifest.get("host") or {}
    if host:
        lines += [f"Measured on {host.get('model', '?')} ({host.get('cores')} cores; "
                  f"{', '.join(host.get('isa', []))})", ""]
    return "\n".join(lines)


def _planner_section(manifest: dict[str, Any]) -> list[str]:
    """The planner's candidates and how well the cost model estimated them."""
    cands = manifest.get("candidates")
    if not cands:
        return []
    lines = ["## Planner", "",
             "| candidate | pruned | float nodes | est. ms | measured ms | bytes | accuracy | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cands:
        lines.append(f"| {'**' + c['key'] + '** (chosen)' if c.get('chosen') else c['key']} | "
                     f"{_fmt(c.get('prune_ratio') or None, '.0%')} | {c.get('float_nodes', 0)} | "
                     f"{_fmt(c.get('estimated_ms'), '.3f')} | {_fmt(c.get('measured_ms'), '.3f')} | {c['bytes']:,} | "
                     f"{_fmt(None if c.get('accuracy') is None else c['accuracy'] * 100, '.2f')} | {c['verdict']} |")
    cm = manifest.get("cost_model") or {}
    if cm.get("mape_percent") is not None:
        lines += ["", f"Cost model: mean absolute percentage error {cm['mape_percent']}% against the "
                      f"{cm['compared']} candidates measured on the target."]
    elif cm:
        lines += ["", "Cost model: nothing could be measured on the target here; latencies are its estimates."]
    fit = cm.get("fit") or {}
    if fit.get("points"):
        lines.append(f"It was fitted to {fit['points']} measurements of the target ({', '.join(fit['sources'])}) "
                     f"and reproduces them within {fit['fit_mape_percent']}% on average.")
    return [*lines, ""]


def _compression_section(c: dict[str, Any] | None) -> list[str]:
    """Accuracy after each compression stage (so what distillation adds is visible), size and speed."""
    if not c:
        return []
    # Signed (+0.25 is a gain); "+ 0.0" keeps a zero change from printing as "-0".
    change = round(-c["accuracy_drop_points"], 3) + 0.0
    lines = ["## Compression", "", f"| stage | {c['metric']} |", "|---|---|"]
    lines += [f"| {stage} | {value:.2%} |" for stage, value in c["accuracy"].items()]
    lines += ["", f"- MACs {c['macs_before'] / 1e6:.1f}M -> {c['macs_after'] / 1e6:.1f}M ({c['macs_ratio']:.0%}), "
              f"parameters {c['params_before']:,} -> {c['params_after']:,}",
              f"- ONNX Runtime FP32, same interleaved rounds: {c['latency_before_ms']['p50']:.3f} -> "
              f"{c['latency_after_ms']['p50']:.3f} ms p50 ({c['speedup_fp32']:.2f}x)",
              f"- Accuracy change vs the original: {change:+g} points "
              f"({'within' if c['passed'] else 'OVER'} the budget)"]
    pr = c.get("prune")
    if pr:
        lines.append(f"- Pruning: {pr['settings']['importance']} importance, ratio {pr['settings']['ratio']}, "
                     f"channels rounded to {pr['round_to']} ({pr['round_to_reason']})")
        for step in c.get("prune_steps", []):  # iterative pruning: what each step left, and the fine-tune after it
            after = (f", {step['finetuned']:.2%} after {step['epochs']} epochs of {step['finetune']}"
                     if "finetuned" in step else "")
            lines.append(f"  - step {step['step']}: {step['macs'] / 1e6:.1f}M MACs, {step['pruned']:.2%} "
                         f"after pruning{after}")
        lines += ["", "| layer | channels | parameters | MACs |", "|---|---|---|---|"]
        lines += [f"| `{la['name']}` | {la['channels_before']} -> {la['channels_after']} | "
                  f"{la['params_before']:,} -> {la['params_after']:,} | "
                  f"{la.get('macs_before', 0):,} -> {la.get('macs_after', 0):,} |" for la in pr["layers"]]
    for key, label in (("finetune", "Fine-tuning (hard labels)"), ("distill", "Distillation")):
        run = c.get(key)
        if run:
            lines.append(f"- {label}: {run['epochs_run']} epochs, {run['seconds']} s, best {run['metric']} "
                         f"{run['best_metric']:.2%} at epoch {run['best_epoch']} ({run['stopped']})")
    return [*lines, ""]
