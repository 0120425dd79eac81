"""Package: DIR/ with the artifacts, manifest.json (schema docs/manifest.md) and report.md.

Everything is written into a hidden staging folder next to DIR and moved into place only when
complete, so a failed build leaves no DIR (or the previous DIR untouched). Here: the schema and the
path rules a manifest is held to, file records, write_json, and report.md. Reading a package (the
typed records and the one loader) is packaging/model.py.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from edgekit.ingest import sha256_file
from edgekit.jsonable import strict_jsonable as _jsonable
from edgekit.verify.metrics import describe_slice

MANIFEST_SCHEMA_ID = "edgekit-manifest/1"


def manifest_schema() -> dict[str, Any]:
    return json.loads(resources.files("edgekit.schemas").joinpath("manifest.schema.json").read_text())


def validate_manifest(manifest: dict[str, Any]) -> None:
    """The schema (jsonschema.ValidationError), then every path in it (UnsafeInput): a manifest may
    come from someone else's package."""
    check_manifest_paths(manifest)  # first: an unsafe path is refused as such, not as a schema mismatch
    jsonschema.validate(manifest, manifest_schema())


def schema_problem(manifest: dict[str, Any], missing_only: bool = False, missing_too: bool = True) -> str | None:
    """The first place where the manifest departs from its schema, said in a few words; None when there is
    none. missing_only: only a required field that is absent; missing_too=False: anything but those."""
    schema = manifest_schema()
    errors = jsonschema.validators.validator_for(schema)(schema).iter_errors(manifest)
    wanted = [e for e in errors if (e.validator == "required" or not missing_only)
              and (missing_too or e.validator != "required")]
    error = jsonschema.exceptions.best_match(wanted)
    if error is None:
        return None
    path = list(error.absolute_path)
    at = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
    if len(path) == 2 and path[0] == "artifacts" and isinstance(manifest["artifacts"][path[1]], dict):
        key = manifest["artifacts"][path[1]].get("key")
        at += f" ({key})" if key else ""
    if error.validator == "required":
        field = error.message.split("'")[1] if error.message.count("'") >= 2 else error.message
        return f"{at} has no '{field}'" if at else f"no '{field}' at the top level"
    message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
    return f"{at or 'the top level'}: {message}"


def manifest_path_problems(manifest: dict[str, Any]) -> list[str]:
    """Every path a manifest names, checked as text: relative, no '..', no absolute or drive paths, and
    each artifact's entry and files inside one folder of its own (what a device copy sends is that folder)."""
    from edgekit.untrusted import relative_path_problem

    if not isinstance(manifest, dict):
        return []
    problems = []
    plan = manifest.get("plan")
    if plan is not None and relative_path_problem(plan):
        problems.append(f"plan {plan!r} {relative_path_problem(plan)}")
    artifacts = manifest.get("artifacts")
    for a in artifacts if isinstance(artifacts, list) else []:
        if not isinstance(a, dict):
            continue
        key = a.get("key", "?")
        entry = a.get("entry")
        paths = [("entry", entry)] if entry is not None else []
        files = a.get("files")
        paths += [("file", f.get("path")) for f in files if isinstance(f, dict)] if isinstance(files, list) else []
        for what, rel in paths:
            problem = relative_path_problem(rel)
            if problem:
                problems.append(f"artifact {key} {what} {rel!r} {problem}")
        if problems:
            continue
        folders = {rel.split("/")[0] for _, rel in paths}
        if entry is not None and ("/" not in entry or len(folders) > 1):
            problems.append(f"artifact {key}: entry {entry!r} and its files must lie in one folder of the "
                            "package, the artifact's own")
        elif entry is not None and entry not in {rel for what, rel in paths if what == "file"}:
            problems.append(f"artifact {key}: entry {entry!r} is not one of its files")
    return problems


def check_manifest_paths(manifest: dict[str, Any], where: str = "manifest.json") -> None:
    from edgekit.untrusted import UnsafeInput

    problems = manifest_path_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnsafeInput(f"{where}: {problems[0]}{more}; a package refers only to files inside itself")


def check_package_files(root: str | Path, manifest: dict[str, Any]) -> None:
    """On disk: every artifact path resolves (links followed) inside the package folder, as a regular file."""
    from edgekit.untrusted import UnsafeInput, inside

    check_manifest_paths(manifest, f"{root}/manifest.json")
    for a in manifest.get("artifacts") or []:
        for f in a.get("files") or []:
            path = inside(root, f["path"], f"{root}: artifact {a.get('key')} file")
            if path.exists() and not path.is_file():
                raise UnsafeInput(f"{root}: artifact {a.get('key')} file {f['path']!r} is not a regular file")


def file_records(root: Path, files: list[str]) -> list[dict[str, Any]]:
    return [{"path": f, "bytes": (root / f).stat().st_size, "sha256": sha256_file(root / f)} for f in files]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


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
            # the task metric that decided, and its change against FP32 in points
            "task": (f"{t['metric']} {t['value']:.1f} ({-t['drop_points']:+.1f})" if (t := v.get("task")) else "–"),
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
                         f"SNR {o['snr_db']:.1f} dB, max |err| {o['max_abs_error']:.4g}"
                         + (f"; judged per slice along axis {o['slice_axis']} ({len(o.get('slices') or [])} slices)"
                            if o.get("slice_axis") is not None else ""))
            lines += [f"    - worst slice {describe_slice(w)}" for w in v.get("worst_slices") or []
                      if w["output"] == o["name"]]
        lines += [f"  - Not judged: {n}" for n in v.get("notes") or []]
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
    lines += _task_markdown(manifest)
    lines += _recovery_markdown(manifest)
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


# ---------------------------------------------------------------- task metric and recovery (report.md and .html)

MAX_CLASS_BARS = 20  # classes drawn in the report's per-class chart; all are in the tables


def task_artifacts(manifest: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(artifact, its verification.task) for every artifact a task metric judged."""
    return [(a, t) for a in manifest.get("artifacts") or [] if isinstance(t := (a.get("verification") or {})
                                                                             .get("task"), dict)]


def per_class_rows(manifest: dict[str, Any]) -> list[tuple[str, float | None, dict[str, float | None], float]]:
    """(class, FP32 value, {artifact key: value}, worst drop) for every class, worst drop first: the classes
    INT8 hurt are the ones to read (the FP32 figure is the same reference for every artifact)."""
    ref: dict[str, float | None] = {}
    vals: dict[str, dict[str, float | None]] = {}
    for a, t in task_artifacts(manifest):
        for c in t.get("per_class") or []:
            name = str(c.get("name"))
            ref.setdefault(name, c.get("reference"))
            vals.setdefault(name, {})[a["key"]] = c.get("value")
    rows = []
    for name, r in ref.items():
        drops = [r - v for v in vals[name].values() if r is not None and v is not None]
        rows.append((name, r, vals[name], max(drops, default=0.0)))
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][3], i))  # stable: ties keep the class order
    return [rows[i] for i in order]


def kept_rung(q: dict[str, Any]) -> int | None:
    """Index of the recovery rung whose result was kept: `kept` names its step, its setting or both."""
    kept = q.get("kept")
    rec = q.get("recovery") or []
    if kept is None:
        return None
    for i, r in enumerate(rec):
        names = {str(r.get("step")), str(r.get("setting")), f"{r.get('step')}: {r.get('setting')}",
                 f"{r.get('step')} {r.get('setting')}", f"{r.get('step')} ({r.get('setting')})"}
        if str(kept) in names:
            return i
    # The ladder stops at the first rung that meets the budgets: that one was kept.
    return next((i for i, r in enumerate(rec) if r.get("passed")), None)


def rung_metric(r: dict[str, Any]) -> str:
    """'mAP50-95 37.20': the figure the rung reached (metric may be its name or, in older records, the value)."""
    metric, value = r.get("metric"), r.get("value")
    if isinstance(metric, (int, float)) and not isinstance(metric, bool) and value is None:
        return f"{metric:.2f}"
    return " ".join(x for x in (None if metric is None else str(metric),
                                None if value is None else _fmt(value, ".2f")) if x) or "–"


def _md(x: Any) -> str:
    """A table cell: pipes and line breaks from a manifest must not break the row."""
    return str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _task_markdown(manifest: dict[str, Any]) -> list[str]:
    dt, judged = (manifest.get("data") or {}).get("task") or {}, task_artifacts(manifest)
    if not judged and not dt:
        return []
    lines = ["## Task metric", ""]
    if dt.get("task"):
        vs = "the labels" if dt.get("vs") == "labels" else "the FP32 model's own predictions (no labels)"
        lines.append(f"Judged by {dt.get('metric')} ({dt.get('task')}) against {vs}; an artifact may lose at most "
                     f"{_fmt(dt.get('max_metric_drop'))} points against FP32. Tensor figures are "
                     + ("binding too (--strict-tensors)." if dt.get("strict_tensors") else "diagnostics only."))
        if dt.get("task") == "detect":
            lines.append(f"Decoder {dt.get('decoder')}, NMS IoU {_fmt(dt.get('iou'))}, "
                         f"confidence {_fmt(dt.get('conf'))}.")
    lines += [f"- Note: {_md(n)}" for n in dt.get("notes") or []]
    if not judged:
        return [*lines, "", "No task metric was computed: the tensor figures decided.", ""]
    lines += ["", "| artifact | metric | value | FP32 | drop (points) | budget | vs | mAP50 (FP32) | samples | task | "
              "verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, t in judged:
        m50 = f"{_fmt(t.get('map50'), '.2f')} ({_fmt(t.get('reference_map50'), '.2f')})" \
            if t.get("map50") is not None else "–"
        lines.append(f"| {_md(a['key'])} | {_md(t.get('metric'))} | {_fmt(t.get('value'), '.2f')} | "
                     f"{_fmt(t.get('reference'), '.2f')} | {_fmt(t.get('drop_points'), '.2f')} | "
                     f"{_fmt(t.get('max_drop'))} | {_md(t.get('vs'))} | {m50} | {_fmt(t.get('samples'))} | "
                     f"{'within budget' if t.get('passed') else 'OVER budget'} | "
                     f"{'ok' if a['verification'].get('passed') else 'REJECTED'} |")
    rows = per_class_rows(manifest)
    if rows:
        keys = [a["key"] for a, _ in judged]
        lines += ["", "### Per class (worst drop first)", "",
                  "| class | FP32 | " + " | ".join(map(_md, keys)) + " | worst drop |",
                  "|---|" + "---|" * (len(keys) + 2)]
        lines += [f"| {_md(name)} | {_fmt(r, '.2f')} | " + " | ".join(_fmt(v.get(k), ".2f") for k in keys)
                  + f" | {drop:.2f} |" for name, r, v, drop in rows]
    for a, t in judged:
        v = a["verification"]
        if v.get("tensor_failures"):
            binding = "binding (--strict-tensors)" if dt.get("strict_tensors") else "diagnostics (not binding)"
            lines += ["", f"Tensor figures of {_md(a['key'])}, {binding}:",
                      *[f"- {_md(f)}" for f in v["tensor_failures"]]]
        lines += [f"- {_md(a['key'])}: {_md(n)}" for n in t.get("notes") or [] if n not in (dt.get("notes") or [])]
    return [*lines, ""]


def _recovery_markdown(manifest: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for a in manifest.get("artifacts") or []:
        q = a.get("quantization")
        if not isinstance(q, dict):
            continue
        floats = q.get("exclude_nodes") or []
        lines += [f"### {_md(a['key'])}", "",
                  f"Quantization: {_md(q.get('method'))} calibration on {_fmt(q.get('samples'))} samples"
                  + (f", {len(floats)} node(s) in float" if floats else "")
                  + (f"; kept from the rung {_md(q['kept'])}" if q.get("kept") else "") + "."]
        rec, kept = q.get("recovery") or [], kept_rung(q)
        if not rec:
            lines += ["", "No recovery rung was tried (the first INT8 attempt met the budgets, or --recover none).", ""]
            continue
        lines += ["", "| # | rung | setting | reached | passed | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {i + 1} | {_md(r.get('step'))}{' **(kept)**' if i == kept else ''} | "
                  f"{_md(r.get('setting', ''))} | {_md(rung_metric(r))} | {'yes' if r.get('passed') else 'no'} | "
                  f"{_fmt(r.get('seconds'), '.1f')} |"
                  for i, r in enumerate(rec)]
        lines.append("")
    return ["## INT8 recovery", "", *lines] if lines else []
