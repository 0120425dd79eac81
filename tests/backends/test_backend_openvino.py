from __future__ import annotations

from pathlib import Path

import onnx
import openvino as ov
import pytest
from onnx import helper
from test_backend_onnxruntime import _calib, _conv_model, _mk

from edgekit import backends
from edgekit.errors import BadInput
from edgekit.ingest import ingest
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
from edgekit.verify.verifier import Thresholds, run_all
from edgekit.verify.verifier import verify_outputs as compare


def _reference(spec, tmp_path: Path, batches):
    ort = backends.get("onnxruntime")
    return run_all(ort.load(ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, _mk(tmp_path / "ref")), 1),
                   batches)


def test_fp32_ir_matches_onnxruntime(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    ovb = backends.get("openvino")
    art = ovb.export(spec, ArtifactPlan("openvino", "fp32"), None, _mk(tmp_path / "a"))
    assert sorted(art.files) == ["model.bin", "model.xml"]
    batches = _calib(8).batches(spec)
    v = compare(_reference(spec, tmp_path, batches), run_all(ovb.load(art, 1), batches), ["y"], None, Thresholds())
    assert v.cosine_min > 0.99999 and v.snr_db_min > 60


def test_fp16_compresses_weights_but_keeps_out_of_range_layers_fp32(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx", weight_scale=1e-6)), tmp_path / "w")
    ovb = backends.get("openvino")
    art = ovb.export(spec, ArtifactPlan("openvino", "fp16"), None, _mk(tmp_path / "a"))
    assert art.details["keep_fp32"] == ["tiny_conv"] and "below 2^-14" in art.notes[0]
    consts = {op.get_friendly_name(): str(op.get_element_type()) for op in ov.Core().read_model(art.entry_path)
              .get_ordered_ops() if op.get_type_name() == "Constant"}
    assert consts["w1"] == "<Type: 'float32'>"  # the tiny layer stayed FP32
    assert consts["w2_compressed"] == "<Type: 'float16'>"  # the other did not
    batches = _calib(8).batches(spec)
    v = compare(_reference(spec, tmp_path, batches), run_all(ovb.load(art, 1), batches), ["y"], None, Thresholds())
    assert v.cosine_min > 0.999


def test_int8_by_nncf_is_quantized_and_agrees(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    ovb = backends.get("openvino")
    plan = ArtifactPlan("openvino", "int8", QuantizationSettings(samples=32))
    art = ovb.export(spec, plan, _calib(32), _mk(tmp_path / "a"))
    types = [op.get_type_name() for op in ov.Core().read_model(art.entry_path).get_ordered_ops()]
    assert "FakeQuantize" in types  # NNCF's INT8 representation in the IR
    assert art.details["quantizer"] == "nncf.quantize" and art.details["calibration_samples"] == 32
    batches = _calib(8).batches(spec)
    v = compare(_reference(spec, tmp_path, batches), run_all(ovb.load(art, 1), batches), ["y"], None, Thresholds())
    assert v.cosine_min > 0.99


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    path = _conv_model(tmp_path / "custom.onnx")
    m = onnx.load(path)
    m.graph.node.append(helper.make_node("MagicNMS", ["y"], ["z"], name="vendor_nms", domain="com.vendor"))
    m.graph.output[0].name = "z"
    m.opset_import.append(helper.make_opsetid("com.vendor", 1))
    issues = backends.get("openvino").unsupported_nodes(m)
    assert [(i.op_type, i.node, i.backend) for i in issues] == [("MagicNMS", "vendor_nms", "openvino")]


def _quantized_inputs(xml: Path) -> dict[str, int]:
    """Per Convolution op: how many of its inputs a FakeQuantize feeds (NNCF quantizes activations so)."""
    ops = [op for op in ov.Core().read_model(xml).get_ordered_ops() if op.get_type_name() == "Convolution"]
    return {op.get_friendly_name(): sum(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                                        for i in op.inputs()) for op in ops}


def test_int8_ignored_scope_names_are_checked(tmp_path: Path) -> None:
    """`project` produces the model output, so OpenVINO names its op `y`: a name pattern alone missed it
    (quantized, yet recorded as excluded). A misspelled name is an error naming it."""
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    ovb = backends.get("openvino")
    plain = ovb.export(spec, ArtifactPlan("openvino", "int8", QuantizationSettings(samples=32)), _calib(32),
                       _mk(tmp_path / "a"))
    assert _quantized_inputs(plain.entry_path) == {"tiny_conv": 1, "y": 1}
    plan = ArtifactPlan("openvino", "int8", QuantizationSettings(samples=32, exclude_nodes=["project"]))
    art = ovb.export(spec, plan, _calib(32), _mk(tmp_path / "b"))
    assert _quantized_inputs(art.entry_path) == {"tiny_conv": 1, "y": 0}  # the named conv stayed float
    assert art.details["excluded_nodes"] == ["project"] and art.details["ignored_ops"] == ["y"]
    typo = ArtifactPlan("openvino", "int8", QuantizationSettings(samples=32, exclude_nodes=["projekt"]))
    with pytest.raises(BadInput, match="'projekt'"):
        ovb.export(spec, typo, _calib(32), _mk(tmp_path / "c"))


def test_latency_hint_and_threads_are_recorded(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    ovb = backends.get("openvino")
    art = ovb.export(spec, ArtifactPlan("openvino", "fp32"), None, _mk(tmp_path / "a"))
    assert art.details["runtime_config"]["PERFORMANCE_HINT"] == "LATENCY"
    ovb.load(art, 2)  # as verification loads it, with the build's threads: what OpenVINO applied
    assert art.details["runtime_config"] == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2,
                                             "INFERENCE_PRECISION_HINT": "f32"}


def test_fp16_keep_fp32_names_are_checked(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    ovb = backends.get("openvino")
    art = ovb.export(spec, ArtifactPlan("openvino", "fp16", keep_fp32=["project"]), None, _mk(tmp_path / "a"))
    consts = {op.get_friendly_name(): op.get_element_type().get_type_name()
              for op in ov.Core().read_model(art.entry_path).get_ordered_ops() if op.get_type_name() == "Constant"}
    assert consts["w2"] == "f32" and consts["w1_compressed"] == "f16" and art.details["keep_fp32"] == ["project"]
    with pytest.raises(BadInput, match="'projekt'"):
        ovb.export(spec, ArtifactPlan("openvino", "fp16", keep_fp32=["projekt"]), None, _mk(tmp_path / "b"))
