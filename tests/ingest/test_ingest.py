from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import BadInput
from edgekit.ingest import ingest, parse_input_shapes


def test_opset11_dynamic_model_becomes_canonical_and_computes_the_same(tmp_path: Path, mobilenet_opset11: Path):
    spec = ingest(str(mobilenet_opset11), tmp_path, {"images": [1, 3, 64, 64]})
    assert spec.source_opset == 11 and spec.opset == 17
    assert spec.inputs[0].shape == [1, 3, 64, 64]
    assert spec.outputs[0].shape == [1, 10]
    model = onnx.load(spec.onnx_path)
    # every intermediate tensor has a fully known shape after canonicalisation
    assert all(d.HasField("dim_value") for v in model.graph.value_info for d in v.type.tensor_type.shape.dim)
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    a = ort.InferenceSession(str(mobilenet_opset11)).run(None, {"images": x})[0]
    b = ort.InferenceSession(spec.onnx_path).run(None, {"images": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dynamic_spatial_dims_need_input_shape(tmp_path: Path, mobilenet_opset11: Path) -> None:
    with pytest.raises(BadInput, match=r"input 'images' has dynamic dimensions .*--input-shape images="):
        ingest(str(mobilenet_opset11), tmp_path)


def test_input_shape_parsing() -> None:
    assert parse_input_shapes(["a=1,3,640,640", "b=2x4"]) == {"a": [1, 3, 640, 640], "b": [2, 4]}
    for bad in ["a", "a=", "=1,2", "a=1,-3", "a=x,y"]:
        with pytest.raises(BadInput):
            parse_input_shapes([bad])


def _conv_gemm_model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fc = numpy_helper.from_array(rng.standard_normal((8 * 16 * 16, 5)).astype(np.float32), "fc")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
         helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w, b, fc, shape])
    path = tmp_path / "cg.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_macs_and_params_are_counted_per_layer(tmp_path: Path) -> None:
    spec = ingest(str(_conv_gemm_model(tmp_path)), tmp_path / "w", simplify=False)
    macs = {c.op_type: c.macs for c in spec.layers}
    assert macs["Conv"] == 8 * 16 * 16 * 3 * 3 * 3  # out elements x (cin x kh x kw)
    assert macs["MatMul"] == 5 * 8 * 16 * 16
    assert spec.macs == macs["Conv"] + macs["MatMul"]
    assert spec.params == 8 * 27 + 8 + 2048 * 5


def test_corrupt_truncated_and_missing_models(tmp_path: Path, mobilenet_opset11: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mobilenet_opset11.read_bytes()[: mobilenet_opset11.stat().st_size // 3])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model" * 10)
    for path in (truncated, garbage):
        with pytest.raises(BadInput, match=r"not a readable ONNX model|no graph nodes|fails the ONNX checker"):
            ingest(str(path), tmp_path / "w")
    with pytest.raises(BadInput, match="model file not found"):
        ingest(str(tmp_path / "nope.onnx"), tmp_path / "w")


def test_pytorch_factory_with_weights_only_state_dict(tmp_path: Path) -> None:
    from models import mobilenet_like

    model = mobilenet_like()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    spec = ingest("models:mobilenet_like", tmp_path / "w", {"input": [1, 3, 64, 64]}, str(weights))
    assert spec.torch_factory == "models:mobilenet_like" and spec.params > 0
    x = torch.randn(1, 3, 64, 64)
    got = ort.InferenceSession(spec.onnx_path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_pytorch_weights_with_pickled_objects_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "obj": Path("x")}, evil)  # an arbitrary class: refused by weights_only
    with pytest.raises(BadInput, match="not a loadable state_dict"):
        ingest("models:mobilenet_like", tmp_path / "w", {"input": [1, 3, 64, 64]}, str(evil))


def test_inspect_prints_io_macs_and_op_support(mobilenet_opset11: Path) -> None:
    r = run_cli("inspect", mobilenet_opset11, "--input-shape", "images=1,3,64,64", "--target", "host-cpu")
    assert r.code == 0, r.stderr
    out = r.stdout
    assert "images" in out and "[1, 3, 64, 64]" in out and "scores" in out
    assert "M MACs" in out and "total" in out
    assert "op support on host-cpu" in out and "HardSigmoid" in out and "onnxruntime" in out


def test_opset12_detector_with_resize_deconv_and_two_outputs(tmp_path: Path) -> None:
    from models import export_detector, tiny_detector

    src = export_detector(tiny_detector(), tmp_path / "det12.onnx", opset=12)
    spec = ingest(str(src), tmp_path / "w", {"images": [1, 3, 128, 160]})  # a size it was not traced at
    assert spec.opset == 17 and [o.shape for o in spec.outputs] == [[1, 3, 32, 40], [1, 4, 32, 40]]
    assert {"Resize", "ConvTranspose", "Concat"} <= set(spec.op_counts)
    x = np.random.default_rng(2).standard_normal((1, 3, 128, 160)).astype(np.float32)
    for a, b in zip(ort.InferenceSession(str(src)).run(None, {"images": x}),
                    ort.InferenceSession(spec.onnx_path).run(None, {"images": x})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
