"""NCNN for transformers and strided slices: pnnx's Gemm and MultiHeadAttention layers (and every other
weighted layer ncnn has) rewritten for FP16 storage and INT8 as ncnnoptimize / ncnn2int8 do; onnxslim's
flattened Gemm undone so pnnx finds attention; a YOLOX Focus stem rewritten into ops ncnn has; what pnnx
cannot convert refused on one line, naming the ONNX node, before ncnn loads anything."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FAST, read_manifest, run_cli
from onnx import TensorProto, helper, numpy_helper

from edgekit import backends
from edgekit.backends.ncnn.backend import NcnnSession, pnnx_warnings
from edgekit.backends.ncnn.int8 import calibration_table, quantize_model
from edgekit.backends.ncnn.param_bin import NcnnModel
from edgekit.data import Dataset
from edgekit.ingest import ingest
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
from edgekit.verify.verifier import Thresholds, run_all
from edgekit.verify.verifier import verify_outputs as compare

NCNN = backends.get("ncnn")
SIZE = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Calibration and validation sets: standard normal images, as the models' logits were spread on."""
    root = tmp_path_factory.mktemp("tx-data")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", images=rng.standard_normal((64, 3, SIZE, SIZE)).astype(np.float32))
    np.savez(root / "val.npz", images=rng.standard_normal((48, 3, SIZE, SIZE)).astype(np.float32))
    return root / "calib.npz", root / "val.npz"


def _ncnn(package: Path, precision: str) -> tuple[NcnnModel, Path]:
    param = package / f"ncnn-{precision}" / "model.ncnn.param"
    return NcnnModel.load(param, param.with_suffix(".bin")), param.with_suffix(".bin")


def _build(model_path: Path, images: tuple[Path, Path], out: Path, precisions: str = "fp32,fp16,int8"):
    calib, val = images
    return run_cli("build", model_path, "--target", "host-cpu", "--backend", "ncnn", "--precision", precisions,
                   "--calib", calib, "--val", val, "--out", out, *FAST)


# (model, ncnn layer types pnnx must emit, the transformer layers that must end up int8)
CASES = {
    "vit": ({"MultiHeadAttention", "Gemm", "LayerNorm"}, {"MultiHeadAttention", "Gemm"}),
    "vit_torch_mha": ({"Gemm", "LayerNorm"}, {"Gemm"}),  # nn.MultiheadAttention: pnnx keeps q/k/v as Gemm
    "mobilevit": ({"Gemm", "InnerProduct", "LayerNorm", "Convolution"}, {"Gemm", "InnerProduct"}),
    "convnext": ({"Gemm", "LayerNorm", "ConvolutionDepthWise"}, {"Gemm"}),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_transformer_builds_and_verifies_in_fp32_fp16_and_int8(kind: str, images, tmp_path: Path) -> None:
    from models import export_fixed, tiny_transformer

    emitted, int8_types = CASES[kind]
    src = export_fixed(tiny_transformer(kind, SIZE), tmp_path / f"{kind}.onnx")
    r = _build(src, images, tmp_path / "pkg")
    assert r.code == 0, r.stderr
    arts = {a["precision"]: a for a in read_manifest(tmp_path / "pkg")["artifacts"]}
    assert set(arts) == {"fp32", "fp16", "int8"}
    for p, a in arts.items():  # verified against ONNX Runtime FP32 with edgekit's default thresholds
        v = a["verification"]
        assert v["passed"] and v["cosine_min"] >= (0.999 if p != "int8" else 0.99), (p, v["failures"])

    fp32, fp32_bin = _ncnn(tmp_path / "pkg", "fp32")
    assert emitted <= {la.type for la in fp32.layers}, {la.type for la in fp32.layers}
    assert "pnnx_rewrites" in arts["fp32"]["details"]  # onnxslim's flattened Gemm restored to MatMul for pnnx

    fp16, fp16_bin = _ncnn(tmp_path / "pkg", "fp16")
    for layer in fp16.layers:  # every tagged blob of Gemm / MultiHeadAttention (weights and Gemm's bias) is fp16
        if layer.type in ("Gemm", "MultiHeadAttention", "InnerProduct"):
            assert all(b.storage == "fp16" for b in fp16.weights[layer.name] if b.tagged), layer.name
    assert fp16_bin.stat().st_size <= 0.6 * fp32_bin.stat().st_size

    int8, int8_bin = _ncnn(tmp_path / "pkg", "int8")
    details = arts["int8"]["details"]
    assert int8_types <= set(details["int8_layer_types"]), details["int8_layer_types"]
    kept = set(details["kept_float"])
    for layer in int8.layers:
        blobs = int8.weights.get(layer.name, [])
        if layer.type == "MultiHeadAttention":  # q, k, v, out weights int8; quantize_term 2; 3 x rows + 1 scales
            assert layer.int(18) == 2 and [b.storage for b in blobs[0:8:2]] == ["int8"] * 4
            assert [len(b.data) for b in blobs[8:]] == [layer.int(0)] * 3 + [1]
        elif layer.type == "Gemm" and blobs and layer.name not in kept:  # the constant B, one scale
            assert layer.int(18) == 2 and layer.int(3) == 1 and blobs[0].storage == "int8"
            assert len(blobs[-1].data) == 1 and not blobs[-1].tagged
    assert int8_bin.stat().st_size <= 0.5 * fp32_bin.stat().st_size, (int8_bin.stat().st_size, fp32_bin.stat())


def test_focus_stem_is_rewritten_and_verifies(images, tmp_path: Path) -> None:
    """YOLOX's Focus: four step-2 slices pnnx leaves as `Tensor.slice` (ncnn cannot load them). Rewritten as
    crop + stride-2 depthwise 1x1 convolutions with weights 1 (checked equal in ONNX Runtime first), every
    precision builds and verifies; INT8 keeps those selector convolutions in float."""
    from models import export_fixed, focus_net

    src = export_fixed(focus_net(), tmp_path / "focus.onnx")
    r = _build(src, images, tmp_path / "pkg")
    assert r.code == 0, r.stderr
    arts = {a["precision"]: a for a in read_manifest(tmp_path / "pkg")["artifacts"]}
    assert all(a["verification"]["passed"] for a in arts.values())
    (rewrite,) = arts["fp32"]["details"]["pnnx_rewrites"]
    assert rewrite.startswith("4 strided Slice") and "/Slice" in rewrite
    fp32, _ = _ncnn(tmp_path / "pkg", "fp32")
    assert not [la for la in fp32.layers if "." in la.type]
    int8, _ = _ncnn(tmp_path / "pkg", "int8")
    selectors = [la for la in int8.layers if la.type == "ConvolutionDepthWise"]
    assert len(selectors) == 4 and all(la.int(8) == 0 and la.int(3) == 2 for la in selectors)
    assert all(la.int(8) in (2, 102) for la in int8.layers if la.type == "Convolution")
    assert any("stride-selector" in n for n in arts["int8"]["notes"])


def test_a_strided_slice_ncnn_cannot_run_is_refused_on_one_line(tmp_path: Path) -> None:
    """A step-2 slice over channels has no ncnn equivalent: refused before ncnn loads anything (exit 2, not a
    loader failure), one line naming the ONNX node and pnnx's own warning."""
    from models import export_channel_stride

    model, data = export_channel_stride(tmp_path / "m.onnx", 16)
    r = run_cli("build", model, "--target", "host-cpu", "--backend", "ncnn", "--precision",
                "fp32,fp16", "--calib", data, "--out", tmp_path / "pkg", *FAST)
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert "op Slice (node '/Slice')" in line and "slice with step 2 is not supported" in line
    assert "Tensor.slice" in line and "not exists or registered" not in r.stderr and "Traceback" not in r.stderr


def test_space_to_depth_is_converted_in_onnx_channel_order(tmp_path: Path) -> None:
    """pnnx maps ONNX SpaceToDepth (channel = block offset * C + c) to ncnn Reorg, which orders channels as
    pixel_unshuffle does (c * 4 + offset): wrong. edgekit hands pnnx strided selections instead."""
    nodes = [helper.make_node("SpaceToDepth", ["x"], ["s"], blocksize=2, name="s2d"),
             helper.make_node("Conv", ["s", "w"], ["y"], name="conv")]
    w = np.random.default_rng(0).standard_normal((4, 12, 1, 1)).astype(np.float32)
    graph = helper.make_graph(nodes, "s2d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    spec = ingest(str(tmp_path / "m.onnx"), tmp_path / "w")
    (tmp_path / "a").mkdir()
    art = NCNN.export(spec, ArtifactPlan("ncnn", "fp32"), None, tmp_path / "a")
    assert "SpaceToDepth" in art.details["pnnx_rewrites"][0]
    batches = Dataset({"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}).batches(spec)
    x = next(iter(batches[0].values()))
    blocks = [x[..., i::2, j::2] for i in (0, 1) for j in (0, 1)]
    expected = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], np.concatenate(blocks, 1))
    np.testing.assert_allclose(NCNN.load(art, 1).run(batches[0])[0], expected, rtol=1e-5, atol=1e-5)


def test_odd_sizes_single_axis_strides_and_reduce_sum_convert_exactly(tmp_path: Path) -> None:
    """A 31x15 input (channels not 16-byte aligned: ncnn's Crop read every channel after the first shifted when
    the input Mat wrapped the numpy array), a step-2 slice on H only (crop + stride (2, 1) selection), and
    ReduceSum with its axes as an input (pnnx drops them: a Reduction over nothing): FP32 equals ONNX
    Runtime."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x[..., 1::2, :])
            return y.sum(-1, keepdim=True) + y.sum(1, keepdim=True)

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 31, 15),), str(tmp_path / "m.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    spec = ingest(str(tmp_path / "m.onnx"), tmp_path / "w")
    (tmp_path / "a").mkdir()
    art = NCNN.export(spec, ArtifactPlan("ncnn", "fp32"), None, tmp_path / "a")
    rewrites = " ".join(art.details["pnnx_rewrites"])
    assert "2 ReduceSum" in rewrites and "1 strided Slice" in rewrites
    batches = Dataset({"x": np.random.default_rng(1).standard_normal((4, 3, 31, 15)).astype(np.float32)}).batches(spec)
    ort = backends.get("onnxruntime")
    (tmp_path / "r").mkdir()
    reference = run_all(ort.load(ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, tmp_path / "r"), 1),
                        batches)
    v = compare(reference, run_all(NCNN.load(art, 1), batches), ["y"], None, Thresholds())
    assert v.passed and v.snr_db_min > 90, (v.snr_db_min, v.failures)


# ---------------------------------------------------------------- Gemm INT8 in every layout pnnx may write

M, N, K = 6, 5, 16


def _gemm_net(tmp: Path, trans: int, constant: str) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """One ncnn Gemm: a constant operand (A or B, stored transposed or not) and a constant C row; the other
    operand is the input. Returns param, bin, the constant matrix as [rows, K] / [K, N], and C."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal(N).astype(np.float32)
    if constant == "B":
        b = (rng.standard_normal((K, N)) * np.linspace(0.2, 1.0, N)).astype(np.float32)
        stored, ps = (b.T if trans else b), f"2=0 3={trans} 4=0 5=1 6=1 7={M} 8={N} 9={K} 10=4"
    else:
        a = (rng.standard_normal((M, K)) * np.linspace(0.2, 1.0, M)[:, None]).astype(np.float32)
        stored, ps = (a.T if trans else a), f"2={trans} 3=0 4=1 5=0 6=1 7={M} 8={N} 9={K} 10=4"
    param, bin_ = tmp / f"g{constant}{trans}.param", tmp / f"g{constant}{trans}.bin"
    param.write_text(f"7767517\n2 2\nInput in0 0 1 in0\nGemm gemm 1 1 in0 out0 {ps}\n")
    bin_.write_bytes(struct.pack("<I", 0) + stored.astype("<f4").tobytes() + struct.pack("<I", 0) + c.tobytes())
    return param, bin_, (b if constant == "B" else a), c


@pytest.mark.parametrize("constant, trans", [("B", 1), ("B", 0), ("A", 0), ("A", 1)])
def test_gemm_int8_in_the_ncnn_runtime(constant: str, trans: int, tmp_path: Path) -> None:
    param, bin_, weight, c = _gemm_net(tmp_path, trans, constant)
    model = NcnnModel.load(param, bin_)
    assert [b.role for b in model.weights["gemm"]] == ["weight", "bias"]
    table = calibration_table(param, bin_, [{"in0": np.zeros((1, 1, 1), np.float32)}])
    assert list(table) == ["gemm_param_0"] and len(table["gemm_param_0"]) == (1 if constant == "B" else M)
    assert quantize_model(param, bin_, table, tmp_path / "q.param", tmp_path / "q.bin") == ["gemm"]
    q = NcnnModel.load(tmp_path / "q.param", tmp_path / "q.bin")
    layer = q.layer("gemm")
    assert layer.int(18) == 2 and layer.int(3 if constant == "B" else 2) == (1 if constant == "B" else 0)
    assert q.weights["gemm"][0].storage == "int8" and (tmp_path / "q.bin").stat().st_size < bin_.stat().st_size
    rng = np.random.default_rng(1)
    other = rng.standard_normal((M, K) if constant == "B" else (K, N)).astype(np.float32)
    expected = (other @ weight if constant == "B" else weight @ other) + c
    for p, f, tol in (("fp32", (param, bin_), 1e-4), ("int8", (tmp_path / "q.param", tmp_path / "q.bin"), 0.05)):
        session = NcnnSession(*f, p, 1, ["in0"], ["out0"], [[M, N]])
        got = session.run({"in0": other[None]})[0]
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err < tol, (p, err)
        if p == "int8":
            assert err > 1e-4  # the int8 kernel ran: a quantisation-sized difference, not the float result


# ---------------------------------------------------------------- recurrent layers: FP16 storage, not a failure


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_layers_are_stored_fp16_and_kept_float_in_int8(kind: str, tmp_path: Path) -> None:
    """FP16: the recurrent layer's weights and bias blobs (all tagged) are stored fp16. INT8: ncnn2int8
    quantises LSTM/RNN weights but edgekit's port does not yet, so the layer stays float, the note says
    so, the Linear after it is int8, and the artifact still agrees with FP32."""
    import torch

    class Seq(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn, kind)(8, 16, batch_first=True)
            self.fc = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    torch.onnx.export(Seq().eval(), (torch.randn(1, 5, 8),), str(tmp_path / "m.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    spec = ingest(str(tmp_path / "m.onnx"), tmp_path / "w")
    data = Dataset({"x": np.random.default_rng(0).standard_normal((16, 5, 8)).astype(np.float32)})
    arts = {}
    for p in ("fp32", "fp16", "int8"):
        (tmp_path / p).mkdir()
        plan = ArtifactPlan("ncnn", p, QuantizationSettings(samples=16) if p == "int8" else None)
        arts[p] = NCNN.export(spec, plan, data if p == "int8" else None, tmp_path / p)
    model = NcnnModel.load(Path(arts["fp16"].entry_path), Path(arts["fp16"].entry_path).with_suffix(".bin"))
    rnn = next(la for la in model.layers if la.type == kind)
    assert [b.storage for b in model.weights[rnn.name]] == ["fp16"] * 3  # weight_xc, bias_c, weight_hc
    sizes = {p: Path(a.entry_path).with_suffix(".bin").stat().st_size for p, a in arts.items()}
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    batches = data.batches(spec)
    reference = run_all(NCNN.load(arts["fp32"], 1), batches)
    v = compare(reference, run_all(NCNN.load(arts["fp16"], 1), batches), ["y"], None, Thresholds(), "fp16")
    assert v.passed and v.cosine_min > 0.999, v.failures
    int8 = NcnnModel.load(Path(arts["int8"].entry_path), Path(arts["int8"].entry_path).with_suffix(".bin"))
    assert [b.storage for b in int8.weights[rnn.name]] == ["fp32"] * 3 and int8.layer(rnn.name).int(8) == 0
    assert arts["int8"].details["int8_layer_types"] == {"InnerProduct": 1}
    assert arts["int8"].details["float_layer_types"] == {kind: 1}
    assert any(n.startswith("ncnn layers kept in float (ncnn2int8 quantises them") and kind in n
               for n in arts["int8"].notes)
    v8 = compare(reference, run_all(NCNN.load(arts["int8"], 1), batches), ["y"], None, Thresholds())
    assert v8.cosine_min > 0.99, v8.failures


def test_pnnx_warnings_are_pnnx_own_lines_counted() -> None:
    log = ("slice with step 2 is not supported\n\x1b[0;93mslice with step 2 is not supported\x1b[m\n"
           "2026 [W:onnxruntime:pnnx, cpuid_info.cc:105] Unknown CPU vendor, not supported\n"
           "permute 5-rank tensor is not supported yet!\npass_ncnn ... 0.1ms\n")
    assert pnnx_warnings(log) == ["slice with step 2 is not supported (x2)",
                                  "permute 5-rank tensor is not supported yet!"]
