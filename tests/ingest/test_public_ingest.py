"""Public models as users bring them (issue 12): converters' dynamic dims, custom autograd.Functions, and
NCNN localisation on written-out HardSwish and on requantized int8 blobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from conftest import FAST, read_manifest, run_cli
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgekit.ingest import ingest

TESTS = Path(__file__).resolve().parents[1]  # `--model models:factory` imports tests/models.py from here


# ---------------------------------------------------------------- item 1: dim_value -1


def _minus_one_model(path: Path) -> Path:
    """As paddle2onnx writes it: batch as dim_value -1, height a dim_param, width an empty dim, the output's
    batch -1 too, and a stale value_info with -1 dims; opset 11."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv2d_0.w_0")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "conv2d_0.b_0")
    fc = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc_0.w_0")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", None])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv2d_0.w_0", "conv2d_0.b_0"], ["c"], name="p2o.Conv.0", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="p2o.Relu.0"),
         helper.make_node("GlobalAveragePool", ["r"], ["g"], name="p2o.Pool.0"),
         helper.make_node("Flatten", ["g"], ["f"], name="p2o.Flatten.0"),
         helper.make_node("MatMul", ["f", "fc_0.w_0"], ["y"], name="p2o.MatMul.0")],
        "paddle", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])], [w, b, fc],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [-1, 8, -1, -1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_dim_value_minus_one_is_dynamic_and_input_shape_fixes_it(tmp_path: Path) -> None:
    src = _minus_one_model(tmp_path / "paddle.onnx")
    r = run_cli("inspect", src)
    assert r.code == 2
    assert "input 'x' has dynamic dimensions [?, 3, h, ?]; fix them with --input-shape x=1,3,N,N" in r.error_line()
    r = run_cli("inspect", src, "--input-shape", "x=1,3,48,192")
    assert r.code == 0, r.stderr
    assert "[1, 3, 48, 192]" in r.stdout and "[1, 4]" in r.stdout and "conflicts" not in r.stderr
    r = run_cli("inspect", src, "--input-shape", "x=1,4,48,192")  # a really fixed dimension still counts
    assert r.code == 2 and "conflicts with the model's fixed [?, 3, h, ?]" in r.error_line()

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((24, 3, 48, 192)).astype(np.float32))
    out = tmp_path / "pkg"
    r = run_cli("build", src, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "fp32",
                "--calib", calib, "--input-shape", "x=1,3,48,192", "--out", out, *FAST)
    assert r.code == 0, r.stderr
    m = read_manifest(out)
    assert m["inputs"][0]["shape"] == [1, 3, 48, 192] and m["outputs"][0]["shape"] == [1, 4]


def test_dim_value_minus_one_batch_alone_defaults_to_one(tmp_path: Path) -> None:
    src = _minus_one_model(tmp_path / "paddle.onnx")
    model = onnx.load(src)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims[2:], (32, 0)):  # width 0: another converter's way to say dynamic
        d.Clear()
        d.dim_value = v
    onnx.save(model, src)
    r = run_cli("inspect", src, "--input-shape", "x=1,3,32,40")
    assert r.code == 0, r.stderr
    dims[3].Clear()
    dims[3].dim_value = 40
    onnx.save(model, src)
    spec = ingest(str(src), tmp_path / "w")  # [-1, 3, 32, 40]: the dynamic batch defaults to 1
    assert spec.inputs[0].shape == [1, 3, 32, 40] and spec.outputs[0].shape == [1, 4]
    assert any("dynamic batch set to 1" in n for n in spec.notes)


# ---------------------------------------------------------------- item 2: custom autograd.Function


def test_memory_efficient_activation_exports_through_torch_export(tmp_path: Path) -> None:
    """HardSwishMe (a torch.autograd.Function around TorchScript kernels) leaves prim::PythonOp in the
    TorchScript exporter; torch.export inlines it, and the ONNX is checked against the module."""
    from models import mobilenet_like, mobilenet_me

    spec = ingest("models:mobilenet_me", tmp_path / "w", {"input": [1, 3, 64, 64]})
    assert any("torch.export exporter; matches the module on 3 inputs" in n for n in spec.notes), spec.notes
    assert any("TorchScript exporter failed (Couldn't export Python operator HardSwishJitAutoFn)" in n
               for n in spec.notes), spec.notes
    model = onnx.load(spec.onnx_path)
    assert spec.opset == 17 and spec.inputs[0].shape == [1, 3, 64, 64] and spec.outputs[0].shape == [1, 10]
    names = [n.name for n in model.graph.node]
    # Named like the TorchScript exporter's nodes (what debug and --exclude-node show), no stack traces kept.
    assert "/stem/stem.0/Conv" in names and "/blocks/blocks.1/body/body.7/Conv" in names
    assert len(set(names)) == len(names) and not any(n.metadata_props for n in model.graph.node)
    x = torch.from_numpy(np.random.default_rng(3).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32))
    got = ort.InferenceSession(spec.onnx_path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, mobilenet_me()(x).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got, mobilenet_like()(x).numpy(), rtol=1e-4, atol=1e-5)  # same function


def test_memory_efficient_activation_builds_on_every_host_backend(tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).standard_normal((40, 3, 64, 64)).astype(np.float32))
    out = tmp_path / "pkg"
    r = run_cli("build", "--model", "models:mobilenet_me", "--input-shape", "input=1,3,64,64", "--target",
                "host-cpu", "--backend", "onnxruntime,openvino,ncnn", "--precision", "fp32", "--calib", calib,
                "--out", out, *FAST, cwd=TESTS)
    assert r.code == 0, r.stderr
    m = read_manifest(out)
    assert {a["backend"] for a in m["artifacts"] if a["verification"]["passed"]} == {"onnxruntime", "openvino",
                                                                                    "ncnn"}
    assert any("torch.export" in n for n in m["source"]["notes"])
    assert "prim::PythonOp" not in r.stderr and "graph(" not in r.stderr


def test_untraceable_custom_function_fails_in_one_line(tmp_path: Path) -> None:
    """Neither exporter can trace it (the TorchScript trace freezes it into constants, which the check
    against the module catches): exit 2, one line naming the op, its module, and what to do."""
    r = run_cli("inspect", "--model", "models:untraceable_net", "--input-shape", "input=1,3,8,8", cwd=TESTS)
    assert r.code == 2
    line = r.error_line()
    assert ("prim::PythonOp _ListReluFn (a custom torch.autograd.Function in ListRelu, module models)" in line
            and "TorchScript: the ONNX does not read input input" in line and "torch.export:" in line
            and "plain tensor forward" in line), line
    assert len(r.stderr) < 2000 and "getitem" not in r.stderr and "Traceback" not in r.stderr  # no graph dump


# ---------------------------------------------------------------- item 9: HardSwish written out, NCNN


FIRST_DEPTHWISE = "/blocks/blocks.0/blocks.0.0/Conv"


def _export(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["scores"])
    return path


def _npz(path: Path, n: int = 60) -> Path:
    np.savez(path, images=np.random.default_rng(0).standard_normal((n, 3, 64, 64)).astype(np.float32))
    return path


def test_ncnn_hardswish_is_matched_by_value_and_the_depthwise_conv_is_named(tmp_path: Path) -> None:
    """PicoDet's case: x*relu6(x+3)/6 is four ONNX nodes and one ncnn HardSwish. Its output points the same
    way as the Mul before the division by 6 (cosine 1.0), but is 6x smaller (SNR 1.6 dB against it); matched
    by direction, the stem's Mul was named. The first depthwise conv is made INT8-hostile: the stem's
    channel 0 is huge (dead in the depthwise conv), so the depthwise conv's input scale crushes the others."""
    from models import pico_like

    src = _export(pico_like(), tmp_path / "pico.onnx")
    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def edit(name: str, change) -> None:
        data = numpy_helper.to_array(inits[name]).copy()
        change(data)
        inits[name].CopyFrom(numpy_helper.from_array(data, name))

    edit(nodes["/stem/stem.0/Conv"].input[2], lambda b: b.__setitem__(0, 500.0))
    edit(nodes[FIRST_DEPTHWISE].input[1], lambda w: w.__setitem__(0, 0.0))
    onnx.save(model, src)
    out = tmp_path / "pkg"
    r = run_cli("build", src, "--target", "host-cpu", "--backend", "ncnn", "--precision", "int8", "--recover",
                "none", "--calib", _npz(tmp_path / "calib.npz"), "--out", out, *FAST)
    assert r.code == 1, r.stderr
    v = read_manifest(tmp_path / "pkg.rejected")["artifacts"][0]["verification"]
    assert v["diverging_layer"]["node"] == FIRST_DEPTHWISE, v["diverging_layer"]
    table = json.loads((tmp_path / "pkg.rejected" / "debug" / "ncnn-int8.json").read_text())
    nodes = [la["node"] for la in table["layers"]]
    before = table["layers"][:nodes.index(FIRST_DEPTHWISE)]
    # The stem's ncnn HardSwish paired with the Div output, not the Mul (past the divergence nothing agrees,
    # and a pairing by value means nothing there).
    assert [la["node"] for la in before] == ["/stem/stem.0/Conv", "/stem/stem.2/Div"], before
    assert all(la["snr_db"] > 25 and la["cosine"] > 0.999 for la in before), before


# ---------------------------------------------------------------- item 10: NCNN INT8 requantized blobs


class _ReluChain(nn.Module):
    """Conv-BN-ReLU blocks feeding each other: ncnn2int8's requantize fusion makes each conv feeding a conv
    write int8 codes (int8_scale_term 102/101), which the localiser must dequantize."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, groups, stride in ((3, 16, 1, 2), (16, 16, 16, 1), (16, 32, 1, 1), (32, 32, 32, 2),
                                          (32, 48, 1, 1)):
            k = 1 if cin != cout and cin != 3 else 3
            layers += [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_ncnn_int8_requantized_blobs_are_dequantized_before_comparison(tmp_path: Path) -> None:
    from models import _settle_batchnorm

    torch.manual_seed(0)
    net = _ReluChain()
    _settle_batchnorm(net, torch.randn(64, 3, 64, 64))
    src = _export(net.eval(), tmp_path / "chain.onnx")
    calib = _npz(tmp_path / "calib.npz")
    out = tmp_path / "pkg"
    r = run_cli("build", src, "--target", "host-cpu", "--backend", "ncnn", "--precision", "int8", "--calib", calib,
                "--out", out, *FAST)
    assert r.code == 0, r.stderr
    param = (out / "ncnn-int8" / "model.ncnn.param").read_text()
    requantized = [ln.split()[1] for ln in param.splitlines() if " 8=101" in ln or " 8=102" in ln]
    assert len(requantized) >= 3, param
    r = run_cli("debug", src, "--target", "host-cpu", "--backend", "ncnn", "--precision", "int8", "--package", out,
                "--calib", calib, "--min-cosine", "0.95", "--out", tmp_path / "dbg")
    assert r.code == 0, r.stdout + r.stderr
    loc = json.loads((tmp_path / "dbg" / "layers.json").read_text())
    assert loc["first_divergence"] is None and loc["compared"] >= 6
    # Raw int8 codes against floats read 'cosine 0.9998, SNR -25 dB, max |err| 119': every tensor agrees now.
    for la in loc["layers"]:
        assert la["snr_db"] > 15 and la["max_abs_error"] < 2.0, la

