"""OpenVINO renames and fuses what converters named (paddle2onnx's `p2o.Conv.61`, `conv2d_417.w_0`): a Conv
with the BatchNorm or channel scale after it becomes one Convolution called `Multiply_123`, with rescaled
weights. The FP16 keep-list, NNCF's ignored scope and the mixed-precision search must still find each
ONNX node's ops and weights in the IR: by name, by output tensor, else by weights (proportional per
output channel)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as h

from edgekit import backends
from edgekit.backends.openvino import _ignored_ops, map_weighted_nodes
from edgekit.data import Dataset
from edgekit.ingest import ingest
from edgekit.planning.types import ArtifactPlan, QuantizationSettings


def _paddle_like(path: Path) -> Path:
    """Conv (weights mostly below FP16's normal range) -> BatchNormalization -> Relu -> Conv -> channel Mul ->
    pool -> Gemm, named as paddle2onnx names them; opset 13, not simplified."""
    r = np.random.default_rng(0)

    def init(name: str, a: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(a.astype(np.float32), name)

    inits = [init("conv2d_417.w_0", r.standard_normal((8, 3, 3, 3)) * 2e-6),
             init("bn.scale", r.uniform(1e4, 3e4, 8)), init("bn.bias", r.standard_normal(8) * 0.1),
             init("bn.mean", r.standard_normal(8) * 1e-6), init("bn.var", r.uniform(0.5, 2, 8)),
             init("conv2d_420.w_0", r.standard_normal((8, 8, 3, 3)) * 0.2),
             init("scale.w_0", r.uniform(0.5, 2, (1, 8, 1, 1))),
             init("fc_0.w_0", r.standard_normal((8, 4))), init("fc_0.b_0", r.standard_normal(4) * 0.1)]
    nodes = [h.make_node("Conv", ["x", "conv2d_417.w_0"], ["conv2d_417.tmp_0"], "p2o.Conv.0", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["conv2d_417.tmp_0", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
                         ["bn.tmp_0"], "p2o.BatchNormalization.1"),
             h.make_node("Relu", ["bn.tmp_0"], ["relu_0.tmp_0"], "p2o.Relu.2"),
             h.make_node("Conv", ["relu_0.tmp_0", "conv2d_420.w_0"], ["conv2d_420.tmp_0"], "p2o.Conv.3",
                         pads=[1, 1, 1, 1]),
             h.make_node("Mul", ["conv2d_420.tmp_0", "scale.w_0"], ["scale.tmp_0"], "p2o.Mul.4"),
             h.make_node("Relu", ["scale.tmp_0"], ["relu_1.tmp_0"], "p2o.Relu.5"),
             h.make_node("GlobalAveragePool", ["relu_1.tmp_0"], ["pool.tmp_0"], "p2o.GlobalAveragePool.6"),
             h.make_node("Flatten", ["pool.tmp_0"], ["flatten.tmp_0"], "p2o.Flatten.7"),
             h.make_node("Gemm", ["flatten.tmp_0", "fc_0.w_0", "fc_0.b_0"], ["fetch_name_0"], "p2o.Gemm.8")]
    graph = h.make_graph(nodes, "paddle_like", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                         [h.make_tensor_value_info("fetch_name_0", TensorProto.FLOAT, [1, 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _paddle_like(tmp_path_factory.mktemp("p2o") / "paddle_like.onnx")


@pytest.fixture(scope="module")
def spec(raw: Path, tmp_path_factory: pytest.TempPathFactory):
    """The ModelSpec of the model, pointed at the unsimplified graph: OpenVINO sees what onnxslim would have
    folded itself, and does the renaming fusions a converter's real graphs leave to it."""
    s = ingest(str(raw), tmp_path_factory.mktemp("ingest"), {}, None)
    return dataclasses.replace(s, onnx_path=str(raw))


def test_fused_and_renamed_convs_are_found_by_their_weights(raw: Path, spec) -> None:
    model = onnx.load(raw)
    ir = ov.convert_model(str(raw))
    names = {op.get_friendly_name() for op in ir.get_ordered_ops()}
    assert not any(n.startswith("p2o.Conv.0") for n in names)  # OpenVINO renamed the fused conv
    found = map_weighted_nodes(model, ir, ["p2o.Conv.0", "p2o.Conv.3", "p2o.Gemm.8"])
    assert set(found) == {"p2o.Conv.0", "p2o.Conv.3", "p2o.Gemm.8"}
    convs = {op.get_friendly_name(): op.get_type_name() for op in ir.get_ordered_ops()}
    for node, hit in found.items():
        assert hit.by == "weights" and convs[hit.ops[0]] in ("Convolution", "MatMul"), (node, hit)
    assert found["p2o.Conv.0"].ops[0] != found["p2o.Conv.3"].ops[0]
    ops, fused = _ignored_ops(spec, ir, ["p2o.Conv.0", "p2o.Relu.2", "p2o.Conv.3"])
    assert found["p2o.Conv.0"].ops[0] in ops and found["p2o.Conv.3"].ops[0] in ops and "p2o.Relu.2" in ops
    assert fused == []


def test_fp16_keeps_the_out_of_range_conv_and_int8_ignores_the_named_ones(spec, raw: Path, tmp_path: Path) -> None:
    backend = backends.get("openvino")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 1, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
    expected = np.concatenate([ref.run(None, {"x": s})[0] for s in x])

    def outputs(art) -> np.ndarray:
        session = backend.load(art, 1)
        return np.concatenate([session.run({"x": s})[0] for s in x])

    (tmp_path / "fp16").mkdir()
    art = backend.export(spec, ArtifactPlan("openvino", "fp16"), None, tmp_path / "fp16")
    assert art.details["keep_fp32"] == ["p2o.Conv.0"]
    got = outputs(art)
    cos = float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))
    assert cos > 0.999, cos  # the tiny weights were not flushed to zero by FP16 compression
    calibration = Dataset({"x": rng.standard_normal((64, 3, 16, 16)).astype(np.float32)})
    plan = ArtifactPlan("openvino", "int8", QuantizationSettings(samples=64, exclude_nodes=["p2o.Conv.0"]))
    (tmp_path / "int8").mkdir()
    art = backend.export(spec, plan, calibration, tmp_path / "int8")
    quantized = ov.Core().read_model(str(Path(art.root) / "model.xml"))
    ops = {op.get_friendly_name(): op for op in quantized.get_ordered_ops()}
    kept = [ops[n] for n in art.details["ignored_ops"] if n in ops and ops[n].get_type_name() == "Convolution"]
    assert len(kept) == 1, art.details["ignored_ops"]  # the renamed conv of p2o.Conv.0, in float
    sources = {kept[0].input_value(i).get_node().get_type_name() for i in range(kept[0].get_input_size())}
    assert "FakeQuantize" not in sources
    other = [op for op in quantized.get_ordered_ops() if op.get_type_name() == "Convolution" and op is not kept[0]]
    assert other and all("FakeQuantize" in {op.input_value(i).get_node().get_type_name() for i in range(2)}
                         for op in other)  # the rest is quantized
