from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FAST, read_manifest, run_cli
from onnx import TensorProto, helper, numpy_helper

from edgekit import backends
from edgekit.data import Dataset
from edgekit.ingest import ingest
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
from edgekit.verify.verifier import Thresholds, run_all
from edgekit.verify.verifier import verify_outputs as compare


def _conv_model(path: Path, weight_scale: float = 1.0, extra: list | None = None) -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * weight_scale).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="tiny_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="project")]
    graph = helper.make_graph(nodes + (extra or []), "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _calib(n: int = 32) -> Dataset:
    return Dataset({"x": np.random.default_rng(1).standard_normal((n, 3, 16, 16)).astype(np.float32)})


def test_int8_is_per_channel_qdq_and_agrees(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    ort_backend = backends.get("onnxruntime")
    plan = ArtifactPlan("onnxruntime", "int8", QuantizationSettings(method="minmax", samples=32))
    (tmp_path / "a").mkdir()
    art = ort_backend.export(spec, plan, _calib(), tmp_path / "a")
    q = onnx.load(art.entry_path)
    weights = {i.name: i for i in q.graph.initializer}
    dq_weights = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                  and weights[n.input[0]].data_type == TensorProto.INT8 and len(weights[n.input[0]].dims) == 4]
    assert len(dq_weights) == 2  # both convs' weights are int8
    for n in dq_weights:  # one scale per output channel
        assert len(weights[n.input[1]].dims) == 1 and weights[n.input[1]].dims[0] in (16, 8)
    val = _calib(8).batches(spec)
    ref = run_all(ort_backend.load(ort_backend.export(spec, ArtifactPlan("onnxruntime", "fp32"), None,
                                                      _mk(tmp_path / "r")), 1), val)
    v = compare(ref, run_all(ort_backend.load(art, 1), val), ["y"], None, Thresholds())
    assert v.cosine_min > 0.99 and v.snr_db_min > 20


def _mk(p: Path) -> Path:
    p.mkdir()
    return p


def test_fp16_keeps_layers_outside_the_fp16_range_in_fp32(tmp_path: Path) -> None:
    # Weights ~1e-6: below 2^-14, where FP16 storage flushes or clamps them.
    spec = ingest(str(_conv_model(tmp_path / "m.onnx", weight_scale=1e-6)), tmp_path / "w")
    art = backends.get("onnxruntime").export(spec, ArtifactPlan("onnxruntime", "fp16"), None, _mk(tmp_path / "a"))
    assert art.details["keep_fp32"] == ["tiny_conv"]
    assert "below 2^-14" in art.notes[0]
    inits = {i.name: i.data_type for i in onnx.load(art.entry_path).graph.initializer}
    assert inits["w1"] == TensorProto.FLOAT and inits["w2"] == TensorProto.FLOAT16


def test_unsupported_op_stops_build_naming_op_node_and_backend(tmp_path: Path, mobilenet_npz: Path) -> None:
    custom = helper.make_node("MagicNMS", ["y"], ["z"], name="vendor_nms", domain="com.vendor")
    path = _conv_model(tmp_path / "custom.onnx")
    m = onnx.load(path)
    m.graph.node.append(custom)
    m.graph.output[0].name = "z"
    m.opset_import.append(helper.make_opsetid("com.vendor", 1))
    onnx.save(m, path)
    issues = backends.get("onnxruntime").unsupported_nodes(m)
    assert [(i.op_type, i.node) for i in issues] == [("MagicNMS", "vendor_nms")]
    out = tmp_path / "pkg"
    r = run_cli("build", path, "--target", "host-cpu", "--calib", mobilenet_npz, "--out", out, *FAST)
    assert r.code == 2
    line = r.error_line()
    assert "MagicNMS" in line and "vendor_nms" in line and "onnxruntime" in line
    assert not out.exists() and not list(tmp_path.glob(".pkg*"))


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_methods_are_options(tmp_path: Path, method: str) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    plan = ArtifactPlan("onnxruntime", "int8", QuantizationSettings(method=method, samples=16))
    art = backends.get("onnxruntime").export(spec, plan, _calib(16), _mk(tmp_path / "a"))
    assert art.details["calibration"] == method and art.details["calibration_samples"] == 16


def test_entropy_calibration_is_its_own_and_keeps_the_accuracy(tmp_path: Path, defects_data: Path) -> None:
    """--calib-method entropy really calibrates by KL (ONNX Runtime's own entropy through quantize_static
    reproduces minmax byte for byte, and with more bins clips post-ReLU tensors to a tenth)."""
    from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, read_manifest, run_cli

    sums = {}
    for method in ("minmax", "entropy"):
        out = tmp_path / method
        r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "int8",
                    "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess",
                    BUNDLED_PREPROCESS, "--calib-method", method, "--out", out, *FAST)
        assert r.code == 0, r.stderr
        (a,) = read_manifest(out)["artifacts"]
        assert a["verification"]["cosine_min"] > 0.999
        assert a["verification"]["reference_accuracy"] - a["verification"]["accuracy"] <= 0.01
        sums[method] = a["files"][0]["sha256"]
    assert sums["minmax"] != sums["entropy"]


def _layernorm_model(path: Path) -> Path:
    """A small transformer block (torch nn.LayerNorm + Linear, exported at opset 17)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.fc1, self.fc2, self.head = torch.nn.Linear(d, 64), torch.nn.Linear(64, d), torch.nn.Linear(d, 4)

        def forward(self, x):
            x = x + self.fc2(torch.relu(self.fc1(self.ln1(x))))
            return self.head(self.ln2(x).mean(1))

    torch.manual_seed(0)
    torch.onnx.export(Block().eval(), (torch.randn(1, 16, 32),), str(path), opset_version=17, input_names=["x"],
                      output_names=["y"], dynamo=False)
    return path


def test_int8_layernorm_is_quiet_and_keeps_per_channel_where_there_is_a_channel(tmp_path: Path) -> None:
    """Per-channel INT8 of a model with LayerNormalization: its 1-D scale is per-tensor (ORT used to log
    "Axis 1 is out-of-range for weight ..." for each one), the Linear weights stay per-channel."""
    from conftest import read_manifest

    model = _layernorm_model(tmp_path / "ln.onnx")
    assert "LayerNormalization" in {n.op_type for n in onnx.load(model).graph.node}
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 16, 32)).astype(np.float32))
    out = tmp_path / "pkg"
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "int8",
                "--calib", calib, "--out", out, *FAST)
    assert r.code == 0, r.stderr
    assert "out-of-range" not in r.stderr, r.stderr
    (a,) = read_manifest(out)["artifacts"]
    assert a["verification"]["passed"] and a["verification"]["cosine_min"] > 0.99
    q = onnx.load(out / a["entry"])
    inits = {i.name: i for i in q.graph.initializer}
    scale_rank: dict[int, list[int]] = {}
    for n in q.graph.node:  # weight rank -> the ranks of their scales
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT8:
            scale_rank.setdefault(len(inits[n.input[0]].dims), []).append(len(inits[n.input[1]].dims))
    assert scale_rank[2] == [1, 1, 1]  # fc1, fc2, head: a scale per output channel
    assert scale_rank[1] and set(scale_rank[1]) == {0}  # the LayerNorm scale(s): one scale for the tensor


def test_per_tensor_weights_names_only_weights_without_a_channel_axis() -> None:
    from edgekit.backends.onnxruntime import per_tensor_weights

    inits = [numpy_helper.from_array(np.ones(s, np.float32), n)
             for n, s in (("gamma", [8]), ("beta", [8]), ("w", [8, 8]), ("conv_w", [8, 8, 1, 1]), ("conv_b", [8]))]
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"]),
             helper.make_node("LayerNormalization", ["c", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert per_tensor_weights(model) == {"gamma": [{}]}
    assert per_tensor_weights(model, {"Conv", "MatMul"}) == {}


def test_attention_stays_in_float_by_default(tmp_path: Path) -> None:
    """A model with attention gets the transformer recipe: its activation x activation MatMuls and the Softmax
    between them stay in float (ONNX Runtime by name; NNCF model_type=transformer), said in the notes."""
    import torch

    class Attention(torch.nn.Module):
        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.embed = torch.nn.Conv2d(3, d, 4, stride=4)
            self.q, self.k, self.v = torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d)
            self.head = torch.nn.Linear(d, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)  # [1, 16, d] tokens
            w = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2) / 32 ** 0.5, dim=-1)
            return self.head((w @ self.v(t)).mean(1))

    torch.manual_seed(0)
    torch.onnx.export(Attention().eval(), (torch.randn(1, 3, 16, 16),), str(tmp_path / "m.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.uniform(-1, 1, (64, 3, 16, 16)).astype(np.float32))
    r = run_cli("build", tmp_path / "m.onnx", "--target", "host-cpu", "--backend", "onnxruntime,openvino",
                "--precision", "int8", "--calib", tmp_path / "d.npz", "--recover", "none", "--out", tmp_path / "pkg",
                *FAST)
    m = read_manifest(tmp_path / "pkg" if r.code == 0 else tmp_path / "pkg.rejected")
    ort, ov = (next(a for a in m["artifacts"] if a["backend"] == b) for b in ("onnxruntime", "openvino"))
    assert ort["details"]["attention_nodes_in_float"] == 3  # the two MatMuls and the Softmax
    assert ov["details"]["model_type"] == "transformer"
    assert all(any(n.startswith("transformer recipe (2 activation x activation MatMul") for n in a["notes"])
               for a in (ort, ov))
