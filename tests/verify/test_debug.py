"""Localisation: artifacts edited after conversion must be blamed on exactly the edited layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli
from onnx import numpy_helper
from openvino import opset13 as ops

EDITED = "/stages/stages.1/conv1/conv1.0/Conv"  # a conv in the middle of the bundled model


def _weight_name(node_name: str) -> str:
    node = next(n for n in onnx.load(BUNDLED_ONNX).graph.node if n.name == node_name)
    return node.input[1]


def _build(defects_data: Path, out: Path, backend: str, precision: str) -> Path:
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", backend, "--precision", precision,
                "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS,
                "--val-samples", "40", "--out", out, *FAST)
    assert r.code == 0, r.stderr
    return out


def _debug(defects_data: Path, package: Path, backend: str, precision: str, out: Path):
    return run_cli("debug", BUNDLED_ONNX, "--target", "host-cpu", "--backend", backend, "--precision", precision,
                   "--package", package, "--calib", defects_data / "calib", "--preprocess", BUNDLED_PREPROCESS,
                   "--out", out)


def _flip_half(data: np.ndarray) -> np.ndarray:
    data = data.copy()
    data[: data.shape[0] // 2] *= -1  # half the output channels change sign: a silently wrong layer
    return data


def test_openvino_edited_ir_is_blamed_on_the_edited_layer(defects_data: Path, tmp_path: Path) -> None:
    pkg = _build(defects_data, tmp_path / "pkg", "openvino", "fp32")
    xml = pkg / "openvino-fp32" / "model.xml"
    model = ov.Core().read_model(xml)
    weight = _weight_name(EDITED)
    const = next(op for op in model.get_ordered_ops() if op.get_friendly_name() == weight)
    edited = ops.constant(_flip_half(const.get_data()))
    for target in list(const.output(0).get_target_inputs()):
        target.replace_source_output(edited.output(0))
    ov.save_model(model, str(tmp_path / "edited.xml"), compress_to_fp16=False)
    (tmp_path / "edited.xml").replace(xml)
    (tmp_path / "edited.bin").replace(xml.with_suffix(".bin"))
    r = _debug(defects_data, pkg, "openvino", "fp32", tmp_path / "dbg")
    assert r.code == 1, r.stderr
    loc = json.loads((tmp_path / "dbg" / "layers.json").read_text())
    first = loc["first_divergence"]
    assert first["node"] == EDITED and first["op_type"] == "Conv" and first["cosine"] < 0.5
    assert first["inputs_from"] and first["feeds"]  # its neighbours are named
    assert f"first diverging layer {EDITED}" in r.stdout
    # the build's own verdict comes first (it verified the artifact before the edit), task metric included
    assert loc["package_verdict"]["passed"] and loc["package_verdict"]["task"]["metric"] == "accuracy"
    assert "the package's verdict: verified: accuracy " in r.stdout, r.stdout
    before = [la for la in loc["layers"] if la["tensor"] != first["tensor"]][:3]
    assert all(la["cosine"] > 0.9999 for la in before)  # layers before it agree


def test_onnxruntime_edited_int8_weights_are_blamed_on_the_edited_layer(defects_data: Path, tmp_path: Path) -> None:
    pkg = _build(defects_data, tmp_path / "pkg", "onnxruntime", "int8")
    path = pkg / "onnxruntime-int8" / "model.onnx"
    model = onnx.load(path)
    quantized = _weight_name(EDITED) + "_quantized"
    init = next(i for i in model.graph.initializer if i.name == quantized)
    init.CopyFrom(numpy_helper.from_array(_flip_half(numpy_helper.to_array(init)), quantized))
    onnx.save(model, path)
    r = _debug(defects_data, pkg, "onnxruntime", "int8", tmp_path / "dbg")
    assert r.code == 1, r.stderr
    first = json.loads((tmp_path / "dbg" / "layers.json").read_text())["first_divergence"]
    assert first["node"] == EDITED


def test_healthy_artifact_has_no_divergence(defects_data: Path, tmp_path: Path) -> None:
    r = run_cli("debug", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "openvino", "--precision", "fp16",
                "--calib", defects_data / "calib", "--preprocess", BUNDLED_PREPROCESS, "--out", tmp_path / "d")
    assert r.code == 0, r.stderr
    loc = json.loads((tmp_path / "d" / "layers.json").read_text())
    assert loc["first_divergence"] is None and loc["compared"] >= 20


# A 1x1 projection conv of the mobile model, and the depthwise conv that feeds it (through hardswish and SE).
HOSTILE = "/blocks/blocks.1/body/body.7/Conv"
DEAD_FROM = "/blocks/blocks.1/body/body.3/Conv"


def _int8_hostile(src: Path, out: Path) -> Path:
    """The mobile model with one conv edited to be hostile to INT8: input channel 0 of HOSTILE is dead
    (the depthwise conv before it gets weights 0 and bias -10: hardswish gives exactly 0), and HOSTILE's
    weights on that channel are 300x its largest. FP32 never sees them; INT8's per-output-channel weight
    scale rounds every useful weight of HOSTILE to zero, in every backend."""
    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def edit(name: str, change) -> None:
        init = inits[name]
        data = numpy_helper.to_array(init).copy()
        change(data)
        init.CopyFrom(numpy_helper.from_array(data, name))

    def dead(w: np.ndarray) -> None:
        w[0] = 0.0

    def off(b: np.ndarray) -> None:
        b[0] = -10.0

    def hostile(w: np.ndarray) -> None:
        w[:, 0] = 300 * np.abs(w).max()

    edit(nodes[DEAD_FROM].input[1], dead)
    edit(nodes[DEAD_FROM].input[2], off)
    edit(nodes[HOSTILE].input[1], hostile)
    onnx.save(model, out)
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "ncnn"])
def test_rejected_build_names_the_edited_layer(backend: str, mobilenet_opset11: Path, mobilenet_npz: Path,
                                               tmp_path: Path) -> None:
    src = _int8_hostile(mobilenet_opset11, tmp_path / "hostile.onnx")
    out = tmp_path / "pkg"
    r = run_cli("build", src, "--target", "host-cpu", "--backend", backend, "--precision", "int8",
                "--calib", mobilenet_npz, "--input-shape", "images=1,3,64,64", "--recover", "none", "--out", out,
                *FAST)
    assert r.code == 1, r.stderr
    (a,) = read_manifest(tmp_path / "pkg.rejected")["artifacts"]
    v = a["verification"]
    assert not v["passed"] and v["centred_cosine_min"] < 0.9, v
    assert v["diverging_layer"]["node"] == HOSTILE, v["diverging_layer"]
    assert v["diverging_layer"]["criterion"] == "threshold" and v["diverging_layer"]["cosine"] < 0.9
    table = json.loads((tmp_path / "pkg.rejected" / "debug" / f"{backend}-int8.json").read_text())
    assert table["first_divergence"]["node"] == HOSTILE and table["compared"] > 10
    before = [la for la in table["layers"] if la["node"] == DEAD_FROM]
    assert before and before[0]["cosine"] > 0.99  # the layer feeding it still agrees
    assert f"first diverging layer {HOSTILE}" in r.stderr + r.stdout


def test_rejection_on_snr_alone_still_names_a_layer(mobilenet_opset11: Path, mobilenet_npz: Path,
                                                    tmp_path: Path) -> None:
    """A healthy INT8 build rejected on an impossible SNR: the build names a layer (one crossing the
    thresholds, else the one adding the most error), never 'all matched tensors agree'."""
    out = tmp_path / "pkg"
    r = run_cli("build", mobilenet_opset11, "--target", "host-cpu", "--backend", "onnxruntime", "--precision",
                "int8", "--calib", mobilenet_npz, "--input-shape", "images=1,3,64,64", "--min-snr-db", "150",
                "--strict-tensors", "--recover", "none", "--out", out, *FAST)
    assert r.code == 1
    v = read_manifest(tmp_path / "pkg.rejected")["artifacts"][0]["verification"]
    table = json.loads((tmp_path / "pkg.rejected" / "debug" / "onnxruntime-int8.json").read_text())
    assert table["compared"] > 10 and len(table["layers"]) == table["compared"]
    d = v["diverging_layer"]
    assert d is not None and d["node"] == table["first_divergence"]["node"], d
    if d["criterion"] == "most added error":  # no tensor crossed: the worst one is named
        assert table["worst"]["node"] == d["node"]
    nodes = {n.name: n.op_type for n in onnx.load(mobilenet_opset11).graph.node}
    assert nodes.get(d["node"]) == d["op_type"] and d["criterion"] in ("threshold", "most added error")
    assert d["snr_db"] < d["input_snr_db"]  # it adds error to what it received
    assert "all matched tensors agree" not in r.stderr + r.stdout


def test_ncnn_edited_bin_is_blamed_on_the_edited_layer(defects_data: Path, tmp_path: Path) -> None:
    pkg = _build(defects_data, tmp_path / "pkg", "ncnn", "fp32")
    bin_path = pkg / "ncnn-fp32" / "model.ncnn.bin"
    weights = numpy_helper.to_array(next(i for i in onnx.load(BUNDLED_ONNX).graph.initializer
                                         if i.name == _weight_name(EDITED))).astype(np.float32)
    blob = bytearray(bin_path.read_bytes())
    at = blob.find(weights.tobytes())  # pnnx (fp16=0) stores the conv's weights verbatim
    assert at > 0 and blob.find(weights.tobytes(), at + 1) == -1
    blob[at:at + weights.nbytes] = _flip_half(weights).tobytes()
    bin_path.write_bytes(bytes(blob))
    r = _debug(defects_data, pkg, "ncnn", "fp32", tmp_path / "dbg")
    assert r.code == 1, r.stderr
    loc = json.loads((tmp_path / "dbg" / "layers.json").read_text())
    assert loc["first_divergence"]["node"] == EDITED
    assert f"first diverging layer {EDITED}" in (tmp_path / "dbg" / "report.md").read_text()  # as the README says
    assert {la["matched_by"] for la in loc["layers"]} == {"order+shape"}  # ncnn renames every blob


def test_non_finite_layer_outputs_are_named() -> None:
    """An FP16 overflow gives inf/NaN: it must break agreement there, not compare false with everything."""
    from edgekit.verify.localise import _row

    ref = np.linspace(-1, 1, 64)
    bad = ref.copy()
    bad[3] = np.inf
    row = _row("t", {}, "t", "name", ref, bad)
    assert row.cosine == -1.0 and row.snr_db == -200.0
    assert json.loads(json.dumps(row.__dict__))["max_abs_error"] == 1e30  # valid JSON, no NaN/Infinity
