"""ONNX -> torch conversion: each op against ONNX Runtime, whole models, and pruning the result."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import BUNDLED_ONNX
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgekit.compress.onnx_to_torch import NotConvertible, onnx_to_torch
from edgekit.errors import BadInput
from edgekit.ingest import ingest

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], inits: dict[str, np.ndarray],
           outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _torch(module: nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _check(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], inits: dict[str, np.ndarray] | None = None,
           outputs: list[str] | None = None, opset: int = 17, tol: float = 1e-4) -> nn.Module:
    model = _model(nodes, inputs, inits or {}, outputs or ["y"], opset)
    feeds = {n: _rand(*s) for n, s in inputs.items()}
    module = onnx_to_torch(model)
    for ref, got in zip(_ort(model, feeds), _torch(module, feeds)):
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < tol
    return module


def _node(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs or ["y"], name=f"my/{op}.0", **attrs)


X = {"x": [1, 4, 9, 9]}


# ---------------------------------------------------------------- layers with weights


@pytest.mark.parametrize("attrs, w_shape, bias", [
    ({"pads": [1, 1, 1, 1]}, [6, 4, 3, 3], True),
    ({"group": 2, "dilations": [2, 2], "strides": [2, 2], "pads": [2, 2, 2, 2]}, [6, 2, 3, 3], True),
    ({"group": 4, "pads": [1, 1, 1, 1]}, [4, 1, 3, 3], False),  # depthwise
    ({"pads": [0, 0, 1, 1], "strides": [2, 2]}, [6, 4, 3, 3], True),  # asymmetric, as TF exports
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, [6, 4, 3, 3], False),
    ({"pads": [1, 0, 2, 1]}, [6, 4, 2, 3], True),
])
def test_conv(attrs: dict, w_shape: list[int], bias: bool) -> None:
    inits = {"w": _rand(*w_shape)} | ({"b": _rand(w_shape[0])} if bias else {})
    module = _check([_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], **attrs)], X, inits)
    assert isinstance(module.my_Conv_0, nn.Conv2d)  # named after the ONNX node, a real layer


@pytest.mark.parametrize("attrs, w_shape", [
    ({"strides": [2, 2]}, [4, 3, 2, 2]),
    ({"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, [4, 3, 3, 3]),
    ({"group": 2, "strides": [2, 2]}, [4, 2, 3, 3]),
    ({"strides": [2, 2], "pads": [0, 1, 1, 0]}, [4, 3, 3, 3]),  # asymmetric: cropped after the layer
])
def test_conv_transpose(attrs: dict, w_shape: list[int]) -> None:
    module = _check([_node("ConvTranspose", ["x", "w", "b"], **attrs)], X,
                    {"w": _rand(*w_shape), "b": _rand(w_shape[1] * attrs.get("group", 1))})
    assert isinstance(module.my_ConvTranspose_0, nn.ConvTranspose2d)


def test_batch_norm() -> None:
    inits = {"s": _rand(4), "b": _rand(4), "m": _rand(4), "v": np.abs(_rand(4)) + 0.1}
    module = _check([_node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)], X, inits)
    bn = module.my_BatchNormalization_0
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.eps == pytest.approx(1e-3)


@pytest.mark.parametrize("attrs, w_shape, c_shape", [
    ({"transB": 1}, [5, 8], [5]),
    ({}, [8, 5], [5]),
    ({"transB": 1, "alpha": 0.5, "beta": 2.0}, [5, 8], [1, 5]),
    ({"transB": 1}, [5, 8], None),
])
def test_gemm(attrs: dict, w_shape: list[int], c_shape: list[int] | None) -> None:
    inits = {"w": _rand(*w_shape)} | ({"c": _rand(*c_shape)} if c_shape else {})
    module = _check([_node("Gemm", ["x", "w", "c"] if c_shape else ["x", "w"], **attrs)], {"x": [3, 8]}, inits)
    assert isinstance(module.my_Gemm_0, nn.Linear)


def test_matmul_add_becomes_one_linear() -> None:
    nodes = [_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"], name="bias")]
    module = _check(nodes, {"x": [1, 5, 8]}, {"w": _rand(8, 4), "b": _rand(4)})
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is not None


def test_matmul_between_activations() -> None:
    _check([_node("MatMul", ["a", "b"])], {"a": [2, 3, 4], "b": [2, 4, 5]})


# ---------------------------------------------------------------- activations


@pytest.mark.parametrize("op, attrs, layer", [
    ("Relu", {}, nn.ReLU),
    ("HardSwish", {}, nn.Hardswish),
    ("HardSigmoid", {}, None),  # ONNX default alpha=0.2: not torch's 1/6
    ("HardSigmoid", {"alpha": 1 / 6}, nn.Hardsigmoid),
    ("Sigmoid", {}, nn.Sigmoid),
    ("Tanh", {}, nn.Tanh),
    ("LeakyRelu", {"alpha": 0.1}, nn.LeakyReLU),
    ("LeakyRelu", {}, nn.LeakyReLU),
    ("Elu", {"alpha": 0.7}, nn.ELU),
])
def test_activation(op: str, attrs: dict, layer: type | None) -> None:
    module = _check([_node(op, ["x"], **attrs)], X)
    if layer is not None:
        assert isinstance(getattr(module, f"my_{op}_0"), layer)


@pytest.mark.parametrize("low, high, layer", [(0.0, 6.0, nn.ReLU6), (-1.0, 1.0, nn.Hardtanh), (0.0, None, nn.ReLU),
                                              (None, 0.5, None)])
def test_clip(low: float | None, high: float | None, layer: type | None) -> None:
    inits = {k: np.array(v, np.float32) for k, v in (("lo", low), ("hi", high)) if v is not None}
    module = _check([_node("Clip", ["x", "lo" if low is not None else "", "hi" if high is not None else ""])], X,
                    inits)
    if layer is not None:
        assert isinstance(module.my_Clip_0, layer)


def test_swish_pattern() -> None:
    _check([_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])], X)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("op, attrs", [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [0, 0, 1, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [0, 0, 1, 1], "count_include_pad": 1}),
])
def test_pool(op: str, attrs: dict) -> None:
    _check([_node(op, ["x"], **attrs)], X)


@pytest.mark.parametrize("op, layer", [("GlobalAveragePool", nn.AdaptiveAvgPool2d),
                                       ("GlobalMaxPool", nn.AdaptiveMaxPool2d)])
def test_global_pool(op: str, layer: type) -> None:
    assert isinstance(getattr(_check([_node(op, ["x"])], X), f"my_{op}_0"), layer)


def test_average_pool_refuses_what_torch_cannot_count() -> None:
    model = _model([_node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[0, 0, 1, 1])], X, {}, ["y"])
    with pytest.raises(NotConvertible, match="count_include_pad=0"):
        onnx_to_torch(model)


# ---------------------------------------------------------------- elementwise, shape and layout ops


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("other", ["channel", "scalar", "activation", "scalar_first"])
def test_binary(op: str, other: str) -> None:
    inputs, inits = dict(X), {}
    names = ["x", "c"]
    if other == "channel":
        inits["c"] = _rand(1, 4, 1, 1) + 3
    elif other in ("scalar", "scalar_first"):
        inits["c"] = np.array(2.5, np.float32)
        names = ["c", "x"] if other == "scalar_first" else names
    else:
        inputs["c"] = [1, 4, 9, 9]
    _check([_node(op, names)], inputs, inits, tol=1e-3 if op == "Div" and other == "activation" else 1e-4)


def test_concat_with_constant() -> None:
    _check([_node("Concat", ["x", "z", "k"], axis=1)], {"x": [1, 4, 9, 9], "z": [1, 2, 9, 9]},
           {"k": _rand(1, 3, 9, 9)})


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([0], [2], [1], None),  # a YOLOv8 head's box/score split
    ([1, 2], [2**63 - 1, -1], [2, 3], [2, 1]),  # ONNX's "to the end", a stride
    ([-1], [-(2**63)], [1], [-1]),  # reversed channels: torch has no negative step
    ([8, 0], [1, 9], [-1, 2], [-3, 4]),
])
def test_slice(starts: list[int], ends: list[int], axes: list[int], steps: list[int] | None) -> None:
    inits = {"s": np.array(starts, np.int64), "e": np.array(ends, np.int64), "a": np.array(axes, np.int64)}
    names = ["x", "s", "e", "a"]
    if steps is not None:
        inits["t"] = np.array(steps, np.int64)
        names.append("t")
    _check([_node("Slice", names)], X, inits)


@pytest.mark.parametrize("axis", [1, 2, 0])
def test_flatten(axis: int) -> None:
    _check([_node("Flatten", ["x"], axis=axis)], X)


@pytest.mark.parametrize("shape", [[1, -1], [0, 4, 81], [1, 2, 2, 81], [-1, 9]])
def test_reshape(shape: list[int]) -> None:
    _check([_node("Reshape", ["x", "s"])], X, {"s": np.array(shape, np.int64)})


@pytest.mark.parametrize("axis", [1, -1])
def test_softmax(axis: int) -> None:
    _check([_node("Softmax", ["x"], axis=axis)], X)


def test_transpose_squeeze_unsqueeze() -> None:
    nodes = [_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Unsqueeze", ["t", "a"], ["u"]),
             helper.make_node("Squeeze", ["u", "a"], ["y"])]
    _check(nodes, X, {"a": np.array([0, 5], np.int64)})


def test_squeeze_without_axes() -> None:
    _check([_node("Squeeze", ["x"])], {"x": [1, 4, 1, 9]})


def test_identity_dropout_reduce_mean() -> None:
    nodes = [_node("Identity", ["x"], ["i"]), helper.make_node("Dropout", ["i"], ["d"]),
             helper.make_node("ReduceMean", ["d"], ["y"], axes=[2, 3], keepdims=1)]
    _check(nodes, X)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode: str) -> None:
    _check([_node("Pad", ["x", "p"], mode=mode)], X, {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)})


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("attrs, scales, sizes", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 2], None),
    ({"mode": "nearest"}, [1, 1, 2, 2], None),  # half_pixel + round_prefer_floor, the defaults
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, None,
     [1, 4, 4, 4]),
    ({"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, [1, 1, 3, 3], None),
    ({"mode": "linear"}, [1, 1, 2, 2], None),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 1, 2, 2], None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [1, 4, 13, 17]),
    ({"mode": "linear"}, None, [1, 4, 5, 5]),
    ({"mode": "cubic"}, [1, 1, 2, 2], None),
])
def test_resize(attrs: dict, scales: list[float] | None, sizes: list[int] | None) -> None:
    inits = {"roi": np.zeros(0, np.float32), "sc": np.array(scales or [], np.float32)}
    if sizes:
        inits["sz"] = np.array(sizes, np.int64)
    _check([_node("Resize", ["x", "roi", "sc", "sz"] if sizes else ["x", "roi", "sc"], **attrs)], X, inits)


def test_resize_nearest_ties_pick_the_matching_torch_mode() -> None:
    # half_pixel + round_prefer_floor downscaling by 2 lands exactly on .5: nearest-exact would round up,
    # legacy nearest picks the same pixels as ONNX; the index-by-index comparison must find that
    inits = {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 0.5, 0.5], np.float32)}
    _check([_node("Resize", ["x", "roi", "sc"], mode="nearest")], {"x": [1, 4, 8, 8]}, inits)


def test_resize_nearest_without_torch_equivalent_is_refused() -> None:
    node = _node("Resize", ["x", "roi", "sc"], mode="nearest", coordinate_transformation_mode="asymmetric",
                 nearest_mode="ceil")
    model = _model([node], X, {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 2, 2], np.float32)}, ["y"])
    with pytest.raises(NotConvertible, match="nearest Resize with asymmetric/ceil"):
        onnx_to_torch(model)


def test_upsample_opset9() -> None:
    _check([_node("Upsample", ["x", "sc"], mode="nearest")], X, {"sc": np.array([1, 1, 2, 2], np.float32)}, opset=9)


# ---------------------------------------------------------------- what cannot be converted


def test_unsupported_op_names_op_node_and_fix() -> None:
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["y"], name="post/nms")
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 10, 4]),
                                            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 10])],
                              [helper.make_empty_tensor_value_info("y")])
    with pytest.raises(BadInput) as err:
        onnx_to_torch(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    message = str(err.value)
    assert isinstance(err.value, NotConvertible) and "\n" not in message
    assert "NonMaxSuppression" in message and "post/nms" in message
    assert "--model package.module:factory --weights W.pt" in message


def test_custom_domain_op_is_refused() -> None:
    node = helper.make_node("FusedConv", ["x"], ["y"], name="vendor_conv", domain="com.vendor")
    model = helper.make_model(
        helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                          [helper.make_empty_tensor_value_info("y")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.vendor", 1)])
    with pytest.raises(NotConvertible, match=r"com\.vendor::FusedConv \(node 'vendor_conv'\)"):
        onnx_to_torch(model)


# ---------------------------------------------------------------- whole models


def _defectnet(tmp: Path) -> onnx.ModelProto:
    return onnx.load(ingest(str(BUNDLED_ONNX), tmp / "w").onnx_path)


def _mobilenet(tmp: Path) -> onnx.ModelProto:
    from models import export_dynamic, mobilenet_like

    src = export_dynamic(mobilenet_like(), tmp / "m.onnx", opset=11)
    return onnx.load(ingest(str(src), tmp / "w", input_shapes={"images": [1, 3, 64, 64]}).onnx_path)


def _detector(tmp: Path) -> onnx.ModelProto:
    from models import export_detector, tiny_detector

    src = export_detector(tiny_detector(), tmp / "d.onnx", opset=12)
    return onnx.load(ingest(str(src), tmp / "w", input_shapes={"images": [1, 3, 96, 96]}).onnx_path)


def _feeds(model: onnx.ModelProto, batch: int = 1) -> dict[str, np.ndarray]:
    feeds = {}
    for v in model.graph.input:
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = _rand(batch, *shape[1:])
    return feeds


def _agree(module: nn.Module, model: onnx.ModelProto) -> None:
    feeds = _feeds(model)
    for ref, got in zip(_ort(model, feeds), _torch(module, feeds)):
        cosine = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cosine > 0.99999
        assert np.abs(ref - got).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("load", [_defectnet, _mobilenet, _detector], ids=["defectnet", "mobilenet", "detector"])
def test_whole_model_matches_onnxruntime(load, tmp_path: Path) -> None:
    model = load(tmp_path)
    module = onnx_to_torch(model)
    _agree(module, model)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert sum(isinstance(m, nn.Conv2d) for m in module.modules()) == convs  # every conv a real layer


@pytest.mark.parametrize("load", [_defectnet, _mobilenet], ids=["defectnet", "mobilenet"])
def test_converted_model_prunes_and_exports(load, tmp_path: Path) -> None:
    import torch_pruning as tp

    model = load(tmp_path)
    module = onnx_to_torch(model)
    x = torch.from_numpy(next(iter(_feeds(model).values())))
    with torch.no_grad():
        shape_before = module(x).shape
    tp.DependencyGraph().build_dependency(module, example_inputs=x)
    classifier = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    macs_before, params_before = tp.utils.count_ops_and_params(module, x)

    pruner = tp.pruner.MagnitudePruner(module, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[classifier])
    pruner.step()

    macs_after, params_after = tp.utils.count_ops_and_params(module, x)
    assert macs_after < 0.6 * macs_before and params_after < 0.6 * params_before
    with torch.no_grad():
        assert module(x).shape == shape_before
    path = tmp_path / "pruned.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, module(x).numpy(), atol=1e-4)


def test_a_batch_one_export_runs_any_batch() -> None:
    """The bundled detector's ONNX has reshapes to [1, 4, 16, 525] (a batch-1 export): converted, it runs the
    batches distillation and pruning sensitivity use, each sample as ONNX Runtime gives it alone."""
    import onnxruntime as ort
    import torch
    from conftest import REPO

    path = REPO / "examples" / "detect" / "defectdet.onnx"
    module = onnx_to_torch(onnx.load(str(path))).eval()
    x = np.random.default_rng(0).random((4, 3, 160, 160), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(4)])
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == (4, 7, 525)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
