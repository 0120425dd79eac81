"""report.html's task-metric and INT8-recovery sections (issue 14): the metric that decided each artifact,
per-class bars, boxes drawn over a few validation images, and what each rung of the recovery ladder reached.

The images are the package's own report-images/ thumbnails, referenced by a relative src (the page's policy
allows images from beside it only); a path that is not a plain relative one inside the package is not used.
Every string from the manifest goes through `esc`: a package, and its class names, can come from anyone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit.packaging.manifest import MAX_CLASS_BARS, kept_rung, per_class_rows, rung_metric, task_artifacts
from edgekit.packaging.report_svg import _Scale, dot, esc, fnum, html_table, section

# Okabe-Ito, one per artifact in the per-class chart; FP32 (the same reference for all) in grey.
SERIES_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#999933")
REFERENCE_COLOR = "#8c959f"
BOX_COLORS = {"truth": "#1a7f37", "reference": "#0072B2", "artifact": "#D55E00"}
THUMBNAIL = 320  # the longest side of a report-images/ JPEG (pipeline/assemble.py writes them)
SHOWN_PX = 200  # small thumbnails (a 64-px model input) are drawn larger, boxes scaling with them
SAFE_SRC = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*\Z")  # no scheme, query or markup in an <img src>


# ---------------------------------------------------------------- the task metric


def task_section(m: dict[str, Any], package_dir: Path | None = None) -> str:
    dt, judged = (m.get("data") or {}).get("task") or {}, task_artifacts(m)
    if not judged and not dt:
        return ""
    body = _intro(dt)
    if not judged:
        return section("task", "Task metric", body + "<p class=note>No task metric was computed: the tensor "
                       "figures decided (see Verification).</p>")
    body += _headline_table(judged) + _per_class(m, judged) + _examples(m, judged, package_dir)
    body += _diagnostics(judged, dt)
    return section("task", "Task metric", body)


def _intro(dt: dict[str, Any]) -> str:
    notes = "".join(f"<li>{esc(n)}</li>" for n in dt.get("notes") or [])
    if not dt.get("task"):
        return f"<ul>{notes}</ul>" if notes else ""
    vs = "the labels" if dt.get("vs") == "labels" else "the FP32 model's own predictions (the data has no labels)"
    text = (f"Each artifact is judged by <b>{esc(dt.get('metric'))}</b> ({esc(dt.get('task'))}) against {vs}, on "
            f"the held-out samples; it may lose at most {esc(dt.get('max_metric_drop'))} points against FP32. "
            + ("The tensor figures bind too (<code>--strict-tensors</code>)." if dt.get("strict_tensors") else
               "The tensor figures (cosine, SNR) are kept as diagnostics; they do not decide."))
    if dt.get("task") == "detect":
        text += (f" Boxes: decoder {esc(dt.get('decoder'))}, NMS IoU {esc(dt.get('iou'))}, confidence floor "
                 f"{esc(dt.get('conf'))}.")
    return f"<p class=note>{text}</p>" + (f"<ul>{notes}</ul>" if notes else "")


def _headline_table(judged: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    rows, cls = [], []
    for a, t in judged:
        drop = t.get("drop_points")  # shown as the change, "+ 0.0" so that no change reads +0.00, not -0.00
        map50 = (f"{fnum(t.get('map50'), '.2f')} (FP32 {fnum(t.get('reference_map50'), '.2f')})"
                 if t.get("map50") is not None else "–")
        ok = bool(a["verification"].get("passed"))
        rows.append([dot(a["backend"]) + esc(a["key"]), esc(t.get("metric")), fnum(t.get("value"), ".2f"),
                     fnum(t.get("reference"), ".2f"), fnum(None if drop is None else -drop + 0.0, "+.2f"),
                     esc(fnum(t.get("max_drop"), "g")), "labels" if t.get("vs") == "labels" else "FP32 predictions",
                     map50, esc(t.get("samples")),
                     '<span class="badge ok">within budget</span>' if t.get("passed") else
                     '<span class="badge bad">over budget</span>',
                     '<span class="badge ok">ok</span>' if ok else '<span class="badge bad">rejected</span>'])
        cls.append("" if ok else "bad")
    return html_table(["artifact", "metric", "value", "FP32", "Δ points", "max drop", "vs", "mAP50", "samples",
                       "task metric", "verdict"], rows, {2, 3, 4, 5, 8}, row_cls=cls)


def _series(judged: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[tuple[str, str]]:
    return [("FP32", REFERENCE_COLOR), *[(a["key"], SERIES_COLORS[i % len(SERIES_COLORS)])
                                         for i, (a, _) in enumerate(judged)]]


def _per_class(m: dict[str, Any], judged: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    rows = per_class_rows(m)
    if not rows:
        return ""
    keys = [a["key"] for a, _ in judged]
    series = _series(judged)
    shown = rows[:MAX_CLASS_BARS]
    metric = esc(judged[0][1].get("metric"))
    legend = "".join(f'<span class="chip" style="background:{c};color:#fff">{esc(n)}</span>' for n, c in series)
    more = len(rows) - len(shown)
    chart = grouped_hbar_svg([(name, [r, *[v.get(k) for k in keys]]) for name, r, v, _ in shown], series)
    table = html_table(["class", "FP32", *map(esc, keys), "worst drop"],
                       [[esc(name), fnum(r, ".2f"), *[fnum(v.get(k), ".2f") for k in keys], fnum(d, ".2f")]
                        for name, r, v, d in rows], set(range(1, len(keys) + 3)))
    return (f"<h3>{metric} per class</h3><p class=note>{legend}</p>"
            f'<figure class="plot"><div class="hscroll">{chart}</div><figcaption>FP32 and each artifact, the '
            f"classes with the largest drop first"
            + (f"; {more} more class{'es' if more > 1 else ''} with smaller drops are in the table" if more else "")
            + ". The axis starts near the lowest value, not at zero.</figcaption></figure>"
            f"<details><summary>All {len(rows)} classes as a table</summary><div class=scroll>{table}</div></details>")


def grouped_hbar_svg(groups: list[tuple[str, list[float | None]]], series: list[tuple[str, str]]) -> str:
    """One group of horizontal bars per label, one bar per series (name, colour), on a shared axis that
    starts near the smallest value (a 1-point drop must be visible). None: no bar, a dash."""
    vals = [float(v) for _, vs in groups for v in vs if v is not None]
    if not vals:
        return ""
    L, R, bar, gap = 200, 620, 12, 10
    lo, hi = min(vals), max(vals)
    s = _Scale([*vals, lo - 0.25 * ((hi - lo) or abs(hi) * 0.02)], L, R, cap=100.0)
    gh = bar * len(series) + gap
    H = 10 + gh * len(groups) + 24
    out = [f'<svg class="gbar" viewBox="0 0 {R + 60} {H}" width="{R + 60}" height="{H}" role="img" '
           'aria-label="per-class metric, FP32 and each artifact">']
    for t in s.ticks:
        out.append(f'<line x1="{s(t):.1f}" y1="6" x2="{s(t):.1f}" y2="{H - 22}" stroke="#eaeef2"/>'
                   f'<text x="{s(t):.1f}" y="{H - 8}" text-anchor="middle" class="tick">{s.label(t)}</text>')
    for i, (label, vs) in enumerate(groups):
        y0 = 10 + gh * i
        short = label if len(label) <= 30 else label[:29] + "…"
        out.append(f'<g class="group"><text x="{L - 8}" y="{y0 + bar * len(series) / 2 + 4:.1f}" text-anchor="end" '
                   f'class="tick"><title>{esc(label)}</title>{esc(short)}</text>')
        for j, ((name, color), v) in enumerate(zip(series, vs)):
            y = y0 + bar * j
            if v is None:
                out.append(f'<text x="{L + 4}" y="{y + bar - 2}" class="tick dim">–</text>')
                continue
            x = max(s(float(v)) - L, 1.5)
            out.append(f'<rect class="bar" x="{L}" y="{y + 1}" width="{x:.1f}" height="{bar - 2}" fill="{color}">'
                       f'<title>{esc(label)}, {esc(name)}: {float(v):.2f}</title></rect>'
                       f'<text x="{L + x + 4:.1f}" y="{y + bar - 2}" class="tick">{float(v):.1f}</text>')
        out.append("</g>")
    return "".join(out) + "</svg>"


def _diagnostics(judged: list[tuple[dict[str, Any], dict[str, Any]]], dt: dict[str, Any]) -> str:
    """The tensor figures' misses of artifacts the task metric judged: why a cosine of 0.73 still passed."""
    items = [f"<li><b>{esc(a['key'])}</b>: {esc(f)}</li>" for a, _ in judged
             for f in a["verification"].get("tensor_failures") or []]
    notes = [f"<li><b>{esc(a['key'])}</b>: {esc(n)}</li>" for a, t in judged for n in t.get("notes") or []
             if n not in (dt.get("notes") or [])]
    out = ""
    if items:
        binding = dt.get("strict_tensors")
        out += (f"<h3>Tensor figures: {'binding (--strict-tensors)' if binding else 'diagnostics (not binding)'}"
                "</h3><p class=note>What the tensor figures missed; "
                + ("with --strict-tensors they fail the artifact too." if binding else
                   "the task metric decided the verdict, so these are for finding where the error comes from.")
                + f"</p><ul>{''.join(items)}</ul>")
    return out + (f"<h3>Notes</h3><ul>{''.join(notes)}</ul>" if notes else "")


# ---------------------------------------------------------------- boxes over the validation images


def _examples(m: dict[str, Any], judged: list[tuple[dict[str, Any], dict[str, Any]]],
              package_dir: Path | None) -> str:
    with_ex = [(a, t) for a, t in judged if isinstance(t.get("examples"), list) and t["examples"]]
    if not with_ex:
        return ""
    name = class_namer(m, judged)
    worst = max(range(len(with_ex)), key=lambda i: with_ex[i][1].get("drop_points") or 0)
    truth = any(ex.get("truth") for _, t in with_ex for ex in t["examples"] if isinstance(ex, dict))
    legend = ((f'<span class="chip" style="border:2px dashed {BOX_COLORS["truth"]}">ground truth</span>'
               if truth else "")
              + f'<span class="chip" style="border:2px solid {BOX_COLORS["reference"]}">FP32</span>'
              f'<span class="chip" style="border:2px solid {BOX_COLORS["artifact"]}">the artifact (labelled)</span>')
    out = [f"<h3>Boxes on a few validation images</h3><p class=note>{legend} Detections with confidence of "
           "at least 0.25, as a deployment would show them; hover a box for its class and score.</p>"]
    for i, (a, t) in enumerate(with_ex):
        figs = "".join(example_figure(ex, j, name, a["key"], package_dir) for j, ex in enumerate(t["examples"])
                       if isinstance(ex, dict))
        out.append(f'<details{" open" if i == worst else ""}><summary>{esc(a["key"])}: '
                   f'{len(t["examples"])} images</summary><div class="examples">{figs}</div></details>')
    return "".join(out)


def class_namer(m: dict[str, Any], judged: list[tuple[dict[str, Any], dict[str, Any]]]) -> Callable[[int], str]:
    """Class index -> name: the package's labels, else the per-class names (in class order), else 'class k'."""
    labels = m.get("labels")
    names = [str(x) for x in labels] if isinstance(labels, list) and labels else \
        [str(c.get("name")) for c in (judged[0][1].get("per_class") or []) if isinstance(c, dict)]
    return lambda k: names[k] if 0 <= k < len(names) else f"class {k}"


def _rows(boxes: Any) -> list[tuple[float, float, float, float, int, float | None]]:
    """[x1, y1, x2, y2, cls, score] rows that are numbers; anything else in a foreign manifest is skipped."""
    out = []
    for b in boxes if isinstance(boxes, list) else []:
        try:
            x1, y1, x2, y2 = (float(v) for v in b[:4])
            cls, score = int(b[4]), (float(b[5]) if len(b) > 5 and b[5] is not None else None)
        except (TypeError, ValueError, IndexError):
            continue
        if all(map(math.isfinite, (x1, y1, x2, y2))):
            out.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), cls, score))
    return out


def thumbnail_size(width: float, height: float, box: int = THUMBNAIL) -> tuple[int, int]:
    """The size Pillow's Image.thumbnail((box, box)) gives an image of this size (its own rounding)."""
    w, h = max(1, round(width)), max(1, round(height))
    if w <= box and h <= box:
        return w, h
    aspect = w / h
    if aspect <= 1:
        n = box * aspect
        return max(min(math.floor(n), math.ceil(n), key=lambda x: abs(aspect - x / box)), 1), box
    n = box / aspect
    return box, max(min(math.floor(n), math.ceil(n), key=lambda y: 0 if y == 0 else abs(aspect - box / y)), 1)


def image_src(image: Any, package_dir: Path | None) -> tuple[str | None, str]:
    """The relative src of an example's thumbnail, or None and why it is not drawn."""
    from edgekit.errors import BadInput
    from edgekit.untrusted import inside, relative_path_problem

    if not isinstance(image, str) or not image:
        return None, "no image in the package"
    if relative_path_problem(image) or not SAFE_SRC.match(image):
        return None, "image path refused (not a plain path inside the package)"
    if package_dir is not None:
        try:
            if not inside(package_dir, image, "report image").is_file():
                return None, "image missing from the package"
        except BadInput:
            return None, "image path refused (outside the package)"
    return image, ""


def _real_size(src: str, package_dir: Path | None) -> tuple[int, int] | None:
    if package_dir is None:
        return None
    from PIL import Image

    try:  # the header only: the JPEG's pixels are never decoded here
        with Image.open(Path(package_dir) / src) as im:
            return int(im.width), int(im.height)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def example_figure(ex: dict[str, Any], i: int, name: Callable[[int], str], key: str,
                   package_dir: Path | None) -> str:
    """The thumbnail with the boxes as SVG rects over it, scaled from the boxes' pixel frame (width, height)
    to the thumbnail's size; a blank frame of the same shape where there is no image."""
    try:
        w, h = float(ex["width"]), float(ex["height"])
    except (KeyError, TypeError, ValueError):
        return ""
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        return ""
    src, why = image_src(ex.get("image"), package_dir)
    tw, th = (_real_size(src, package_dir) if src else None) or thumbnail_size(w, h)
    sx, sy = tw / w, th / h
    zoom = max(1.0, min(4.0, SHOWN_PX / max(tw, th)))
    dw, dh = round(tw * zoom), round(th * zoom)
    shapes, labels, counts = [], [], {}
    for kind in ("truth", "reference", "artifact"):
        rows = _rows(ex.get(kind))
        counts[kind] = len(rows)
        what = {"truth": "ground truth", "reference": "FP32", "artifact": key}[kind]
        dash = ' stroke-dasharray="4 3"' if kind == "truth" else ""
        for x1, y1, x2, y2, c, score in rows:
            tip = f"{what}: {name(c)}" + (f" {score:.2f}" if score is not None and kind != "truth" else "")
            shapes.append(f'<rect class="box {kind}" x="{x1 * sx:.1f}" y="{y1 * sy:.1f}" width="{(x2 - x1) * sx:.1f}" '
                          f'height="{(y2 - y1) * sy:.1f}" fill="none" stroke="{BOX_COLORS[kind]}" '
                          f'stroke-width="{2 / zoom:.2f}"{dash}><title>{esc(tip)}</title></rect>')
            if kind == "artifact":
                labels.append(f'<text class="blabel" x="{x1 * sx + 1:.1f}" y="{max(y1 * sy - 2, 8 / zoom):.1f}" '
                              f'font-size="{9 / zoom:.1f}" fill="{BOX_COLORS[kind]}">{esc(name(c))}</text>')
    blank = "" if src else (f'<rect width="{tw}" height="{th}" fill="#f6f8fa" stroke="#d1d9e0"/>'
                            f'<text x="4" y="{th - 4 / zoom:.1f}" font-size="{10 / zoom:.1f}" class="dim">'
                            f"{esc(why)}</text>")
    img = f'<img src="{esc(src)}" width="{dw}" height="{dh}" alt="validation image {i + 1}">' if src else ""
    svg = (f'<svg class="boxes" viewBox="0 0 {tw} {th}" width="{dw}" height="{dh}" role="img" '
           f'aria-label="boxes on validation image {i + 1}">{blank}{"".join(shapes)}{"".join(labels)}</svg>')
    frame = "model input" if ex.get("frame") == "input" else "image"
    cap = (f"{counts['truth']} labelled · " if counts["truth"] else "") + \
        f"{counts['reference']} FP32 · {counts['artifact']} artifact boxes ({frame} {w:g}×{h:g})"
    return (f'<figure class="ex"><div class="exbox" style="width:{dw}px;height:{dh}px">{img}{svg}</div>'
            f"<figcaption>{esc(cap)}</figcaption></figure>")


# ---------------------------------------------------------------- the INT8 recovery ladder


def recovery_section(m: dict[str, Any]) -> str:
    blocks = []
    for a in m.get("artifacts") or []:
        q = a.get("quantization")
        if not isinstance(q, dict):
            continue
        rec, kept = [r for r in q.get("recovery") or [] if isinstance(r, dict)], kept_rung(q)
        floats = q.get("exclude_nodes") or []
        head = (f"<h3>{dot(a['backend'])}{esc(a['key'])}</h3><p>Quantization: {esc(q.get('method'))} calibration on "
                f"{esc(q.get('samples'))} samples"
                + (f"; {len(floats)} node(s) kept in float: " + ", ".join(f"<code>{esc(n)}</code>" for n in floats)
                   if floats else "")
                + (f"; kept from the rung <b>{esc(q['kept'])}</b>" if q.get("kept") else "") + ".</p>")
        if not rec:
            blocks.append(head + "<p class=note>No recovery rung was tried: the first INT8 attempt met the budgets"
                          + ("" if a["verification"].get("passed") else " or recovery was off (--recover none)")
                          + ".</p>")
            continue
        rows = [[str(i + 1), esc(r.get("step")) + (' <span class="badge ok">kept</span>' if i == kept else ""),
                 esc(r.get("setting", "")), esc(rung_metric(r)),
                 '<span class="badge ok">yes</span>' if r.get("passed") else '<span class="badge bad">no</span>',
                 fnum(r.get("seconds"), ".1f")] for i, r in enumerate(rec)]
        blocks.append(head + html_table(["#", "rung", "setting", "reached", "passed", "seconds"], rows, {0, 5},
                                        cls="recovery", row_cls=["kept" if i == kept else "" for i in range(len(rec))]))
    if not blocks:
        return ""
    return section("recovery", "INT8 recovery", "<p class=note>An INT8 artifact that misses the budgets goes down "
                   "the recovery ladder: calibration, float where it matters, accuracy control, quantization-aware "
                   "training. Each rung is built and verified; the first that meets the budgets is kept, and what "
                   "each reached is recorded.</p>" + "".join(blocks))
