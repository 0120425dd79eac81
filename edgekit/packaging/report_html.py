"""report.html: the package's report as one self-contained page (inline CSS, SVG plots drawn here).

The page loads nothing: no fonts, scripts or images from anywhere, and a Content-Security-Policy that
allows only its own inline style and the one script whose hash it carries (table sorting, optional).
Every piece of text from a model or a manifest goes through `esc` (node names are user input).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from pathlib import Path
from typing import Any

from edgekit.errors import BadInput
from edgekit.packaging.manifest import artifact_rows
from edgekit.packaging.report_svg import (
    CSS,
    JS,
    PRECISION_COLORS,
    TOP_LAYERS,
    Point,
    esc,
    hbar_svg,
    layer_chart_svg,
    mb,
    pareto_svg,
    shown_layers,
    si,
)
from edgekit.packaging.report_svg import dot as _dot
from edgekit.packaging.report_svg import fnum as _f
from edgekit.packaging.report_svg import html_table as _table
from edgekit.packaging.report_svg import section as _section
from edgekit.packaging.report_task import recovery_section, task_section

# ---------------------------------------------------------------- summary


def _p50(a: dict[str, Any]) -> float:
    return (a.get("latency_ms") or {}).get("p50") or math.inf


def _headline(m: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The artifact the summary is about: the planner's choice, else the fastest verified one."""
    arts = m.get("artifacts") or []
    chosen = [c["key"] for c in m.get("candidates") or [] if c.get("chosen")]
    for a in arts:
        if a["key"] in chosen:
            return a, "chosen by the planner"
    ok = [a for a in arts if a["verification"]["passed"]]
    if ok:  # a measurement beats an estimate: estimates are for another device
        best = min(ok, key=lambda a: ((a.get("latency_ms") or {}).get("where") == "estimate", _p50(a)))
        return best, "the only artifact" if len(arts) == 1 else f"fastest verified of {len(arts)} artifacts"
    return (arts[0], "no artifact passed") if arts else (None, "nothing was built")


def _card(k: str, v: str, s: str = "", cls: str = "") -> str:
    """A headline figure; v and s are HTML. Long values get a smaller font rather than an ellipsis."""
    small = " sm" if len(re.sub(r"<[^>]+>|&\w+;", "x", v)) > (18 if cls == "wide" else 9) else ""
    return (f'<div class="card {cls}"><div class="k">{esc(k)}</div><div class="v{small}">{v}</div>'
            f'<div class="s">{s}</div></div>')


def _summary(m: dict[str, Any]) -> str:
    a, why = _headline(m)
    spec = m.get("target_spec") or {}
    cards = [_card("Target", esc(m.get("target", "?")), esc(spec.get("kind", "")))]
    if a is not None:
        v, lat = a["verification"], a.get("latency_ms") or {}
        est = " est." if lat.get("where") == "estimate" else ""
        fp32 = next((x["bytes"] for x in m["artifacts"] if x["backend"] == a["backend"] and x["precision"] == "fp32"),
                    (m.get("source") or {}).get("bytes"))
        acc, ref, task = v.get("accuracy"), v.get("reference_accuracy"), v.get("task")
        acc_k = "Accuracy"
        if isinstance(task, dict):  # the task metric decided the verdict: it is the figure to read first
            drop = task.get("drop_points")
            acc_k, acc_v = str(task.get("metric")), _f(task.get("value"), ".2f")
            acc_s = (f"FP32 {_f(task.get('reference'), '.2f')} ({_f(None if drop is None else -drop + 0.0, '+.2f')} "
                     f"points; vs {task.get('vs')})")
        elif acc is not None and ref is not None:
            acc_v, acc_s = f"{acc:.1%}", f"FP32 {ref:.1%} ({(acc - ref) * 100:+.2f} points)"
        else:
            agr = v.get("top1_agreement")
            acc_v = f"{agr:.1%}" if agr is not None else f"{v['cosine_min']:.4f}"
            acc_s = "top-1 agreement with FP32" if agr is not None else "cosine vs FP32 (no labels)"
        vs_ort = a.get("speedup_vs_onnxruntime_fp32")
        cards += [
            _card("Chosen" if v["passed"] else "Best attempt", f'{_dot(a["backend"])}{esc(a["key"])}', esc(why),
                  "wide"),
            _card("Size", mb(a["bytes"]), f"{a['bytes']:,} B" + (f", {a['bytes'] / fp32:.0%} of FP32" if fp32 else "")),
            _card("Latency p50" + est, _f(lat.get("p50"), ".3f", " ms"), "p99 " + _f(lat.get("p99"), ".3f", " ms")
                  + f" · {esc(lat.get('where', ''))}"),
            _card("Speedup vs FP32", _f(a.get("speedup"), ".2f", "×"), f"same backend; {_f(vs_ort, '.2f', '×')} "
                  "vs ONNX Runtime FP32"),
            _card(acc_k, esc(acc_v), esc(acc_s)),
        ]
    ok = bool(m.get("passed"))
    failed_n = sum(not x["verification"]["passed"] for x in m.get("artifacts", []))
    cards.insert(2 if a is not None else 1, _card(  # row 1: target, chosen, verdict; row 2: its figures
        "Verdict", "passed" if ok else "REJECTED",
        "every artifact verified" if ok else f"{failed_n} artifact(s) failed", "ok" if ok else "bad"))
    reasons = "".join(f"<li>{esc(r)}</li>" for r in m.get("plan_reasons") or [])
    failed = "".join(f'<li class="bad">{esc(f["key"])} was not built: {esc(f["error"])}</li>'
                     for f in m.get("failed_artifacts") or [])
    rows = artifact_rows(m) if m.get("artifacts") else []
    cols = ["precision", "bytes", "size", "p50 ms", "p99 ms", "speedup", "vs ORT fp32", "accuracy", "cosine",
            "verdict"]
    body = [[_dot(r["backend"]) + esc(r["backend"]), *[esc(r[c]) for c in cols]] for r in rows]
    bad = ["bad" if r["verdict"] != "ok" else "" for r in rows]
    table = _table(["backend", *cols], body, set(range(2, 10)), row_cls=bad) if rows else ""
    warnings = "".join(f'<p class="bad"><b>Warning:</b> {esc(w)}</p>'
                       for w in (m.get("data") or {}).get("warnings") or [])
    return _section("summary", "Summary", f'{warnings}<div class="cards four">{"".join(cards)}</div>'
                    + (f"<h3>Plan</h3><ul>{reasons}{failed}</ul>" if reasons or failed else "")
                    + f"<h3>Artifacts</h3>{table}<p class=note>Speedup: the same backend's FP32 p50 over the "
                    "artifact's; size vs the same backend's FP32; accuracy and agreement in %; est. = cost-model "
                    "estimate, not a measurement. Click a column to sort.</p>")


# ---------------------------------------------------------------- Pareto plot


def _points(m: dict[str, Any]) -> tuple[list[Point], str]:
    """Candidates (planner) or artifacts, on latency x and the best agreement figure the data has."""
    cands = m.get("candidates")
    if cands:
        metric = "accuracy" if any(c.get("accuracy") is not None for c in cands) else "cosine"
        pts = [Point(c["key"], c["backend"], c["measured_ms"] if c.get("measured_ms") is not None
                      else c["estimated_ms"], c.get(metric), int(c.get("bytes") or 0), c.get("measured_ms") is not None,
                      c.get("verdict") == "ok", bool(c.get("chosen")),
                      f"{c['key']}: {c.get('verdict')}, {c.get('reason') or ''}") for c in cands]
        return pts, metric
    arts = m.get("artifacts") or []
    vs = [a["verification"] for a in arts]
    metric = next((k for k in ("accuracy", "top1_agreement") if vs and all(v.get(k) is not None for v in vs)),
                  "cosine_min")
    head, _ = _headline(m)
    return [Point(a["key"], a["backend"], _p50(a), v.get(metric), a["bytes"],
                   (a.get("latency_ms") or {}).get("where") != "estimate", v["passed"], a is head,
                   f"{a['key']}: {'ok' if v['passed'] else 'rejected: ' + '; '.join(v['failures'])}")
            for a, v in zip(arts, vs) if _p50(a) < math.inf], metric


def _pareto_section(m: dict[str, Any]) -> str:
    what = "candidate" if m.get("candidates") else "artifact"
    body = f'<figure class="plot">{pareto_svg(*_points(m))}<figcaption>Each point is one {what}: ' \
           "x its p50 latency, y its agreement with the reference, area its size. The dashed line joins the " \
           "Pareto front of verified points (nothing else is both faster and more accurate). Hollow markers " \
           "are cost-model estimates, not measurements. Hover a point for details.</figcaption></figure>"
    cands = m.get("candidates")
    if cands:
        head = ["candidate", "float nodes", "prune", "est. ms", "measured ms", "bytes", "accuracy", "cosine",
                "verdict", "reason"]
        rows = [[_dot(c["backend"]) + esc(c["key"]) + (" <b>chosen</b>" if c.get("chosen") else ""),
                 esc(c.get("float_nodes", 0)), _f(c.get("prune_ratio"), ".2f"), _f(c.get("estimated_ms")),
                 _f(c.get("measured_ms")), f"{int(c.get('bytes') or 0):,}",
                 _f(None if c.get("accuracy") is None else c["accuracy"] * 100, ".2f", "%"), _f(c.get("cosine"), ".5f"),
                 esc(c.get("verdict")), esc(c.get("reason") or "")] for c in cands]
        body += "<h3>Candidates</h3>" + _table(head, rows, {1, 2, 3, 4, 5, 6, 7},
                                               row_cls=["" if c.get("verdict") == "ok" else "dim" for c in cands])
    body += _cost_model_note(m.get("cost_model") or {})
    return _section("pareto", "Latency, accuracy and size", body)


def _cost_model_note(cm: dict[str, Any]) -> str:
    """How far the cost model's estimates were from the candidates measured on the target."""
    if not cm:
        return ""
    fit = cm.get("fit") or {}
    if cm.get("mape_percent") is not None:
        text = (f"Cost model: mean absolute percentage error {cm['mape_percent']}% against the "
                f"{cm.get('compared')} candidates measured on the target.")
    else:
        text = "Cost model: nothing could be measured on the target here; the latencies above are its estimates."
    if fit.get("points"):
        text += (f" Fitted to {fit['points']} measurements of the target ({esc(', '.join(fit.get('sources', [])))}),"
                 f" which it reproduces within {fit.get('fit_mape_percent')}% on average.")
    return f'<p class="note">{text}</p>'  # numbers, and the sources escaped above


# ---------------------------------------------------------------- the other sections


def _layers_section(m: dict[str, Any]) -> str:
    layers = m.get("layers")
    if not layers:
        return _section("layers", "Per layer", "<p class=note>Per-layer data was not recorded in this package "
                        "(it was built before edgekit recorded it). <code>edgekit inspect MODEL</code> lists the "
                        "MACs of every layer.</p>")
    keys = {a["key"]: a["backend"] for a in m.get("artifacts") or []}
    pkeys = [k for k in keys if any(k in (la.get("precision") or {}) for la in layers)]
    legend = "".join(f'<span class="chip" style="background:{c};color:{"#fff" if p == "int8" else "#1f2328"}">'
                     f'{p}</span>' for p, c in PRECISION_COLORS.items() if p != "bf16") \
        + '<span class="chip" style="border:1px solid #d1d9e0">–</span> (follows its neighbours)'

    precs = sorted({p for la in layers for p in (la.get("est_ms") or {})})
    head = ["node", "op", "output", "params", "MACs", "% MACs", "measured ms", *[f"est. {p} ms" for p in precs],
            "sens. dB", *map(esc, pkeys)]
    total = sum(la.get("macs") or 0 for la in layers) or 1
    rows = [[esc(la.get("node")), esc(la.get("op_type")), esc(la.get("output_shape")),
             f"{int(la.get('params') or 0):,}", f"{int(la.get('macs') or 0):,}",
             f"{100 * (la.get('macs') or 0) / total:.1f}", _f(la.get("measured_ms"), ".4f"),
             *[_f((la.get("est_ms") or {}).get(p), ".4f") for p in precs], _f(la.get("sensitivity_db"), ".1f"),
             *[esc((la.get("precision") or {}).get(k, "")) for k in pkeys]] for la in layers]
    shown, folded = shown_layers(layers, TOP_LAYERS)
    return _section("layers", "Per layer", f"<p class=note>MACs and time per layer (time: ONNX Runtime FP32 on the "
                    "build host where measured, solid; cost-model estimate where not, hatched), INT8 sensitivity "
                    "(output SNR gained by keeping the layer in float: taller = keep in float first), and the "
                    f"precision each artifact runs it in: {legend}."
                    + (f" The {len(shown)} largest of {len(layers)} layers are drawn, the rest folded into one row."
                       if folded else "") + "</p>"
                    + f'<div class="hscroll">{layer_chart_svg(layers, keys)}</div>'
                    + f"<details><summary>All {len(layers)} layers as a table</summary><div class=scroll>"
                    + _table(head, rows, set(range(3, len(head) - len(pkeys))) - {2}) + "</div></details>")


def _debug_table(package_dir: Path | None, key: str) -> str:
    """The per-layer agreement table a rejected artifact leaves in debug/KEY.json (edgekit/verify/localise.py)."""
    from edgekit.untrusted import inside, load_json

    try:  # the key is the manifest's: the file it names must stay inside the package
        path = inside(package_dir, f"debug/{key}.json", "per-layer table") if package_dir else None
    except BadInput as e:
        return f"<p class=note>debug/{esc(key)}.json could not be read: {esc(e)}</p>"
    if path is None or not path.is_file():
        return f"<p class=note>No per-layer table (debug/{esc(key)}.json) in this package.</p>"
    try:
        loc = load_json(path, "per-layer table")  # bounded, as every file a package hands edgekit
        first = (loc.get("first_divergence") or {}).get("tensor")
        thr = float(loc.get("threshold", 0.99))
        rows, cls = [], []
        for la in loc["layers"]:
            rows.append([esc(la["node"]), esc(la["op_type"]), esc(la["tensor"]), esc(la["matched_by"]),
                         f"{la['cosine']:.5f}", f"{la['snr_db']:.1f}", f"{la['max_abs_error']:.4g}"])
            cls.append("first" if la["tensor"] == first else "below" if la["cosine"] < thr else "")
    except (BadInput, OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # damaged: not the whole report
        return f"<p class=note>debug/{esc(key)}.json could not be read: {esc(e)}</p>"
    return (f"<p class=note>Layer by layer against the FP32 reference ({loc.get('compared')} matched tensors, "
            f"threshold cosine {thr}); the first diverging layer is highlighted.</p><div class=scroll>"
            + _table(["node", "op", "tensor", "matched by", "cosine", "SNR dB", "max |err|"], rows, {4, 5, 6},
                     cls="diverging", row_cls=cls) + "</div>")


def _verification_section(m: dict[str, Any], package_dir: Path | None) -> str:
    arts = m.get("artifacts") or []
    rows = []
    for a in arts:
        v = a["verification"]
        acc, ref = v.get("accuracy"), v.get("reference_accuracy")
        rows.append([_dot(a["backend"]) + esc(a["key"]), esc(v.get("samples")), _f(v.get("cosine_min"), ".5f"),
                     _f(v.get("snr_db_min"), ".1f"), _f(v.get("max_abs_error"), ".4g"),
                     _f(None if v.get("top1_agreement") is None else v["top1_agreement"] * 100, ".2f"),
                     _f(None if acc is None else acc * 100, ".2f"), _f(None if ref is None else ref * 100, ".2f"),
                     _f(None if acc is None or ref is None else (acc - ref) * 100, "+.2f"),
                     '<span class="badge ok">ok</span>' if v["passed"] else
                     '<span class="badge bad">rejected</span> ' + esc("; ".join(v.get("failures") or []))])
    th = m.get("thresholds") or {}
    body = (f"<p class=note>Every artifact against ONNX Runtime FP32 of the canonical model, on held-out samples. "
            f"Thresholds: cosine ≥ {esc(th.get('min_cosine'))}, SNR ≥ {esc(th.get('min_snr_db'))} dB, top-1 "
            f"agreement ≥ {esc(th.get('min_top1_agreement'))}, accuracy drop ≤ {esc(th.get('max_accuracy_drop'))} "
            "points"
            + (f"; score-like output slices: score IoU ≥ {esc(th['min_score_iou'])}, rank correlation ≥ "
               f"{esc(th.get('min_rank_correlation'))}" if th.get("min_score_iou") is not None else "")
            + ".</p>" + _table(["artifact", "samples", "cosine", "SNR dB", "max |err|", "top-1 agr. %",
                                    "accuracy %", "FP32 %", "Δ points", "verdict"], rows, set(range(1, 9))))
    body += _slices_table(arts)
    for a in arts:
        v = a["verification"]
        if v["passed"]:
            continue
        d = v.get("diverging_layer")
        body += f'<h3 class="bad">{esc(a["key"])} rejected</h3><ul>' + "".join(
            f"<li>{esc(f)}</li>" for f in v.get("failures") or []) + "</ul>"
        if d:
            seen = f' (observed at <code>{esc(d["observed_at"])}</code>, fused with it)' if d.get("observed_at") else ""
            label = "Layer adding the most error" if d.get("criterion") == "most added error" \
                else "First diverging layer"
            body += (f'<p>{label}: <b><code>{esc(d.get("node"))}</code></b> '
                     f'({esc(d.get("op_type"))}){seen}, '
                     f'cosine {_f(d.get("cosine"), ".4f")}, SNR {_f(d.get("snr_db"), ".1f")} dB, max |err| '
                     f'{_f(d.get("max_abs_error"), ".4g")}; inputs from '
                     f'{esc(", ".join(d.get("inputs_from") or []) or "the model input")}; '
                     f'feeds {esc(", ".join(d.get("feeds") or []) or "the output")}.</p>')
        body += _debug_table(package_dir, a["key"])
    return _section("verification", "Verification", body)


def _slices_table(arts: list[dict[str, Any]]) -> str:
    """The worst slices of each sliced output, per artifact: where a part on its own scale (a detector's
    scores beside its pixel boxes) was judged, and how close it came to a threshold."""
    rows, cls = [], []
    for a in arts:
        for w in a["verification"].get("worst_slices") or []:
            missed = w.get("failed") or []
            rows.append([_dot(a["backend"]) + esc(a["key"]), f"<code>{esc(w['output'])}</code>",
                         f"{esc(w['index'])} (axis {esc(w['axis'])})", _f(w.get("cosine"), ".4f"),
                         _f(w.get("centred_cosine"), ".4f"), _f(w.get("snr_db"), ".1f"), _f(w.get("score_iou"), ".3f"),
                         _f(w.get("rank_correlation"), ".3f"),
                         "constant: not judged" if w.get("constant") else
                         ('<span class="badge bad">missed</span> ' + esc(", ".join(missed)) if missed
                          else '<span class="badge ok">ok</span>')])
            cls.append("bad" if missed else "")
    if not rows:
        return ""
    return ("<h3>Worst output slices</h3><p class=note>Outputs with a channel-like axis (box coordinates beside "
            "scores, one row per class) are judged slice by slice with the same thresholds; score-like slices "
            "(values in [0, 1]) also on the IoU of their sets above 0.25 and on rank correlation. The worst "
            "slices of each output:</p>"
            + _table(["artifact", "output", "slice", "cosine", "centred cos.", "SNR dB", "score IoU", "rank corr.",
                      "verdict"], rows, {3, 4, 5, 6, 7}, row_cls=cls))


STAGE_ORDER = ("original", "pruned", "low-rank", "fine-tuned (hard labels)", "distilled")
STAGE_COLORS = ("#8c959f", "#E69F00", "#999933", "#56B4E9", "#009E73")


def _compression_section(m: dict[str, Any]) -> str:
    c = m.get("compression")
    if not c:
        return ""
    acc = c.get("accuracy") or {}
    stages = sorted(acc, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    items = [(s, float(acc[s]), STAGE_COLORS[STAGE_ORDER.index(s)] if s in STAGE_ORDER else "#882255",
              f"{acc[s]:.2%}") for s in stages if acc[s] is not None]
    lb, la = (c.get("latency_before_ms") or {}).get("p50"), (c.get("latency_after_ms") or {}).get("p50")
    drop, ok = c.get("accuracy_drop_points"), c.get("passed")
    cards = [_card("MACs", f"{si(c.get('macs_before') or 0)} → {si(c.get('macs_after') or 0)}",
                   _f(c.get("macs_ratio"), ".0%") + " of the original"),
             _card("Parameters", f"{si(c.get('params_before') or 0)} → {si(c.get('params_after') or 0)}"),
             _card("FP32 p50", f"{_f(lb)} → {_f(la, '.3f', ' ms')}", "ONNX Runtime, same interleaved rounds"),
             _card("Speedup", _f(c.get("speedup_fp32"), ".2f", "×"), "compressed FP32 vs original FP32"),
             _card("Accuracy change", _f(None if drop is None else -drop, "+.2f", " points"),
                   "within the budget" if ok else "OVER the budget", "ok" if ok else "bad")]
    pr = c.get("prune") or {}
    st = pr.get("settings") or {}
    lines = [f"Pruning: {esc(st.get('importance'))} importance, ratio {esc(st.get('ratio'))}, channels rounded to "
             f"{esc(pr.get('round_to'))} ({esc(pr.get('round_to_reason'))})"] if pr else []
    for key, label in (("finetune", "Fine-tuning (hard labels)"), ("distill", "Distillation")):
        run = c.get(key) or {}
        if run:
            lines.append(f"{label}: {esc(run.get('epochs_run'))} epochs, {esc(run.get('seconds'))} s, best "
                         f"{_f(run.get('best_metric'), '.2%')} at epoch {esc(run.get('best_epoch'))} "
                         f"({esc(run.get('stopped'))})")
    return _section("compression", "Compression", f'<div class="cards">{"".join(cards)}</div>'
                    f"<h3>{esc(c.get('metric', 'accuracy')).replace('_', ' ')} after each stage</h3>"
                    f'<figure class="plot">{hbar_svg(items, 100, "%")}<figcaption>The axis starts near the lowest '
                    "value, not at zero.</figcaption></figure><ul>" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>")


def _device_section(m: dict[str, Any]) -> str:
    arts = [a for a in m.get("artifacts") or [] if a.get("device_latency_ms")]
    if not arts:
        return ""
    rows = []
    for a in arts:
        d, host = a["device_latency_ms"], a.get("host_latency_ms") or {}
        cond = d.get("conditions") or {}
        temps = (f"{_f(_hottest(cond.get('temperature_c')), '.0f')} → "
                 f"{_f(_hottest(cond.get('temperature_c_after')), '.0f', ' °C')} (hottest zone)")
        rows.append([_dot(a["backend"]) + esc(a["key"]), esc(d.get("where")), _f(d.get("p50")), _f(d.get("p90")),
                     _f(d.get("p99")), esc(d.get("runs")), esc(d.get("threads")), _f(host.get("p50")),
                     esc(", ".join(f"{k} {v}" for k, v in cond.items() if v is not None and "temperature" not in k)
                         or "–"), temps])
    return _section("device", "Measured on the device", _table(
        ["artifact", "device", "p50 ms", "p90 ms", "p99 ms", "runs", "threads", "build host p50 ms", "conditions",
         "temperature"], rows, {2, 3, 4, 5, 6, 7}) + "<p class=note>Measured over SSH with <code>edgekit profile"
        "</code>; each record is also kept in <code>profiles/</code>.</p>")


def _hottest(zones: Any) -> float | None:
    """The runner records {thermal zone: °C} before and after timing; the hottest zone is what throttles."""
    values = [v for v in (zones or {}).values() if isinstance(v, (int, float))] if isinstance(zones, dict) else []
    return max(values) if values else None


def _kv(pairs: list[tuple[str, Any]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs
                                          if v not in (None, "", [])) + "</table>"


def _environment_section(m: dict[str, Any]) -> str:
    tool = m.get("toolchain") or {}
    host = m.get("host") or {}
    t = m.get("target_spec") or {}
    src = m.get("source") or {}
    chips = "".join(f"<span>{esc(f)}</span>" for f in host.get("isa") or [])
    peaks = ", ".join(f"{esc(p)} {esc(v)}" for p, v in (t.get("peak_tops") or {}).items())
    mem = t.get("memory") or {}
    io = "<br>".join(f"{kind} <code>{esc(x['name'])}</code> {esc(x['shape'])} {esc(x['dtype'])}"
                     for kind, key in (("in", "inputs"), ("out", "outputs")) for x in m.get(key) or [])
    return _section("environment", "Environment", '<div class="cols"><div><h3>Toolchain</h3>'
                    + _kv([(k, esc(v)) for k, v in tool.items()]) + "<h3>Build host</h3>"
                    + _kv([("CPU", esc(host.get("model"))), ("arch", esc(host.get("arch"))),
                           ("cores", esc(host.get("cores"))), ("GHz", esc(host.get("freq_ghz"))),
                           ("ISA", f'<div class="chips">{chips}</div>')])
                    + "</div><div><h3>Target</h3>"
                    + _kv([("name", esc(t.get("name", m.get("target")))), ("kind", esc(t.get("kind"))),
                           ("description", esc(t.get("description"))),
                           ("backends", esc(", ".join(t.get("backends") or []))),
                           ("precisions", esc(", ".join(t.get("precisions") or []))), ("peak TOPS", peaks),
                           ("memory", esc(f"{mem.get('size_gb')} GB, {mem.get('bandwidth_gbps')} GB/s")
                            if mem else "")])
                    + "<h3>Model and data</h3>"
                    + _kv([("source", f"<code>{esc(src.get('path'))}</code>"),
                           ("sha256", f"<code>{esc(src.get('sha256'))}</code>"),
                           ("size", mb(src.get("bytes"))), ("parameters", f"{src.get('params') or 0:,}"),
                           ("MACs", si(src.get("macs") or 0)), ("opset", esc(src.get("opset"))), ("tensors", io),
                           ("ingest", "<br>".join(esc(n) for n in src.get("notes") or [])),
                           *[(k, esc(v)) for k, v in (m.get("data") or {}).items() if k != "warnings"]])
                    + "</div></div><h3>Command</h3><pre>" + esc(host.get("command", "(not recorded)")) + "</pre>")


# ---------------------------------------------------------------- page

def render_html(manifest: dict[str, Any], package_dir: Path | None = None) -> str:
    """The whole page. package_dir (the package folder) lets it include debug/KEY.json tables."""
    m = manifest
    src = m.get("source") or {}
    name = Path(str(src.get("path", "model"))).name
    sections = [_summary(m), task_section(m, package_dir), _pareto_section(m), _layers_section(m),
                _verification_section(m, package_dir), recovery_section(m), _compression_section(m),
                _device_section(m), _environment_section(m)]
    titles = {"summary": "Summary", "task": "Task metric", "pareto": "Trade-offs", "layers": "Per layer",
              "verification": "Verification", "recovery": "INT8 recovery", "compression": "Compression",
              "device": "Device", "environment": "Environment"}
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in titles.items() if f'<section id="{k}">' in "".join(sections))
    sha = base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode()
    # No request can leave the page: nothing but the inline style, this exact script and images beside the page
    # (the package's report-images/ thumbnails) are allowed.
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{sha}'; img-src 'self' data:"
    verdict = '<span class="badge ok">passed</span>' if m.get("passed") else '<span class="badge bad">REJECTED</span>'
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>edgekit: {esc(name)} for {esc(m.get('target'))}</title><style>{CSS}</style></head><body>"
            f'<header><div class="wrap"><h1>{esc(name)} → {esc(m.get("target"))} {verdict}</h1>'
            f'<div class="sub">{si(src.get("params") or 0)} parameters · {si(src.get("macs") or 0)} MACs · '
            f'built {esc(m.get("created", "?"))} with edgekit {esc(m.get("edgekit", "?"))}</div>'
            f'<nav>{nav}</nav></div></header><main class="wrap">{"".join(sections)}'
            f"<footer>Written by edgekit from manifest.json ({esc(m.get('schema', ''))}); regenerate with "
            f"<code>edgekit report PACKAGE</code>.</footer></main><script>{JS}</script></body></html>\n")
