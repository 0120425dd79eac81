"""The look of report.html: SVG plots drawn here as text (no plotting library, nothing loaded by the
page), the colours, the stylesheet and the one script (table sorting) the page carries inline.

Colours are fixed per backend and per precision so the same backend looks the same in every plot and
table of the report. All text is escaped (node and artifact names come from user models).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

EXTRA_COLORS = ("#56B4E9", "#D55E00", "#999933", "#882255")
PRECISION_COLORS = {"int8": "#1f4e8c", "fp16": "#6fa8dc", "fp32": "#dfe6ee", "bf16": "#9fc5e8"}
TOP_LAYERS = 40  # layers drawn in the chart; the rest are folded into one row (all are in the table)


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def mb(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def backend_color(backend: str) -> str:
    """Fixed per backend; one edgekit does not know yet still gets the same colour on every page."""
    from edgekit import backends

    known = backends.get(backend).report_color if backend in backends.names() else None
    return known or EXTRA_COLORS[sum(map(ord, backend)) % len(EXTRA_COLORS)]



# ---------------------------------------------------------------- HTML pieces every section uses

def fnum(v: Any, spec: str = ".3f", suffix: str = "") -> str:
    return "–" if v is None else format(v, spec) + suffix


def dot(backend: str) -> str:
    """One colour per backend everywhere on the page (Okabe-Ito: distinguishable with colour blindness)."""
    return f'<span class="dot" style="background:{backend_color(backend)}"></span>'


def html_table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), cls: str = "sortable",
               row_cls: list[str] | None = None) -> str:
    """Cells are HTML already (callers escape); numeric columns align right and sort as numbers."""
    th = "".join(f'<th{" class=n" if i in numeric else ""}>{h}</th>' for i, h in enumerate(head))
    body = "".join(f'<tr{f" class={rc}" if (rc := (row_cls or [""] * len(rows))[j]) else ""}>'
                   + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r)) + "</tr>"
                   for j, r in enumerate(rows))
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}"><h2>{esc(title)}</h2>{body}</section>'


@dataclass
class Point:
    key: str
    backend: str
    x: float
    y: float | None
    nbytes: int
    measured: bool
    ok: bool
    chosen: bool
    title: str



def _nice(step: float) -> float:
    mag = 10 ** math.floor(math.log10(step))
    return next(k * mag for k in (1, 2, 2.5, 5, 10) if k * mag >= step)


class _Scale:
    """A padded, nice-rounded axis mapping values to pixels [a, b] (log when the range spans decades)."""

    def __init__(self, values: list[float], a: float, b: float, allow_log: bool = False,
                 cap: float | None = None) -> None:
        lo, hi = min(values), max(values)
        self.log = allow_log and lo > 0 and hi / lo > 8
        if self.log:
            self.lo, self.hi = 10 ** math.floor(math.log10(lo * 0.9)), 10 ** math.ceil(math.log10(hi * 1.1))
            f = [1, 2, 5]
            self.ticks = [k * 10 ** e for e in range(int(math.log10(self.lo)), int(math.log10(self.hi)) + 1) for k in f
                          if self.lo <= k * 10 ** e <= self.hi]
        else:
            span = hi - lo
            if span <= 1e-6 * max(abs(hi), abs(lo)):  # equal values, or equal but for float rounding (two cosines
                span = abs(hi) * 0.05 or 1.0  # of 1.0 and 1 - 1e-16): a step that small would collapse the axis
            self.step = _nice(span * 1.2 / 5)
            self.lo = math.floor((lo - span * 0.08) / self.step) * self.step
            self.hi = math.ceil((hi + span * 0.08) / self.step) * self.step
            if lo >= 0 > self.lo:  # latency and accuracy never go below zero
                self.lo = 0.0
            if cap is not None and hi <= cap:  # nor above 100% / a cosine of 1
                self.hi = min(self.hi, cap)
            n = round((self.hi - self.lo) / self.step)
            self.ticks = [self.lo + i * self.step for i in range(n + 1)]
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo)) if self.log \
            else (v - self.lo) / (self.hi - self.lo) if self.hi > self.lo else 0.5
        return self.a + f * (self.b - self.a)

    def label(self, v: float, scale: float = 1.0, suffix: str = "") -> str:
        if self.log:
            return f"{v * scale:g}{suffix}"
        step = self.step * scale  # as many decimals as the step needs: 92.5 must not read 92
        digits = next((d for d in range(7) if abs(round(step, d) - step) < 1e-9 * max(1.0, step)), 6)
        return f"{v * scale:.{digits}f}{suffix}"


def pareto_front(points: list[Point]) -> list[Point]:
    """Verified points no other verified point beats on both latency and the y figure, by latency."""
    front, best = [], -math.inf
    for p in sorted((p for p in points if p.ok and p.y is not None), key=lambda p: (p.x, -(p.y or 0))):
        if p.y is not None and p.y > best:
            front.append(p)
            best = p.y
    return front


def _place_label(x: float, y: float, r: float, text: str, taken: list[tuple[float, float, float, float]],
                 bounds: tuple[float, float, float, float]) -> tuple[float, float, str, str]:
    """Greedy: the first of the spots around the marker that overlaps nothing drawn so far; the far
    ones (in a crowd) get a leader line back to the marker, returned as SVG (else "")."""
    w, h = 6.1 * len(text), 12.0
    spots = [(r + 4, 4, "start"), (-r - 4, 4, "end"), (0, -r - 5, "middle"), (0, r + 13, "middle"),
             (r * 0.7 + 3, -r * 0.7 - 3, "start"), (r * 0.7 + 3, r * 0.7 + 11, "start"),
             (-r * 0.7 - 3, -r * 0.7 - 3, "end"), (-r * 0.7 - 3, r * 0.7 + 11, "end"),
             *[(0, sign * (r + d) + (10 if sign > 0 else 0), "middle") for d in (22, 40, 58) for sign in (-1, 1)]]
    best: tuple[float, tuple[float, float, str], tuple[float, float, float, float]] | None = None
    for dx, dy, anchor in spots:
        x0 = x + dx - (w if anchor == "end" else w / 2 if anchor == "middle" else 0)
        box = (x0, y + dy - h + 2, x0 + w, y + dy + 2)
        out = max(0.0, bounds[0] - box[0]) + max(0.0, box[2] - bounds[2]) + max(0.0, bounds[1] - box[1]) \
            + max(0.0, box[3] - bounds[3])
        cost = sum(max(0.0, min(box[2], t[2]) - max(box[0], t[0])) * max(0.0, min(box[3], t[3]) - max(box[1], t[1]))
                   for t in taken) + out * 50
        if best is None or cost < best[0]:
            best = (cost, (x + dx, y + dy, anchor), box)
        if cost == 0:
            break
    assert best is not None
    taken.append(best[2])
    (lx, ly, anchor), box = best[1], best[2]
    far = abs(ly - y) > r + 20
    up = ly < y
    leader = (f'<line x1="{x:.1f}" y1="{y - r if up else y + r:.1f}" x2="{x:.1f}" y2="{box[3] if up else box[1]:.1f}" '
              'stroke="#8c959f" stroke-width="0.8"/>') if far else ""
    return lx, ly, anchor, leader


def pareto_svg(pts: list[Point], metric: str) -> str:
    """x = latency, y = `metric` (accuracy / top1_agreement are fractions, shown in %), area = bytes."""
    if not pts:
        return "<p>No candidate has a latency to plot.</p>"
    W, H, L, R, T, B = 900, 440, 72, 720, 24, 384
    na_band = any(p.y is None for p in pts)  # unverified candidates sit in a strip below the axis range
    ys = [p.y for p in pts if p.y is not None] or [0.0]
    sx = _Scale([p.x for p in pts], L, R, allow_log=True)
    sy = _Scale(ys, B - (34 if na_band else 0), T, cap=1.0)
    pct = metric in ("accuracy", "top1_agreement")
    ylab = {"accuracy": "accuracy (%)", "top1_agreement": "top-1 agreement with FP32 (%)"}.get(metric, "cosine vs FP32")
    bmax = max(p.nbytes for p in pts) or 1
    out = [f'<svg class="pareto" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'aria-label="latency versus {esc(ylab)}, marker area by size">',
           f'<rect x="{L}" y="{T}" width="{R - L}" height="{B - T}" fill="#fbfcfd" stroke="#d1d9e0"/>']
    for t in sx.ticks:
        X = sx(t)
        out.append(f'<line x1="{X:.1f}" y1="{T}" x2="{X:.1f}" y2="{B}" stroke="#eaeef2"/>'
                   f'<text x="{X:.1f}" y="{B + 16}" text-anchor="middle" class="tick">{sx.label(t)}</text>')
    for t in sy.ticks:
        Y = sy(t)
        out.append(f'<line x1="{L}" y1="{Y:.1f}" x2="{R}" y2="{Y:.1f}" stroke="#eaeef2"/>'
                   f'<text x="{L - 6}" y="{Y + 4:.1f}" text-anchor="end" class="tick">'
                   f'{sy.label(t, 100 if pct else 1)}</text>')
    if na_band:
        out.append(f'<line x1="{L}" y1="{B - 30}" x2="{R}" y2="{B - 30}" stroke="#d1d9e0" stroke-dasharray="3 3"/>'
                   f'<text x="{L - 6}" y="{B - 11}" text-anchor="end" class="tick">n/a</text>')
    out.append(f'<text x="{(L + R) / 2}" y="{B + 36}" text-anchor="middle" class="axis">latency p50 (ms'
               f'{", log scale" if sx.log else ""})</text><text transform="translate(18 {(T + B) / 2}) rotate(-90)" '
               f'text-anchor="middle" class="axis">{esc(ylab)}</text>')

    def pos(p: Point) -> tuple[float, float, float]:
        return sx(p.x), sy(p.y) if p.y is not None else B - 15, max(4.0, 17 * math.sqrt(p.nbytes / bmax))

    front = pareto_front(pts)
    if len(front) > 1:
        xy = " ".join(f"{pos(p)[0]:.1f},{pos(p)[1]:.1f}" for p in front)
        out.append(f'<polyline points="{xy}" fill="none" stroke="#24292f" stroke-width="1.5" stroke-dasharray="5 3"/>')
    rings = {p.key: 6.0 if p.chosen else 2.5 if p in front else 0.0 for p in pts}  # labels keep off rings too
    taken = [(x - r - rings[p.key], y - r - rings[p.key], x + r + rings[p.key], y + r + rings[p.key])
             for p, (x, y, r) in zip(pts, map(pos, pts))]
    labels = []
    for p in sorted(pts, key=lambda p: -p.nbytes):  # big markers first so small ones stay visible on top
        x, y, r = pos(p)
        c = backend_color(p.backend)
        on_front = p in front
        fill = c if p.measured else "#ffffff"
        style = (f'fill="{fill}" fill-opacity="{0.85 if p.ok else 0.3}" stroke="{c}" '
                 f'stroke-width="{1 if p.measured else 2.5}"' + ("" if p.ok else ' stroke-dasharray="3 2"'))
        if p.chosen:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r + 6:.1f}" fill="none" stroke="#bf8700" '
                       'stroke-width="2.5"/>')
        if on_front:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r + 2.5:.1f}" fill="none" stroke="#24292f" '
                       'stroke-width="1.5"/>')
        out.append(f'<circle class="marker" data-key="{esc(p.key)}" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {style}>'
                   f'<title>{esc(p.title)}\n'
                   f'{p.x:.3f} ms {"measured" if p.measured else "estimated"}, {mb(p.nbytes)}</title></circle>')
        lx, ly, anchor, leader = _place_label(x, y, r + rings[p.key], p.key, taken, (L, T, R, B))
        out.append(leader)
        weight = ' font-weight="600"' if p.chosen or on_front else ""
        labels.append(f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" class="plabel"{weight}'
                      f'{"" if p.ok else " fill=" + chr(34) + "#8c959f" + chr(34)}>{esc(p.key)}</text>')
    out += labels
    out.append(_pareto_legend(pts, bmax, R + 22, T))
    return "".join(out) + "</svg>"


def _pareto_legend(pts: list[Point], bmax: int, x: float, y: float) -> str:
    out, y = [f'<text x="{x}" y="{y + 10}" class="axis">backend</text>'], y + 26
    for b in dict.fromkeys(p.backend for p in pts):
        out.append(f'<circle cx="{x + 6}" cy="{y - 4}" r="6" fill="{backend_color(b)}"/>'
                   f'<text x="{x + 18}" y="{y}" class="tick">{esc(b)}</text>')
        y += 20
    y += 8
    keys = [('<circle cx="{x}" cy="{y}" r="6" fill="#59636e"/>', "measured"),
            ('<circle cx="{x}" cy="{y}" r="6" fill="#fff" stroke="#59636e" stroke-width="2.5"/>', "estimated"),
            ('<circle cx="{x}" cy="{y}" r="6" fill="#59636e" fill-opacity="0.3" stroke="#59636e" '
             'stroke-dasharray="3 2"/>', "rejected"),
            ('<circle cx="{x}" cy="{y}" r="8.5" fill="none" stroke="#24292f" stroke-width="1.5"/>', "Pareto front"),
            ('<circle cx="{x}" cy="{y}" r="9" fill="none" stroke="#bf8700" stroke-width="2.5"/>', "chosen")]
    for shape, text in keys:
        out.append(shape.format(x=x + 6, y=y - 4) + f'<text x="{x + 18}" y="{y}" class="tick">{text}</text>')
        y += 22
    y += 6
    out.append(f'<text x="{x}" y="{y}" class="axis">area = size</text>')
    for frac in (1.0, 0.25):
        r = 17 * math.sqrt(frac)
        y += r + 8
        out.append(f'<circle cx="{x + 17}" cy="{y:.1f}" r="{r:.1f}" fill="none" stroke="#8c959f"/>'
                   f'<text x="{x + 40}" y="{y + 4:.1f}" class="tick">{mb(bmax * frac)}</text>')
        y += r
    return "".join(out)


def layer_time(la: dict[str, Any]) -> tuple[float | None, bool]:
    """Measured FP32 time when the build profiled it, else the cost model's FP32 estimate."""
    if la.get("measured_ms") is not None:
        return float(la["measured_ms"]), True
    est = la.get("est_ms") or {}
    v = est.get("fp32", next(iter(est.values()), None))
    return (float(v), False) if v is not None else (None, False)


def shown_layers(layers: list[dict[str, Any]], top: int) -> tuple[list[int], list[int]]:
    """The `top` layers that matter most (share of MACs or of time), in graph order; the rest fold."""
    if len(layers) <= top:
        return list(range(len(layers))), []
    macs = sum(la.get("macs") or 0 for la in layers) or 1
    time = sum(layer_time(la)[0] or 0 for la in layers) or 1
    weight = [max((la.get("macs") or 0) / macs, (layer_time(la)[0] or 0) / time) for la in layers]
    keep = set(sorted(range(len(layers)), key=lambda i: -weight[i])[:top])
    return sorted(keep), [i for i in range(len(layers)) if i not in keep]


def _bar(x: float, y: float, w: float, fill: str, text: str, extra: str = "") -> str:
    return (f'<rect class="bar" x="{x}" y="{y + 4}" width="{max(w, 1.5):.1f}" height="12" rx="2" fill="{fill}"{extra}/>'
            f'<text x="{x + max(w, 1.5) + 4:.1f}" y="{y + 14}" class="tick">{text}</text>')


def layer_chart_svg(layers: list[dict[str, Any]], backends: dict[str, str], top: int = TOP_LAYERS) -> str:
    """Rows of MACs, time and sensitivity bars and a precision cell per artifact (backends: key -> backend)."""
    shown, folded = shown_layers(layers, top)
    keys = [k for k in backends if any(k in (la.get("precision") or {}) for la in layers)]
    hh = 24 + max((len(k) for k in keys), default=0) * 6.2  # room for the upright artifact names
    rows = [*[layers[i] for i in shown], *([{"node": f"… {len(folded)} more layers", "op_type": "",
            "macs": sum(layers[i].get("macs") or 0 for i in folded), "folded": True,
            "measured_ms": sum(layer_time(layers[i])[0] or 0 for i in folded)}] if folded else [])]
    W, H = 850 + 24 * len(keys), hh + 20 * len(rows) + 8
    mmax = max((la.get("macs") or 0) for la in rows) or 1
    tmax = max((layer_time(la)[0] or 0) for la in rows) or 1
    smax = max((la.get("sensitivity_db") or 0) for la in rows) or 1
    out = [f'<svg class="layers" viewBox="0 0 {W} {H:.0f}" width="{W}" height="{H:.0f}" role="img" '
           'aria-label="per-layer MACs, time, sensitivity and precision"><defs><pattern id="hatch" width="5" '
           'height="5" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="5" height="5" '
           'fill="#fff"/><line x1="0" y1="0" x2="0" y2="5" stroke="#59636e" stroke-width="2.5"/></pattern></defs>']
    for x, t in ((8, "layer"), (222, "op"), (300, "MACs"), (500, "time (ms)"), (690, "INT8 sensitivity (dB)")):
        out.append(f'<text x="{x}" y="{hh - 8:.0f}" class="axis">{t}</text>')
    for j, k in enumerate(keys):  # artifact names upright, over a strip in the backend's colour
        out.append(f'<text transform="translate({848 + 24 * j + 14} {hh - 10:.0f}) rotate(-90)" class="tick">'
                   f'{esc(k)}</text><rect x="{848 + 24 * j}" y="{hh - 6:.0f}" width="20" height="3" '
                   f'fill="{backend_color(backends[k])}"/>')
    for r, la in enumerate(rows):
        y = hh + 20 * r
        name = str(la.get("node", ""))
        short = name if len(name) <= 32 else "…" + name[-31:]  # the end of a path-like name says most
        t, measured = layer_time(la)
        out.append(f'<g class="row"><title>{esc(name)} ({esc(la.get("op_type", ""))}) output '
                   f'{esc(la.get("output_shape", ""))}, {int(la.get("params") or 0):,} params</title>'
                   f'<rect x="0" y="{y}" width="{W}" height="20" fill="{"#f6f8fa" if r % 2 else "#fff"}"/>'
                   f'<text x="8" y="{y + 14}" class="tick{" dim" if la.get("folded") else ""}">{esc(short)}</text>'
                   f'<text x="222" y="{y + 14}" class="tick dim">{esc(la.get("op_type", ""))}</text>')
        if la.get("macs"):
            out.append(_bar(300, y, 150 * la["macs"] / mmax, "#57606a", si(la["macs"])))
        if t is not None:
            out.append(_bar(500, y, 130 * t / tmax, "#0072B2" if measured else "url(#hatch)",
                            f"{t:.3f}" + ("" if measured else " est."),
                            "" if measured else ' stroke="#59636e" stroke-width="0.8"'))
        if la.get("sensitivity_db") is not None:
            sens = la["sensitivity_db"]
            out.append(_bar(690, y, 100 * max(sens, 0) / smax, "#D55E00", f"{sens:.1f}"))
        for j, k in enumerate(keys):
            p = (la.get("precision") or {}).get(k)
            if p:  # "–": an op that runs in whatever its neighbours run in (an activation in an INT8 region)
                fill = f'fill="{PRECISION_COLORS[p]}"' if p in PRECISION_COLORS else 'fill="#fff" stroke="#d1d9e0"'
                out.append(f'<rect class="cell" x="{848 + 24 * j}" y="{y + 2}" width="20" height="16" rx="2" {fill}>'
                           f'<title>{esc(k)}: {esc(p)}</title></rect>')
        out.append("</g>")
    return "".join(out) + "</svg>"


def hbar_svg(items: list[tuple[str, float, str, str]], unit_scale: float = 1.0, suffix: str = "") -> str:
    """Horizontal bars (label, value, colour, value text) on a shared axis. The axis starts near the
    smallest value, not at zero, so that a 0.5-point accuracy change is visible; its ticks say so."""
    if not items:
        return ""
    vals = [v for _, v, _, _ in items]
    L, R, row = 190, 640, 28
    s = _Scale([*vals, min(vals) - 0.25 * ((max(vals) - min(vals)) or abs(max(vals)) * 0.02)], L, R)
    H = 18 + row * len(items) + 24
    out = [f'<svg class="hbar" viewBox="0 0 {R + 90} {H}" width="{R + 90}" height="{H}" role="img">']
    for t in s.ticks:
        out.append(f'<line x1="{s(t):.1f}" y1="10" x2="{s(t):.1f}" y2="{H - 22}" stroke="#eaeef2"/>'
                   f'<text x="{s(t):.1f}" y="{H - 8}" text-anchor="middle" class="tick">'
                   f'{s.label(t, unit_scale, suffix)}</text>')
    for i, (label, v, color, text) in enumerate(items):
        y = 12 + row * i
        out.append(f'<text x="{L - 8}" y="{y + 15}" text-anchor="end" class="tick">{esc(label)}</text>'
                   f'<rect class="bar" x="{L}" y="{y + 2}" width="{max(s(v) - L, 1.5):.1f}" height="18" rx="2" '
                   f'fill="{color}"/><text x="{s(v) + 6:.1f}" y="{y + 15}" class="tick">{esc(text)}</text>')
    return "".join(out) + "</svg>"


# ---------------------------------------------------------------- the page's style and its one script

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--panel:#f6f8fa;--ok:#1a7f37;--bad:#cf222e}
*{box-sizing:border-box}html{scroll-behavior:smooth}
body{margin:0;color:var(--fg);background:#fff;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;-webkit-font-smoothing:antialiased}
header{border-bottom:1px solid var(--line);background:var(--panel)}
.wrap{max-width:1160px;margin:0 auto;padding:0 28px}
header .wrap{padding-top:22px;padding-bottom:14px}
h1{font-size:24px;font-weight:650;margin:0 0 2px;letter-spacing:-.01em}
.sub{color:var(--muted);font-size:13px}
nav{display:flex;gap:18px;margin-top:12px;font-size:13px;flex-wrap:wrap}
nav a{color:var(--muted);text-decoration:none}nav a:hover{color:var(--fg)}
h2{font-size:18px;font-weight:650;margin:40px 0 14px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:14px;font-weight:650;margin:22px 0 8px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,1fr));gap:10px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card .k{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .v{font-size:21px;font-weight:650;font-variant-numeric:tabular-nums;overflow-wrap:break-word;line-height:1.35}
.card .v.sm{font-size:16px;padding:3px 0 2px}.card .s{font-size:12px;color:var(--muted)}
.cards.four{grid-template-columns:repeat(4,1fr)}.card.wide{grid-column:span 2}
.card.ok{border-color:#4ac26b;background:#f0fff4}.card.bad{border-color:#ff8182;background:#fff5f5}
.card.ok .v{color:var(--ok)}.card.bad .v{color:var(--bad)}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--panel);font-weight:600;position:sticky;top:0;white-space:nowrap}
.n{text-align:right}table.sortable thead th{cursor:pointer}
th[aria-sort=ascending]::after{content:" ▲";font-size:9px}th[aria-sort=descending]::after{content:" ▼";font-size:9px}
td:first-child{white-space:nowrap}td:last-child{overflow-wrap:anywhere}
tr.bad td,tr.below td,p.bad{color:var(--bad)}tr.dim td{color:var(--muted)}
tr.first td{background:#ffebe9;color:var(--bad);font-weight:650}
table.kv th{width:120px;color:var(--muted);font-weight:500;background:none;position:static}
.scroll{max-height:460px;overflow:auto;border:1px solid var(--line);border-radius:6px;margin-top:6px}
.hscroll{overflow-x:auto}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:7px}
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;font-weight:600}
.badge.ok{background:#dafbe1;color:var(--ok)}.badge.bad{background:#ffebe9;color:var(--bad)}
.ok{color:var(--ok)}.bad{color:var(--bad)}
.note,figcaption{color:var(--muted);font-size:12.5px}figure{margin:0}
.chip{display:inline-block;padding:0 7px;border-radius:4px;font-size:12px;margin:0 2px}
.chips span{display:inline-block;background:var(--panel);border:1px solid var(--line);border-radius:4px;
padding:0 6px;margin:2px;font-size:11.5px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:28px}
@media (max-width:860px){.cols,.cards.four{grid-template-columns:1fr 1fr}}
code,pre{font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:var(--panel);border:1px solid var(--line);padding:10px 12px;border-radius:6px;white-space:pre-wrap;
word-break:break-all}
details summary{cursor:pointer;color:var(--muted);margin-top:10px}
svg{display:block;max-width:100%;height:auto}svg text{font-family:inherit}
.tick{font-size:11px;fill:#424a53}.axis{font-size:12px;font-weight:600;fill:#1f2328}.plabel{font-size:11px;fill:#1f2328}
.dim{fill:#8c959f}.hscroll svg{max-width:none}
footer{color:var(--muted);font-size:12px;margin:48px 0 24px}
.examples{display:flex;flex-wrap:wrap;gap:16px;margin-top:8px}figure.ex{margin:0}
.exbox{position:relative}.exbox img,.exbox svg{position:absolute;left:0;top:0;max-width:none}
tr.kept td{background:#dafbe1;font-weight:650}
"""
# Progressive enhancement only: click a header to sort. Without it every table is still complete.
JS = """document.querySelectorAll("table.sortable").forEach(function(t){var hs=t.tHead.rows[0].cells;
Array.prototype.forEach.call(hs,function(th,i){th.addEventListener("click",function(){
var up=th.getAttribute("aria-sort")!=="ascending",b=t.tBodies[0],rs=Array.prototype.slice.call(b.rows);
var key=function(r){var s=r.cells[i]?r.cells[i].textContent.trim():"",v=parseFloat(s.replace(/[, %×x]/g,""));
return isNaN(v)||!/^[-+.0-9]/.test(s)?s:v;};
rs.sort(function(p,q){var a=key(p),c=key(q);if(typeof a!==typeof c){return typeof a==="number"?-1:1;}
return (a<c?-1:a>c?1:0)*(up?1:-1);});rs.forEach(function(r){b.appendChild(r);});
Array.prototype.forEach.call(hs,function(h){h.removeAttribute("aria-sort");});
th.setAttribute("aria-sort",up?"ascending":"descending");});});});"""
