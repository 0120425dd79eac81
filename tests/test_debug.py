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


@pytest.mark.parametrize("backend", ["onnxruntime"])
def test_rejected_build_names_a_layer_and_writes_the_table(backend: str, mobilenet_opset11: Path,
                                                           mobilenet_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    r = run_cli("build", mobilenet_opset11, "--target", "host-cpu", "--backend", backend, "--precision", "int8",
                "--calib", mobilenet_npz, "--input-shape", "images=1,3,64,64", "--min-snr-db", "150",
                "--out", out, *FAST)
    assert r.code == 1
    m = read_manifest(tmp_path / "pkg.rejected")
    table = json.loads((tmp_path / "pkg.rejected" / "debug" / f"{backend}-int8.json").read_text())
    assert table["compared"] > 10 and len(table["layers"]) == table["compared"]
    assert "diverging_layer" in m["artifacts"][0]["verification"]


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
    assert {la["matched_by"] for la in loc["layers"]} == {"order+shape"}  # ncnn renames every blob
