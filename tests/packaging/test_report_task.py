"""The task metric in report.html and report.md (issue 14): the headline per artifact, per-class bars, boxes drawn
over the package's thumbnails at the thumbnail's scale, tensor misses as diagnostics, and the recovery table.

A real build of the bundled DefectNet gives the classify task. The detect task and the recovery record are added
by hand to that real manifest (the bundled detector is not trained yet), with thumbnails written by the
pipeline's own write_example_images, and the result checked against the manifest schema before it is rendered."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import build_bundled, read_manifest
from PIL import Image
from test_report_html import browser  # noqa: F401  (the headless Chromium fixture, skipped without one)

from edgekit.packaging.manifest import MAX_CLASS_BARS, render_report, validate_manifest
from edgekit.packaging.report_html import render_html
from edgekit.packaging.report_svg import esc
from edgekit.packaging.report_task import SHOWN_PX, thumbnail_size
from edgekit.pipeline.assemble import write_example_images

EVIL = "<script>alert(1)</script>"
IMAGE = (800, 600)  # the validation image the boxes are in (pixel frame): the thumbnail is 320 x 240
TRUTH = [[100.0, 150.0, 300.0, 400.0, 0, 1.0], [500.0, 60.0, 760.0, 220.0, 2, 1.0]]
FP32 = [[102.0, 148.0, 298.0, 405.0, 0, 0.91], [505.0, 58.0, 750.0, 225.0, 2, 0.88]]
INT8 = [[110.0, 160.0, 290.0, 390.0, 0, 0.71], [520.0, 70.0, 740.0, 230.0, 1, 0.42], [10.0, 10.0, 50.0, 40.0, 2, 0.3]]
RECOVERY = [
    {"step": "calibration", "setting": "entropy, 100 samples", "metric": "mAP50-95", "value": 41.3, "passed": False,
     "seconds": 4.2},
    {"step": "calibration", "setting": "percentile 99.99, 100 samples", "metric": "mAP50-95", "value": 42.1,
     "passed": False, "seconds": 4.5},
    {"step": "float where it matters", "setting": f"2 layers in float: head.cls, {EVIL}", "metric": "mAP50-95",
     "value": 43.6, "passed": True, "seconds": 11.0},
]


@pytest.fixture(scope="module")
def package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32 and INT8 of the bundled classifier: the build judges both by per-class accuracy on the labels."""
    return build_bundled(tmp_path_factory.mktemp("task") / "pkg", defects_data, "fp32,int8",
                         "--calib-samples", "100", "--val-samples", "100")


def _int8(m: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in m["artifacts"] if a["precision"] == "int8")


def _detect_package(package: Path, folder: Path) -> dict[str, Any]:
    """A copy of the real package whose artifacts are judged by mAP, with boxes on one real image (thumbnail
    written by the pipeline) and on one model-input frame without an image."""
    shutil.copytree(package, folder)
    m = read_manifest(folder)
    src = folder.parent / "val-image.png"
    Image.new("RGB", IMAGE, (90, 96, 104)).save(src)
    m["labels"] = ["crack", EVIL, "spot"]
    m["data"]["task"] = {"task": "detect", "metric": "mAP50-95", "vs": "labels", "max_metric_drop": 1.0,
                         "strict_tensors": False, "notes": [], "decoder": "yolov8", "iou": 0.7, "conf": 0.001}
    for a in m["artifacts"]:
        int8 = a["precision"] == "int8"
        value = 41.3 if int8 else 44.0
        a["verification"]["task"] = {
            "task": "detect", "metric": "mAP50-95", "value": value, "reference": 44.0,
            "drop_points": round(44.0 - value, 4), "vs": "labels", "passed": not int8, "max_drop": 1.0,
            "samples": 100, "map50": 70.1 if int8 else 73.5, "reference_map50": 73.5,
            "per_class": [{"name": "crack", "value": 50.0 if int8 else 52.0, "reference": 52.0},
                          {"name": EVIL, "value": 30.5 if int8 else 38.0, "reference": 38.0},
                          {"name": "spot", "value": 43.4 if int8 else 42.0, "reference": 42.0}],
            "notes": [], "examples": [{"image": str(src), "frame": "image", "width": IMAGE[0], "height": IMAGE[1],
                                       "truth": TRUTH, "reference": FP32, "artifact": INT8 if int8 else FP32}]}
        a["verification"]["passed"] = not int8
    write_example_images(folder, m, None)  # the pipeline's thumbnails: report-images/1.jpg, image rewritten
    blank = {"image": None, "frame": "input", "width": 64, "height": 48, "truth": [],
             "reference": [[8.0, 4.0, 40.0, 36.0, 0, 0.8]], "artifact": [[10.0, 6.0, 42.0, 30.0, 2, 0.6]]}
    for a in m["artifacts"]:
        a["verification"]["task"]["examples"].append(copy.deepcopy(blank))
    m["passed"] = False
    validate_manifest(m)  # what is drawn is a manifest the schema accepts
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))
    return m


def _rects(html: str, kind: str) -> list[tuple[float, float, float, float]]:
    return [tuple(map(float, g)) for g in re.findall(
        rf'<rect class="box {kind}" x="([-\d.]+)" y="([-\d.]+)" width="([-\d.]+)" height="([-\d.]+)"', html)]


def _scaled(boxes: list[list[float]], sx: float, sy: float) -> list[tuple[float, float, float, float]]:
    return [(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy) for x1, y1, x2, y2, *_ in boxes]


def _close(got: list[tuple[float, ...]], want: list[tuple[float, ...]]) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= 0.051 for a, b in zip(got, want) for g, w in zip(a, b))


# ---------------------------------------------------------------- classify, from the real build


def test_classify_build_shows_task_metric_and_per_class_bars(package: Path) -> None:
    m = read_manifest(package)
    judged = [a for a in m["artifacts"] if a["verification"].get("task")]
    assert len(judged) == 2 and m["data"]["task"]["metric"] == "accuracy"
    page = (package / "report.html").read_text()
    task = page.split('<section id="task">')[1].split("</section>")[0]
    head = task.split("<table")[1].split("</table>")[0]
    assert head.count("<tr") == 1 + len(judged)
    for a in judged:
        t = a["verification"]["task"]
        row = head.split(esc(a["key"]))[1].split("</tr>")[0]
        assert f"<td class=n>{t['value']:.2f}</td><td class=n>{t['reference']:.2f}</td>" in row
        assert f"<td class=n>{-t['drop_points'] + 0.0:+.2f}</td>" in row and ("within budget" in row) == t["passed"]
    classes = judged[0]["verification"]["task"]["per_class"]
    chart = task.split('<svg class="gbar"')[1].split("</svg>")[0]
    assert chart.count('<g class="group">') == len(classes) == 4
    assert chart.count('class="bar"') == len(classes) * (1 + len(judged))  # FP32 + each artifact per class
    for c in classes:  # each bar's tooltip carries its value
        assert f"{esc(c['name'])}, FP32: {c['reference']:.2f}</title>" in chart
    md = (package / "report.md").read_text()
    table = md.split("### Per class (worst drop first)")[1].split("\n\n")[1].splitlines()
    assert len(table) == 2 + len(classes)
    assert {ln.split(" | ")[0].strip("| ") for ln in table[2:]} == {c["name"] for c in classes}
    assert "| onnxruntime-int8 | accuracy | " in md and "## INT8 recovery" in md
    # the summary card reads the task metric that decided, of the artifact the summary is about
    card = re.search(r'<div class="k">accuracy</div><div class="v">([\d.]+)</div><div class="s">FP32 ([\d.]+)', page)
    assert card and float(card[1]) in {a["verification"]["task"]["value"] for a in judged}
    assert float(card[2]) == judged[0]["verification"]["task"]["reference"]


def test_many_classes_keep_the_worst_drops(package: Path) -> None:
    m = read_manifest(package)
    for a in m["artifacts"]:  # 30 classes; class i loses i % 7 + i / 100 points in INT8
        a["verification"]["task"]["per_class"] = [
            {"name": f"c{i}", "reference": 80.0, "value": 80.0 - ((i % 7 + i / 100) if a["precision"] == "int8"
                                                                  else 0.0)} for i in range(30)]
    page = render_html(m)
    chart = page.split('<svg class="gbar"')[1].split("</svg>")[0]
    names = re.findall(r'class="tick"><title>([^<]+)</title>', chart)
    drops = {f"c{i}": i % 7 + i / 100 for i in range(30)}
    want = sorted(drops, key=lambda n: -drops[n])[:MAX_CLASS_BARS]
    assert names == want and len(names) == 20 and chart.count('class="bar"') == 20 * 3
    assert "10 more classes with smaller drops are in the table" in page
    assert "All 30 classes as a table" in page
    md = render_report(m)
    assert len(re.findall(r"\n\| c\d+ \|", md.split("### Per class")[1])) == 30  # every class in report.md
    assert md.index("| c27 |") < md.index("| c6 |") < md.index("| c0 |")  # 6.27 > 6.06 > 0.0 points lost


# ---------------------------------------------------------------- detect: boxes over the thumbnails


def test_detect_boxes_are_drawn_at_the_thumbnail_scale(package: Path, tmp_path: Path) -> None:
    m = _detect_package(package, tmp_path / "det")
    ex = _int8(m)["verification"]["task"]["examples"]
    assert ex[0]["image"] == "report-images/1.jpg"
    with Image.open(tmp_path / "det" / ex[0]["image"]) as im:
        tw, th = im.size
    assert (tw, th) == (320, 240) == thumbnail_size(*IMAGE)
    page = render_html(m, tmp_path / "det")
    block = page.split("<details open><summary>onnxruntime-int8")[1].split("</details>")[0]
    image_fig, blank_fig = block.split('<figure class="ex">')[1:]
    sx, sy = tw / IMAGE[0], th / IMAGE[1]
    assert _close(_rects(image_fig, "truth"), _scaled(TRUTH, sx, sy))
    assert _close(_rects(image_fig, "reference"), _scaled(FP32, sx, sy))
    assert _close(_rects(image_fig, "artifact"), _scaled(INT8, sx, sy))
    assert image_fig.count('stroke-dasharray="4 3"') == len(TRUTH)  # only the ground truth is dashed
    assert f'<img src="report-images/1.jpg" width="{tw}" height="{th}"' in image_fig
    assert f'viewBox="0 0 {tw} {th}"' in image_fig
    # no image: a blank frame of the model input's shape, boxes scaled the same way (64 x 48 shown larger)
    zoom = SHOWN_PX / 64
    assert "<img" not in blank_fig and 'viewBox="0 0 64 48"' in blank_fig
    assert f'width="{round(64 * zoom)}" height="{round(48 * zoom)}"' in blank_fig
    assert _close(_rects(blank_fig, "artifact"), [(10.0, 6.0, 32.0, 24.0)])
    # class names from the package's labels, escaped: the INT8 box of class 1 is labelled with it
    assert EVIL not in page and page.count("<script") == 1
    assert 'class="blabel"' in image_fig and f">{esc(EVIL)}</text>" in image_fig
    assert f"<title>onnxruntime-int8: {esc(EVIL)} 0.42</title>" in image_fig
    # the per-class chart: 3 classes x (FP32 + 2 artifacts), the largest drop (7.5 points) first
    chart = page.split('<svg class="gbar"')[1].split("</svg>")[0]
    assert chart.count('class="bar"') == 9
    assert re.findall(r'class="tick"><title>([^<]+)</title>', chart) == [esc(EVIL), "crack", "spot"]
    assert "<td class=n>-2.70</td>" in page and "over budget" in page and "mAP50" in page
    md = render_report(m)
    assert f"| {EVIL} | 38.00 | 38.00 | 30.50 | 7.50 |" in md  # report.md is text: the name as it is


def test_foreign_image_paths_are_never_a_src(package: Path, tmp_path: Path) -> None:
    m = _detect_package(package, tmp_path / "det")
    ex = _int8(m)["verification"]["task"]["examples"]
    for bad in ("javascript:alert(1)", "https://example.com/x.jpg", "../val-image.png", "/etc/hostname",
                'a.jpg" onerror="alert(1)'):
        ex[0]["image"] = bad
        page = render_html(m, tmp_path / "det")
        block = page.split("<details open><summary>onnxruntime-int8")[1].split("</details>")[0]
        assert "<img" not in block and "image path refused" in block, bad
        # the boxes are still drawn, on a blank 320 x 240 frame
        assert _close(_rects(block.split('<figure class="ex">')[1], "artifact"), _scaled(INT8, 0.4, 0.4))


def test_detect_page_in_chromium_draws_boxes_over_the_image(browser: Any, package: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    m = _detect_package(package, tmp_path / "det")
    (tmp_path / "det" / "report.html").write_text(render_html(m, tmp_path / "det"))
    browser.get((tmp_path / "det" / "report.html").resolve().as_uri())
    logs = browser.get_log("browser")
    assert not [e for e in logs if e["level"] == "SEVERE" or "Refused" in e["message"]], logs
    loaded = browser.execute_script("return Array.from(document.querySelectorAll('details[open] .exbox img'))"
                                    ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert loaded == [[True, 320, 240]]  # the page's policy lets the package's own thumbnail in
    srcs = browser.execute_script("return Array.from(document.images).map(i => i.currentSrc)")
    assert srcs == [(tmp_path / "det" / "report-images" / "1.jpg").resolve().as_uri()] * 2  # FP32's and INT8's
    # each INT8 box lies where the scaled box is, measured from the image's corner on the screen
    got = browser.execute_script(
        "const f = document.querySelector('details[open] figure.ex'), o = f.querySelector('img')"
        ".getBoundingClientRect(); return Array.from(f.querySelectorAll('rect.artifact')).map(r => {"
        "const b = r.getBoundingClientRect(); return [b.left - o.left, b.top - o.top, b.width, b.height]})")
    want = _scaled(INT8, 0.4, 0.4)  # on screen at 1:1 (a 320-px thumbnail is not enlarged)
    assert len(got) == len(want) and all(abs(g - w) <= 1.0 for a, b in zip(got, want) for g, w in zip(a, b)), got


# ---------------------------------------------------------------- diagnostics and the recovery ladder


def test_tensor_misses_are_diagnostics_when_the_task_metric_decided(package: Path) -> None:
    m = read_manifest(package)
    v = _int8(m)["verification"]
    v["tensor_failures"] = ["cosine 0.7300 < 0.99", f"SNR 9.1 dB < 20 at {EVIL}"]
    page = render_html(m)
    task = page.split('<section id="task">')[1].split("</section>")[0]
    diag = task.split("<h3>Tensor figures: diagnostics (not binding)</h3>")[1]
    assert diag.count("<li>") == 2 and "cosine 0.7300 &lt; 0.99" in diag and EVIL not in page
    md = render_report(m)
    assert "Tensor figures of onnxruntime-int8, diagnostics (not binding):\n- cosine 0.7300 < 0.99" in md
    m["data"]["task"]["strict_tensors"] = True
    assert "<h3>Tensor figures: binding (--strict-tensors)</h3>" in render_html(m)


def test_recovery_table_lists_every_rung_and_marks_the_kept_one(package: Path) -> None:
    m = read_manifest(package)
    q = _int8(m)["quantization"]
    assert q["method"] and q["recovery"] == [] and q["kept"] is None  # the real build needed no recovery
    page = render_html(m)
    assert "No recovery rung was tried: the first INT8 attempt met the budgets." in page
    q["recovery"], q["kept"] = copy.deepcopy(RECOVERY), "float where it matters"
    validate_manifest(m)
    page = render_html(m)
    table = page.split('<table class="recovery">')[1].split("</table>")[0]
    rows = re.findall(r"<tr( class=kept)?><td class=n>(\d)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>"
                      r"<td>(.*?)</td><td class=n>(.*?)</td></tr>", table)
    assert len(rows) == len(RECOVERY) == table.count("<tr") - 1
    for (kept, n, step, setting, reached, passed, secs), r in zip(rows, RECOVERY):
        assert step.startswith(esc(r["step"])) and setting == esc(r["setting"])
        assert reached == f"mAP50-95 {r['value']:.2f}" and ("yes" in passed) == r["passed"]
        assert secs == f"{r['seconds']:.1f}" and bool(kept) == (n == "3")
    assert '<span class="badge ok">kept</span>' in rows[2][2] and EVIL not in page
    md = render_report(m)
    lines = [ln for ln in md.split("## INT8 recovery")[1].splitlines() if ln.startswith("| ") and "rung" not in ln]
    assert len(lines) == 3 and lines[2].startswith("| 3 | float where it matters **(kept)** | 2 layers in float")
    assert lines[0] == "| 1 | calibration | entropy, 100 samples | mAP50-95 41.30 | no | 4.2 |"
    q["kept"] = None  # nothing kept: no row is marked
    assert '<tr class=kept>' not in render_html(m).split('<table class="recovery">')[1].split("</table>")[0]
