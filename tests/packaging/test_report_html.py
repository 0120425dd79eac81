"""report.html: self-contained, escaped, and really rendered by a headless Chromium (plots have markers
and bars, no console errors, no network requests). A screenshot is kept in test-results/report.png."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, REPO, read_manifest, require_tools, run_cli
from onnx import TensorProto, helper, numpy_helper

from edgekit.packaging.report_html import render_html
from edgekit.packaging.report_svg import esc

EVIL = "<script>alert(1)</script>"
RELU = 'relu "1" & <b>'
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# ---------------------------------------------------------------- packages


@pytest.fixture(scope="module")
def package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-backend build of the bundled model (few samples: the page is under test, not INT8)."""
    out = tmp_path_factory.mktemp("report") / "defectnet"
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime,openvino", "--precision",
                "all", "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess",
                BUNDLED_PREPROCESS, "--calib-samples", "100", "--val-samples", "100", "--out", out, *FAST)
    assert r.code == 0, r.stderr
    return out


def _evil_model(path: Path) -> Path:
    """A small conv net whose node names are HTML: a report must show them as text."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n) for n, s in
             (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 3, 3)), ("b2", (8,)), ("wf", (4, 8)), ("bf", (4,)))]
    nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name=EVIL, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name=RELU),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)]
    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])
    graph = helper.make_graph(nodes, "evil", [image],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def rejected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rejected INT8 build (a cosine threshold INT8 cannot meet) of the model with HTML node names."""
    tmp = tmp_path_factory.mktemp("evil")
    npz = tmp / "calib.npz"
    np.savez(npz, images=np.random.default_rng(1).standard_normal((60, 3, 16, 16)).astype(np.float32))
    r = run_cli("build", _evil_model(tmp / "evil.onnx"), "--target", "host-cpu", "--backend", "onnxruntime",
                "--precision", "int8", "--calib", npz, "--min-cosine", "0.99999", "--strict-tensors",
                "--recover", "none", "--out", tmp / "pkg", *FAST)
    assert r.code == 1, r.stderr
    return tmp / "pkg.rejected"


def _node_profile_ms(model: Path, feeds: dict[str, np.ndarray], runs: int = 30) -> dict[str, float]:
    """ONNX Runtime FP32 per-node time on this host (its profiler), as the build will record it."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.enable_profiling, so.profile_file_prefix = True, str(Path(d) / "p")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep one kernel per node
        s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, feeds)
        events = json.loads(Path(s.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def extend_manifest(m: dict[str, Any], model: Path) -> dict[str, Any]:
    """The lead's planned fields (layers, candidates) filled from the real model: layer costs from
    ingest, the host cost model's estimates, a real ORT profile; sensitivities, a compression record
    and a device measurement are plausible made-up figures (no such run here)."""
    from edgekit.ingest import ingest
    from edgekit.profiling.costmodel import CostModel, LayerFeatures
    from edgekit.targets import load_target

    m = json.loads(json.dumps(m))
    with tempfile.TemporaryDirectory() as work:
        spec = ingest(str(model), work)
        cost = CostModel.for_target(load_target("host-cpu"))
        feats = LayerFeatures.of_spec(spec)
        est = {p: cost.layer_ms(feats, p, "onnxruntime") for p in ("fp32", "fp16", "int8")}
        shape = [d or 1 for d in spec.inputs[0].shape]
        measured = _node_profile_ms(Path(spec.onnx_path), {spec.inputs[0].name: np.zeros(shape, np.float32)})
    rng = np.random.default_rng(0)
    weighted = [la.name for la in spec.layers if la.op_type in ("Conv", "Gemm", "MatMul")]
    sensitive = weighted[-2:]  # the classifier end: a plausible pair to keep in float
    layers = []
    for i, la in enumerate(spec.layers):
        q = la.name in weighted
        layers.append({
            "node": la.name, "op_type": la.op_type, "macs": la.macs, "params": la.params,
            "output_shape": la.output_shape, "est_ms": {p: round(v[i], 5) for p, v in est.items()},
            "measured_ms": measured.get(la.name),
            "sensitivity_db": round(float(rng.gamma(1.5, 1.2)) + 6 * (la.name in sensitive), 2) if q else None,
            # as edgekit/packaging/layer_table.py: "–" for ops that follow their neighbours in an INT8 artifact
            "precision": {a["key"]: ("–" if not q else "fp32" if a["backend"] == "openvino" and la.name in sensitive
                                     else "int8") if a["precision"] == "int8" else a["precision"]
                          for a in m["artifacts"]},
        })
    m["layers"] = layers
    arts = m["artifacts"]
    fastest = min([a for a in arts if a["verification"]["passed"]] or arts, key=lambda a: a["latency_ms"]["p50"])
    whole = {p: round(sum(v), 4) for p, v in est.items()}
    cands = [{"key": a["key"], "backend": a["backend"], "precision": a["precision"], "float_nodes": 0,
              "estimated_ms": whole[a["precision"]], "measured_ms": a["latency_ms"]["p50"], "bytes": a["bytes"],
              "accuracy": a["verification"]["accuracy"], "cosine": a["verification"]["cosine_min"],
              "verdict": "ok" if a["verification"]["passed"] else "rejected", "reason": "measured",
              "chosen": a is fastest} for a in arts]
    for ov in [a for a in arts if a["key"] == "openvino-int8"]:
        cands.append({**cands[arts.index(ov)], "key": "openvino-int8-mixed", "float_nodes": 2, "chosen": False,
                      "measured_ms": round(ov["latency_ms"]["p50"] * 1.12, 4), "bytes": int(ov["bytes"] * 1.1),
                      "accuracy": ov["verification"]["reference_accuracy"],
                      "reason": f"kept {', '.join(sensitive)} in float"})
    cands.append({**cands[0], "key": "onnxruntime-int8-pruned", "precision": "int8", "prune_ratio": 0.5,
                  "measured_ms": None, "estimated_ms": round(whole["int8"] * 0.55, 4), "bytes": arts[0]["bytes"] // 7,
                  "accuracy": None, "cosine": 0.991, "verdict": "over budget", "chosen": False,
                  "reason": "estimate only (not built): pruning needs --train"})
    m["candidates"] = cands
    m["compression"] = {
        "accuracy": {"original": 0.9675, "pruned": 0.8925, "fine-tuned (hard labels)": 0.9525, "distilled": 0.9625},
        "metric": "accuracy", "macs_before": spec.macs, "macs_after": int(spec.macs * 0.52), "macs_ratio": 0.52,
        "params_before": spec.params, "params_after": int(spec.params * 0.49),
        "latency_before_ms": {"p50": 0.61}, "latency_after_ms": {"p50": 0.37}, "speedup_fp32": 1.65,
        "accuracy_drop_points": 0.5, "passed": True,
        "prune": {"settings": {"importance": "l2", "ratio": 0.5}, "round_to": 16, "round_to_reason": "host AVX-512"},
        "distill": {"epochs_run": 12, "seconds": 41, "metric": "accuracy", "best_metric": 0.9625, "best_epoch": 10,
                    "stopped": "early stop: no gain in 3 epochs"}}
    lat = dict(fastest["latency_ms"])
    fastest["host_latency_ms"] = lat
    fastest["device_latency_ms"] = {**{k: round(v * 3.4, 4) for k, v in lat.items() if isinstance(v, float)},
                                    "runs": 200, "threads": 4, "where": "ssh://pi@rpi4.local:22",
                                    "conditions": {"power_mode": None, "clocks_locked": None,
                                                   "cpu_governor": "performance",
                                                   "temperature_c": {"cpu-thermal": 48.2},
                                                   "temperature_c_after": {"cpu-thermal": 55.1}}}
    return m


# ---------------------------------------------------------------- page content (no browser)


def test_pipeline_writes_report_html_for_passed_and_rejected_builds(package: Path, rejected: Path) -> None:
    for pkg in (package, rejected):
        page = (pkg / "report.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page
        assert (pkg / "report.md").exists()


def test_node_names_are_escaped(rejected: Path) -> None:
    page = (rejected / "report.html").read_text()
    assert EVIL not in page and RELU not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and esc(RELU) in page
    # and in the per-layer section, from the model's own layers
    m = extend_manifest(read_manifest(rejected), rejected.parent / "evil.onnx")
    page = render_html(m, rejected)
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.split('id="layers"')[1]
    assert page.count("<script") == 1  # only the page's own sorting script


def test_rejected_artifact_has_its_diverging_layer_table(rejected: Path) -> None:
    m = read_manifest(rejected)
    v = m["artifacts"][0]["verification"]
    assert not v["passed"]
    page = (rejected / "report.html").read_text()
    table = page.split('<table class="diverging">')[1].split("</table>")[0]
    debug = json.loads((rejected / "debug" / "onnxruntime-int8.json").read_text())
    assert table.count("<tr") == len(debug["layers"]) + 1  # + the header row
    first = re.search(r"<tr class=first>(.*?)</tr>", table)
    assert first and f"<td>{esc(debug['first_divergence']['tensor'])}</td>" in first.group(1)
    assert v["diverging_layer"]["node"] == EVIL  # the conv (fused with its ReLU) is blamed, and shown escaped
    assert f"First diverging layer: <b><code>{esc(EVIL)}</code></b>" in page
    # without the package folder the page says where the table would be
    assert "No per-layer table (debug/onnxruntime-int8.json)" in render_html(m)


def test_no_external_urls(package: Path, rejected: Path) -> None:
    for pkg in (package, rejected):
        page = render_html(extend_manifest(read_manifest(pkg), BUNDLED_ONNX), pkg) if pkg == package else \
            (pkg / "report.html").read_text()
        refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
        assert not [r for r in refs if re.match(r"\s*(https?:)?//", r, re.I)], refs
        assert not re.search(r"url\(\s*['\"]?(https?:)?//", page) and "@import" not in page


def test_old_manifest_without_new_fields_renders(package: Path) -> None:
    m = read_manifest(package)
    for field in ("layers", "candidates", "compression"):  # as written before edgekit recorded them
        m.pop(field, None)
    page = render_html(m)
    assert "Per-layer data was not recorded" in page and 'class="marker"' in page


def test_many_layers_are_folded_into_one_row(package: Path) -> None:
    m = extend_manifest(read_manifest(package), BUNDLED_ONNX)
    m["layers"] = [{**la, "node": f"{la['node']}#{i}"} for i in range(4) for la in m["layers"]]
    page = render_html(m, package)
    chart = page.split('<svg class="layers"')[1].split("</svg>")[0]
    assert chart.count('<g class="row">') == 41 and f"… {len(m['layers']) - 40} more layers" in chart
    assert f"All {len(m['layers'])} layers as a table" in page


def test_cli_report_regenerates_the_page(package: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    (copy / "report.html").unlink()
    r = run_cli("report", copy, "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(copy / "report.html") and (copy / "report.html").exists()
    r = run_cli("report", copy, "--out", tmp_path / "elsewhere.html")
    assert r.code == 0 and (tmp_path / "elsewhere.html").read_text().startswith("<!DOCTYPE html>")
    r = run_cli("report", tmp_path / "nothing-here")
    assert r.code == 2 and "manifest.json" in r.error_line()


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_tools(CHROMIUM, CHROMEDRIVER, install="apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(driver: Any, page: Path) -> list[dict[str, Any]]:
    driver.get(page.resolve().as_uri())
    driver.execute_script("return document.readyState")
    logs = driver.get_log("browser")
    assert not [e for e in logs if e["level"] == "SEVERE" or "Refused" in e["message"]], logs
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    return logs


def _boxes(driver: Any, selector: str) -> list[dict[str, float]]:
    return driver.execute_script("return Array.from(document.querySelectorAll(arguments[0])).map("
                                 "e => {const r = e.getBoundingClientRect(); return {w: r.width, h: r.height}})",
                                 selector)


def test_report_renders_in_chromium(browser: Any, package: Path, rejected: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(package, pkg)
    m = extend_manifest(read_manifest(pkg), BUNDLED_ONNX)
    (pkg / "manifest.json").write_text(json.dumps(m, indent=2))
    assert run_cli("report", pkg).code == 0
    _open(browser, pkg / "report.html")
    markers = _boxes(browser, "svg.pareto .marker")
    assert len(markers) == len(m["candidates"]) and all(b["w"] > 0 and b["h"] > 0 for b in markers)
    bars = _boxes(browser, "svg.layers .bar")
    assert len(bars) >= len([la for la in m["layers"] if la["macs"]]) and all(b["w"] > 0 for b in bars)
    assert len(_boxes(browser, "svg.hbar .bar")) == len(m["compression"]["accuracy"])
    # sorting works (the page's only script) and raises nothing
    browser.execute_script("document.querySelector('#summary table.sortable th:nth-child(5)').click()")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    shots = REPO / "test-results"
    shots.mkdir(exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height + 100)  # a full-page screenshot: the window as tall as the page
    browser.save_screenshot(str(shots / "report.png"))
    # the rejected build's page too: the layer table and its highlighted row are drawn
    _open(browser, rejected / "report.html")
    assert _boxes(browser, "svg.pareto .marker")[0]["w"] > 0
    assert _boxes(browser, "table.diverging tr")


def test_the_pareto_plot_draws_candidates_whose_cosines_differ_by_rounding_only() -> None:
    """Two FP32 builds verified at cosine 1.0 and 1 - 1e-16 (a real --backend all build of a slice-only model):
    the y axis once collapsed to one value and the report's build died dividing by zero."""
    from edgekit.packaging.report_svg import Point, pareto_svg

    pts = [Point("onnxruntime-fp32", "onnxruntime", 0.015, 1.0, 737, True, True, True, "ort"),
           Point("openvino-fp32", "openvino", 0.16, 1 - 1e-16, 5087, True, True, False, "ov")]
    svg = pareto_svg(pts, "cosine")
    ys = [float(v) for v in re.findall(r'<circle[^>]* cy="([0-9.]+)"', svg)]
    assert len(ys) >= 2 and all(24 <= y <= 384 for y in ys), ys  # every marker inside the plot's box
