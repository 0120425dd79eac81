"""`edgekit compare` and `edgekit check` through the CLI, on packages really built from the bundled model
(and from a really slower variant of it), timed side by side on real runtimes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli
from onnx import helper, numpy_helper

from edgekit.errors import BadInput
from edgekit.packaging.compare import parse_percent

# Side-by-side timing in tests: short, but enough rounds for the paired ratio's interval.
TIMING = ["--seconds", "0.2", "--min-runs", "100"]
# Isolates the figure under test from recorded latencies, which are not comparable run to run.
NO_LATENCY_GATE = ["--recorded", "--max-latency-regression", "1000%"]


def _slow_variant(src: Path, dst: Path, convs: int = 8) -> Path:
    """The bundled model with identity 3x3 convolutions (16 -> 16 channels at 48x48) after the stem:
    the same outputs (each output is one input times 1), about 2.5x the MACs: a really slower model."""
    m = onnx.load(src)
    g = m.graph
    tap = "/stem/stem.1/Relu_output_0"
    w = np.zeros((16, 16, 3, 3), np.float32)
    w[np.arange(16), np.arange(16), 1, 1] = 1.0
    added, prev = [], tap
    for i in range(convs):
        g.initializer.extend([numpy_helper.from_array(w, f"slow_w{i}"),
                              numpy_helper.from_array(np.zeros(16, np.float32), f"slow_b{i}")])
        added.append(helper.make_node("Conv", [prev, f"slow_w{i}", f"slow_b{i}"], [f"slow_{i}"], name=f"/slow/Conv_{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        prev = f"slow_{i}"
    for n in g.node:  # the stem's consumers now read the last identity conv
        for j, x in enumerate(n.input):
            if x == tap:
                n.input[j] = prev
    nodes = list(g.node)
    at = next(i for i, n in enumerate(nodes) if tap in n.output) + 1
    del g.node[:]
    g.node.extend(nodes[:at] + added + nodes[at:])
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    return dst


@pytest.fixture(scope="module")
def packages(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    # A real calibration mistake: 4 images of one class ("ok") calibrate the INT8 ranges.
    bad_calib = root / "bad-calib" / "ok"
    bad_calib.mkdir(parents=True)
    for f in sorted((defects_data / "calib" / "ok").iterdir())[:4]:
        shutil.copy(f, bad_calib / f.name)
    loose = ["--min-cosine", "0", "--min-snr-db", "0", "--min-top1-agreement", "0", "--max-accuracy-drop", "100"]
    slow = _slow_variant(BUNDLED_ONNX, root / "slow.onnx")
    builds = {
        "base": (BUNDLED_ONNX, "onnxruntime", "fp32,int8", defects_data / "calib", []),
        "other": (BUNDLED_ONNX, "onnxruntime,openvino", "fp32", defects_data / "calib", []),
        "openvino": (BUNDLED_ONNX, "openvino", "fp32", defects_data / "calib", []),
        "slow": (slow, "onnxruntime", "fp32,int8", defects_data / "calib", []),
        "badcal": (BUNDLED_ONNX, "onnxruntime", "fp32,int8", bad_calib.parent, loose),  # passes, less accurate
        "rejected": (BUNDLED_ONNX, "onnxruntime", "fp32,int8", bad_calib.parent, ["--recover", "none"]),  # verified
    }
    out = {}
    for name, (model, backend, precision, calib, extra) in builds.items():
        dest = root / name
        r = run_cli("build", model, "--target", "host-cpu", "--backend", backend, "--precision", precision,
                    "--calib", calib, "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS,
                    "--calib-samples", "64", "--val-samples", "100", "--out", dest, *FAST, *extra)
        if name == "rejected":  # a rejected build writes its manifest beside, as OUT.rejected
            assert r.code == 1, r.stderr
            dest = dest.with_name(dest.name + ".rejected")
        else:
            assert r.code == 0, r.stderr
        out[name] = dest
    return out


def _checks(stdout: str) -> dict[tuple[str, str], dict]:
    doc = json.loads(stdout)
    return {(c["artifact"], c["check"]): c for c in doc["checks"]}


def test_compare_lists_keys_and_size_ratios(packages: dict[str, Path]) -> None:
    a, b = packages["base"], packages["other"]
    r = run_cli("compare", a, b, *TIMING, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    where = {row["key"]: row["in"] for row in doc["artifacts"]}
    assert where == {"onnxruntime-fp32": "both", "onnxruntime-int8": "a", "openvino-fp32": "b"}
    ma, mb = read_manifest(a), read_manifest(b)
    bytes_a = {x["key"]: x["bytes"] for x in ma["artifacts"]}
    bytes_b = {x["key"]: x["bytes"] for x in mb["artifacts"]}
    row = next(x for x in doc["artifacts"] if x["key"] == "onnxruntime-fp32")
    assert row["bytes"] == {"a": bytes_a["onnxruntime-fp32"], "b": bytes_b["onnxruntime-fp32"],
                            "ratio": round(bytes_b["onnxruntime-fp32"] / bytes_a["onnxruntime-fp32"], 4)}
    assert doc["source"]["same"] and doc["target"]["same"]
    # Re-measured here, both packages in one interleaved run, including artifacts only one package has.
    assert doc["latency"]["mode"] == "side by side"
    lat = row["latency"]
    assert lat["source"] == "side by side" and lat["a"]["runs"] >= 100 and lat["b"]["runs"] >= 100
    assert lat["p50_ratio"] == pytest.approx(lat["b"]["p50"] / lat["a"]["p50"], rel=1e-3)
    assert lat["paired"]["rounds"] >= 4
    only = {x["key"]: x for x in doc["artifacts"] if x["in"] != "both"}
    assert only["onnxruntime-int8"]["latency"]["a"]["runs"] >= 100 and only["openvino-fp32"]["latency"]["b"]["runs"]
    # What the plans did differently: base quantized (INT8 settings), other did not.
    assert only["onnxruntime-int8"]["bytes"] == {"a": bytes_a["onnxruntime-int8"], "b": None, "ratio": None}


def test_compare_recorded_says_so_in_tables(packages: dict[str, Path]) -> None:
    r = run_cli("compare", packages["base"], packages["slow"], "--recorded")
    assert r.code == 0, r.stderr
    assert "recorded latencies from the two manifests, measured at different times" in r.stdout
    assert "source model: DIFFERENT" in r.stdout
    for key in ("onnxruntime-fp32", "onnxruntime-int8"):
        assert key in r.stdout
    assert "size and latency" in r.stdout and "accuracy and verification" in r.stdout


def test_check_passes_against_itself(packages: dict[str, Path]) -> None:
    base = packages["base"]
    r = run_cli("check", base, "--baseline", base, "--max-latency-regression", "5%", "--max-accuracy-drop", "0.5",
                "--max-size-increase", "10", *TIMING, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["passed"] and doc["exit_code"] == 0 and doc["limits"]["max_size_increase"] == pytest.approx(0.10)
    checks = _checks(r.stdout)
    for key in ("onnxruntime-fp32", "onnxruntime-int8"):
        lat = checks[(key, "latency p50")]
        assert lat["status"] == "PASS"
        row = next(x for x in doc["comparison"]["artifacts"] if x["key"] == key)["latency"]
        assert row["source"] == "side by side" and row["a"]["runs"] >= 100
        # The same files timed side by side: both ratios are noise around 1.
        assert 0.8 <= row["p50_ratio"] <= 1.25 and 0.8 <= row["paired"]["ratio"] <= 1.25
        assert checks[(key, "accuracy")]["value"] == 0 and checks[(key, "size")]["value"] == 1.0
        assert checks[(key, "verification")]["status"] == "PASS"
    assert doc["summary"].startswith("check passed")


def test_check_fails_on_a_slower_model(packages: dict[str, Path]) -> None:
    r = run_cli("check", packages["slow"], "--baseline", packages["base"], "--max-latency-regression", "5%",
                "--max-accuracy-drop", "0.5", *TIMING, "--json")
    assert r.code == 1, r.stderr
    checks = _checks(r.stdout)
    fp32 = checks[("onnxruntime-fp32", "latency p50")]
    assert fp32["status"] == "FAIL" and fp32["value"] > 1.5  # ~2.5x the MACs
    assert checks[("onnxruntime-fp32", "accuracy")]["status"] == "PASS"  # identity layers: same outputs
    doc = json.loads(r.stdout)
    assert not doc["passed"] and not doc["comparison"]["source"]["same"]
    paired = next(x for x in doc["comparison"]["artifacts"] if x["key"] == "onnxruntime-fp32")["latency"]["paired"]
    assert paired["low"] > 1.05  # the whole interval is over the limit, not a noisy sample
    # Text mode: the table and the one summary line.
    t = run_cli("check", packages["slow"], "--baseline", packages["base"], "--artifact", "onnxruntime-fp32",
                *TIMING)
    assert t.code == 1
    assert "FAIL" in t.stdout and "latency p50" in t.stdout
    summary = [ln for ln in t.stdout.splitlines() if ln.startswith("check ")]
    assert len(summary) == 1 and summary[0].startswith("check FAILED: 1 of 3 checks")


def test_check_fails_on_an_accuracy_drop(packages: dict[str, Path]) -> None:
    base, bad = packages["base"], packages["badcal"]
    r = run_cli("check", bad, "--baseline", base, "--max-accuracy-drop", "0.5", *NO_LATENCY_GATE, "--json")
    assert r.code == 1, r.stderr
    checks = _checks(r.stdout)
    acc_base = next(a for a in read_manifest(base)["artifacts"] if a["key"] == "onnxruntime-int8")
    acc_bad = next(a for a in read_manifest(bad)["artifacts"] if a["key"] == "onnxruntime-int8")
    drop = 100 * (acc_base["verification"]["accuracy"] - acc_bad["verification"]["accuracy"])
    assert drop > 0.5  # 4 calibration images of one class really cost accuracy
    int8 = checks[("onnxruntime-int8", "accuracy")]
    assert int8["status"] == "FAIL" and int8["value"] == pytest.approx(drop, abs=1e-3)
    assert checks[("onnxruntime-int8", "verification")]["status"] == "PASS"  # built with loose thresholds
    assert checks[("onnxruntime-fp32", "accuracy")]["status"] == "PASS"
    # A larger budget accepts the same drop.
    ok = run_cli("check", bad, "--baseline", base, "--max-accuracy-drop", str(drop + 1), *NO_LATENCY_GATE, "--json")
    assert ok.code == 0, ok.stdout
    assert _checks(ok.stdout)[("onnxruntime-int8", "accuracy")]["status"] == "PASS"


def test_check_fails_when_verification_now_rejects(packages: dict[str, Path]) -> None:
    r = run_cli("check", packages["rejected"], "--baseline", packages["base"], *NO_LATENCY_GATE, "--json")
    assert r.code == 1, r.stderr
    v = _checks(r.stdout)[("onnxruntime-int8", "verification")]
    assert v["status"] == "FAIL" and v["figure"] == "passed -> rejected"


def test_check_fails_when_an_artifact_is_missing(packages: dict[str, Path]) -> None:
    r = run_cli("check", packages["other"], "--baseline", packages["base"], *NO_LATENCY_GATE, "--json")
    assert r.code == 1, r.stderr
    checks = _checks(r.stdout)
    assert checks[("onnxruntime-int8", "present")]["status"] == "FAIL"
    assert checks[("onnxruntime-fp32", "verification")]["status"] == "PASS"
    assert ("openvino-fp32", "present") not in checks  # new in the new package: nothing to regress against


def test_check_bad_input_exits_2_with_one_line(packages: dict[str, Path], tmp_path: Path) -> None:
    base = packages["base"]
    r = run_cli("check", base, "--baseline", base, "--max-latency-regression", "five")
    assert r.code == 2 and "--max-latency-regression" in r.error_line()
    r = run_cli("check", base, "--baseline", base, "--max-size-increase", "-3%")
    assert r.code == 2 and "--max-size-increase" in r.error_line()
    r = run_cli("check", tmp_path, "--baseline", base)
    assert r.code == 2 and "not an edgekit package" in r.error_line()
    r = run_cli("check", packages["openvino"], "--baseline", base)
    assert r.code == 2 and "no artifact in common" in r.error_line()
    r = run_cli("check", base, "--baseline", base, "--artifact", "ncnn-int8", "--json")
    assert r.code == 2 and json.loads(r.stdout)["exit_code"] == 2


def test_percent_rule() -> None:
    assert parse_percent("5%") == parse_percent("5") == pytest.approx(0.05)
    assert parse_percent("0.05") == pytest.approx(0.0005)  # 0.05 percent, never 5%
    assert parse_percent(" 12.5 % ") == pytest.approx(0.125)
    for bad in ("", "%", "5 percent", "-1", "nan", "inf"):
        with pytest.raises(BadInput):
            parse_percent(bad)
