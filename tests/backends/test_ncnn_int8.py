"""NCNN param/bin rewriting (fp16 storage, the ncnn2table/ncnn2int8 ports), checked with the ncnn runtime."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS
from onnx import TensorProto, helper, numpy_helper
from test_backend_onnxruntime import _calib, _conv_model, _mk

from edgekit import backends
from edgekit.backends.ncnn.backend import NcnnSession
from edgekit.backends.ncnn.int8 import (
    calibration_table,
    quantize_model,
    read_table,
    write_table,
)
from edgekit.backends.ncnn.param_bin import TAG_FP16, TAG_INT8, NcnnModel
from edgekit.data import Preprocess, prepare_data
from edgekit.errors import BadInput, EdgekitError
from edgekit.ingest import ingest
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
from edgekit.quantize.calibration import HISTOGRAM_BINS, kl_threshold_bin
from edgekit.verify.verifier import Thresholds, run_all
from edgekit.verify.verifier import verify_outputs as compare

NCNN = backends.get("ncnn")


@pytest.fixture(scope="module")
def bundled(defects_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The bundled model as ingested, its data, and its FP32 ncnn artifact."""
    root = tmp_path_factory.mktemp("ncnn-bundled")
    spec = ingest(str(BUNDLED_ONNX), root / "w")
    data = prepare_data(spec, str(defects_data / "calib"), str(defects_data / "val"),
                        Preprocess.from_file(BUNDLED_PREPROCESS), calib_samples=200, val_samples=400)
    fp32 = NCNN.export(spec, ArtifactPlan("ncnn", "fp32"), None, _mk(root / "fp32"))
    return spec, data, fp32


def _files(artifact) -> tuple[Path, Path]:
    param = Path(artifact.entry_path)
    return param, param.with_suffix(".bin")


def _accuracy(artifact, spec, data) -> float:
    session = NCNN.load(artifact, 2)
    preds = [session.run(b)[0].argmax() for b in data.validation.batches(spec)]
    return float(np.mean(np.array(preds) == data.validation.labels)) * 100


def test_param_and_bin_round_trip_byte_exact(bundled, tmp_path: Path) -> None:
    _, _, fp32 = bundled
    param, bin_ = _files(fp32)
    model = NcnnModel.load(param, bin_)
    assert sum(len(b) for b in model.weights.values()) > 20
    model.save(tmp_path / "rt.param", tmp_path / "rt.bin")
    assert (tmp_path / "rt.bin").read_bytes() == bin_.read_bytes()
    assert [ln.split() for ln in (tmp_path / "rt.param").read_text().splitlines()] == \
        [ln.split() for ln in param.read_text().splitlines()]


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_int8_bundled_model_size_and_accuracy_in_the_ncnn_runtime(bundled, method: str, tmp_path: Path) -> None:
    spec, data, fp32 = bundled
    plan = ArtifactPlan("ncnn", "int8", QuantizationSettings(method=method, samples=200))
    int8 = NCNN.export(spec, plan, data.calibration, _mk(tmp_path / "int8"))
    param, bin_ = _files(int8)
    ratio = bin_.stat().st_size / _files(fp32)[1].stat().st_size
    assert ratio <= 0.35, ratio
    fp32_acc, int8_acc = _accuracy(fp32, spec, data), _accuracy(int8, spec, data)
    assert fp32_acc > 90 and int8_acc >= fp32_acc - 1.0, (fp32_acc, int8_acc)
    # The int8 param marks every conv/fc as int8 (2 = per-channel weights), and the runtime's
    # output moves away from FP32 by a quantisation-sized amount: int8 kernels really ran.
    model = NcnnModel.load(param, bin_)
    terms = {la.name: la.int(8) for la in model.layers if la.type in ("Convolution", "InnerProduct")}
    assert terms and all(t in (2, 102) for t in terms.values()) and 102 in terms.values()
    assert all(model.weights[name][0].storage == "int8" for name in terms)
    batches = data.validation.batches(spec)[:50]
    v = compare(run_all(NCNN.load(fp32, 1), batches), run_all(NCNN.load(int8, 1), batches), ["output"],
                None, Thresholds())
    assert 0.99 < v.cosine_min < 0.99999, v.cosine_min
    assert int8.details["calibration"] == {"minmax": "minmax", "entropy": "kl"}[method]


def test_table_is_ncnn_format_and_weights_follow_it(bundled, tmp_path: Path) -> None:
    spec, data, fp32 = bundled
    param, bin_ = _files(fp32)
    batches = [{"in0": next(iter(b.values()))} for b in data.calibration.batches(spec)[:16]]
    table = calibration_table(param, bin_, batches, method="kl")
    write_table(tmp_path / "model.table", table)
    lines = (tmp_path / "model.table").read_text().splitlines()
    model = NcnnModel.load(param, bin_)
    convs = [la for la in model.layers if la.type in ("Convolution", "InnerProduct")]
    weight_lines = [ln.split() for ln in lines if "_param_0 " in ln]
    blob_lines = [ln.split() for ln in lines if "_param_" not in ln]
    assert [w[0] for w in weight_lines] == [f"{la.name}_param_0" for la in convs]
    assert [len(w) - 1 for w in weight_lines] == [la.int(0) for la in convs]  # one scale per output channel
    assert [b[0] for b in blob_lines] == [la.name for la in convs] and all(len(b) == 2 for b in blob_lines)
    assert all(float(s) > 0 for ln in weight_lines + blob_lines for s in ln[1:])
    assert read_table(tmp_path / "model.table").keys() == table.keys()

    quantize_model(param, bin_, tmp_path / "model.table", tmp_path / "q.param", tmp_path / "q.bin")
    q = NcnnModel.load(tmp_path / "q.param", tmp_path / "q.bin")
    for layer in convs:
        codes = q.weights[layer.name][0].data.reshape(layer.int(0), -1)
        w = model.weights[layer.name][0].data.reshape(layer.int(0), -1)
        scales = table[f"{layer.name}_param_0"]
        three_by_three_s1 = layer.int(1) == 3 and layer.int(3, 1) == 1
        # 3x3 stride-1 convolutions get 6-bit weights (int8 Winograd F43), the rest the full int8 range
        assert np.abs(codes).max() == (31 if three_by_three_s1 else 127)
        np.testing.assert_allclose(codes / scales[:, None], w, atol=(0.5 / scales)[:, None].max() + 1e-6)
        blobs = q.weights[layer.name]  # weights, bias, weight scales, input scale[, next layer's scale]
        np.testing.assert_array_equal(blobs[2].data, scales)
        assert blobs[3].data[0] == pytest.approx(table[layer.name][0])
    raw = (tmp_path / "q.bin").read_bytes()
    assert int.from_bytes(raw[:4], "little") == TAG_INT8


def test_kl_threshold_clips_outliers_and_keeps_a_dense_range() -> None:
    rng = np.random.default_rng(0)
    bulk = np.abs(rng.standard_normal(200_000))
    values = np.concatenate([bulk, [40.0] * 5])  # a few far outliers set absmax
    hist = np.bincount(np.minimum((values / values.max() * HISTOGRAM_BINS).astype(int), HISTOGRAM_BINS - 1),
                       minlength=HISTOGRAM_BINS)
    t = kl_threshold_bin(hist)
    threshold = (t + 0.5) * values.max() / HISTOGRAM_BINS
    assert 2.5 < threshold < 6.0, threshold  # clips the outliers, keeps the Gaussian's body
    uniform = np.full(HISTOGRAM_BINS, 1000)
    assert kl_threshold_bin(uniform) > HISTOGRAM_BINS * 0.9  # nothing to clip


def test_excluded_node_stays_float(tmp_path: Path) -> None:
    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    plan = ArtifactPlan("ncnn", "int8", QuantizationSettings(samples=32, exclude_nodes=["project"]))
    art = NCNN.export(spec, plan, _calib(32), _mk(tmp_path / "a"))
    model = NcnnModel.load(*_files(art))
    convs = [la for la in model.layers if la.type == "Convolution"]
    assert [la.int(8) for la in convs] == [2, 0]  # the excluded 1x1 projection has no int8 scale term
    assert [model.weights[la.name][0].storage for la in convs] == ["int8", "fp32"]
    assert len(art.details["kept_float"]) == 1
    v = compare(_ort_reference(spec, tmp_path), run_all(NCNN.load(art, 1), _calib(8).batches(spec)), ["y"],
                None, Thresholds())
    assert v.cosine_min > 0.99


def test_depthwise_convolutions_get_per_group_scales(mobilenet_opset11: Path, tmp_path: Path) -> None:
    spec = ingest(str(mobilenet_opset11), tmp_path / "w", input_shapes={"images": [1, 3, 64, 64]})
    calib = {spec.inputs[0].name: np.random.default_rng(0).uniform(-1, 1, (48, 3, 64, 64)).astype(np.float32)}
    from edgekit.data import Dataset

    art = NCNN.export(spec, ArtifactPlan("ncnn", "int8", QuantizationSettings(samples=48)), Dataset(calib),
                      _mk(tmp_path / "a"))
    model = NcnnModel.load(*_files(art))
    dw = [la for la in model.layers if la.type == "ConvolutionDepthWise"]
    assert dw and all(la.int(8) in (1, 101) for la in dw)
    for layer in dw:
        assert len(model.weights[layer.name][2 if layer.int(5) else 1].data) == layer.int(7)  # scales per group
    val = {k: v[:8] for k, v in calib.items()}
    batches = Dataset(val).batches(spec)
    ort = backends.get("onnxruntime")
    ref = run_all(ort.load(ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, _mk(tmp_path / "r")), 1),
                  batches)
    v = compare(ref, run_all(NCNN.load(art, 1), batches), [o.name for o in spec.outputs], None, Thresholds())
    assert v.cosine_min > 0.98, v.cosine_min


def test_fp16_storage_halves_the_bin_and_keeps_out_of_range_layers_fp32(tmp_path: Path) -> None:
    # weights ~1e-8: below even FP16's subnormals (a BatchNorm with a huge running variance, folded)
    spec = ingest(str(_conv_model(tmp_path / "m.onnx", weight_scale=1e-8)), tmp_path / "w")
    fp32 = NCNN.export(spec, ArtifactPlan("ncnn", "fp32"), None, _mk(tmp_path / "fp32"))
    fp16 = NCNN.export(spec, ArtifactPlan("ncnn", "fp16"), None, _mk(tmp_path / "fp16"))
    model = NcnnModel.load(*_files(fp16))
    convs = [la.name for la in model.layers if la.type == "Convolution"]
    assert fp16.details["keep_fp32"] == [convs[0]] and "below 2^-14" in fp16.notes[0]
    assert [model.weights[c][0].storage for c in convs] == ["fp32", "fp16"]
    raw = _files(fp16)[1].read_bytes()
    assert int.from_bytes(raw[:4], "little") == 0 and TAG_FP16.to_bytes(4, "little") in raw
    v = compare(_ort_reference(spec, tmp_path), run_all(NCNN.load(fp16, 1), _calib(8).batches(spec)), ["y"],
                None, Thresholds())
    assert v.cosine_min > 0.999
    # Without the range check (every layer fp16) the tiny layer's weights flush to zero: a wrong model.
    everything = NcnnModel.load(*_files(fp32))
    for c in convs:
        everything.weights[c][0].storage = "fp16"
    everything.save(tmp_path / "all16.param", tmp_path / "all16.bin")
    session = NcnnSession(tmp_path / "all16.param", tmp_path / "all16.bin", "fp16", 1, fp16.details["input_blobs"],
                          fp16.details["output_blobs"], fp16.details["output_shapes"])
    broken = compare(_ort_reference(spec, tmp_path, "r2"), run_all(session, _calib(8).batches(spec)), ["y"], None,
                     Thresholds())
    assert broken.cosine_min < 0.99


def _ort_reference(spec, tmp_path: Path, name: str = "ref"):
    ort = backends.get("onnxruntime")
    art = ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, _mk(tmp_path / name))
    return run_all(ort.load(art, 1), _calib(8).batches(spec))


# ---------------------------------------------------------------- FP16 range on the stored ncnn weights

C = 8


def _deconv_bn_model(path: Path, variance: float) -> Path:
    """ConvTranspose + BatchNorm with a huge running variance: folded, the deconv's weights are ~1e-8
    (below even FP16's subnormals), and pnnx stores them transposed as a Deconvolution."""
    rng = np.random.default_rng(0)
    inits = {"wt": rng.standard_normal((C, C, 2, 2)).astype(np.float32), "g": np.ones(C, np.float32),
             "b": np.zeros(C, np.float32), "m": np.zeros(C, np.float32), "v": np.full(C, variance, np.float32),
             "w2": (rng.standard_normal((C, C, 1, 1)) * 1e4).astype(np.float32)}  # brings the output back to O(1)
    nodes = [helper.make_node("ConvTranspose", ["x", "wt"], ["t"], name="deconv", strides=[2, 2], kernel_shape=[2, 2]),
             helper.make_node("BatchNormalization", ["t", "g", "b", "m", "v"], ["t2"], name="bn"),
             helper.make_node("Conv", ["t2", "w2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "deconv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 16, 16])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _matmul_gemm_model(path: Path, tiny: float = 1e-7, huge: float = 1e5) -> Path:
    """MatMul (weights [K, N], stored transposed by pnnx as InnerProduct [N, K]) with weights ~1e-7, a Relu,
    and a Gemm (transB) with weights up to ~4e5 > 65504."""
    rng = np.random.default_rng(0)
    inits = {"w1": (rng.standard_normal((16, 32)) * tiny).astype(np.float32),
             "w2": (rng.standard_normal((C, 32)) * huge).astype(np.float32),
             "b2": rng.standard_normal(C).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _inputs(spec, n: int = 16, seed: int = 1):
    from edgekit.data import Dataset

    return Dataset({spec.inputs[0].name: np.random.default_rng(seed).standard_normal(
        (n, *spec.inputs[0].shape[1:])).astype(np.float32)})


def _fp16_verdict(spec, session, tmp_path: Path, name: str):
    ort = backends.get("onnxruntime")
    batches = _inputs(spec).batches(spec)
    ref_artifact = ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, _mk(tmp_path / name))
    ref = run_all(ort.load(ref_artifact, 1), batches)
    return compare(ref, run_all(session, batches), [o.name for o in spec.outputs], None, Thresholds(), "fp16")


@pytest.mark.parametrize("case", ["deconv_bn", "matmul_gemm"])
def test_fp16_keeps_out_of_range_transposed_layers_fp32(case: str, tmp_path: Path) -> None:
    """pnnx transposes ConvTranspose and MatMul weights: the range check reads the ncnn blobs, keeps the
    layer's storage FP32 and masks FP16 off for it at run time (featmask), and says which and why."""
    if case == "deconv_bn":
        src, expected = _deconv_bn_model(tmp_path / "m.onnx", variance=1e16), {"Deconvolution": r"below 2\^-14"}
    else:
        src, expected = _matmul_gemm_model(tmp_path / "m.onnx"), {"InnerProduct": r"below 2\^-14|> 65504"}
    spec = ingest(str(src), tmp_path / "w")
    fp16 = NCNN.export(spec, ArtifactPlan("ncnn", "fp16"), None, _mk(tmp_path / "fp16"))
    model = NcnnModel.load(*_files(fp16))
    kept = [la for la in model.layers if la.type in expected]
    assert kept and fp16.details["keep_fp32"] == sorted(la.name for la in kept)
    for layer in kept:
        assert model.weights[layer.name][0].storage == "fp32" and layer.int(31) == 3
        assert re.search(expected[layer.type], fp16.details["keep_fp32_reasons"][layer.name])
        assert any(n.startswith(f"ncnn layer {layer.name} ({layer.type}, ONNX node ") for n in fp16.notes)
    others = [la for la in model.layers if la.name in model.weights and la not in kept]
    assert all(model.weights[la.name][0].storage == "fp16" and la.int(31) == 0 for la in others)
    v = _fp16_verdict(spec, NCNN.load(fp16, 1), tmp_path, "r1")
    assert v.passed and v.cosine_min >= 0.999 and v.centred_cosine_min >= 0.999, v.failures
    # The same layers in FP16 (the check missing them, as it did by comparing ONNX values): rejected.
    for layer in kept:
        layer.params.pop(31)
        model.weights[layer.name][0].storage = "fp16"
    with np.errstate(over="ignore"):  # |w| > 65504 becomes inf: the point
        model.save(tmp_path / "all16.param", tmp_path / "all16.bin")
    d = fp16.details
    session = NcnnSession(tmp_path / "all16.param", tmp_path / "all16.bin", "fp16", 1, d["input_blobs"],
                          d["output_blobs"], d["output_shapes"])
    broken = _fp16_verdict(spec, session, tmp_path, "r2")
    assert not broken.passed and broken.cosine_min < 0.99, broken.cosine_min


def test_fp32_storage_alone_is_not_enough_for_ncnn(tmp_path: Path) -> None:
    """Why the featmask: with use_fp16_storage ncnn casts FP32-stored InnerProduct weights to fp16 at load."""
    spec = ingest(str(_matmul_gemm_model(tmp_path / "m.onnx")), tmp_path / "w")
    fp16 = NCNN.export(spec, ArtifactPlan("ncnn", "fp16"), None, _mk(tmp_path / "fp16"))
    model = NcnnModel.load(*_files(fp16))
    for layer in model.layers:
        layer.params.pop(31, None)
    model.save(tmp_path / "nomask.param", tmp_path / "nomask.bin")
    d = fp16.details
    session = NcnnSession(tmp_path / "nomask.param", tmp_path / "nomask.bin", "fp16", 1, d["input_blobs"],
                          d["output_blobs"], d["output_shapes"])
    v = _fp16_verdict(spec, session, tmp_path, "r")
    assert not v.passed and v.centred_cosine_min < 0.9, (v.cosine_min, v.centred_cosine_min)


@pytest.mark.parametrize("op_type", ["ConvTranspose", "MatMul"])
def test_named_node_is_found_through_a_transposed_layout(op_type: str, tmp_path: Path) -> None:
    src = (_deconv_bn_model(tmp_path / "m.onnx", variance=1.0) if op_type == "ConvTranspose"
           else _matmul_gemm_model(tmp_path / "m.onnx", tiny=0.3, huge=0.3))
    spec = ingest(str(src), tmp_path / "w")
    node = next(n.name for n in spec.load().graph.node if n.op_type == op_type)
    fp16 = NCNN.export(spec, ArtifactPlan("ncnn", "fp16", keep_fp32=[node]), None, _mk(tmp_path / "fp16"))
    model = NcnnModel.load(*_files(fp16))
    (kept,) = fp16.details["keep_fp32"]  # nothing is out of range: only the named node's layer
    assert model.layer(kept).type == {"ConvTranspose": "Deconvolution", "MatMul": "InnerProduct"}[op_type]
    assert model.weights[kept][0].storage == "fp32" and model.layer(kept).int(31) == 3
    assert node in fp16.details["keep_fp32_reasons"][kept]
    if op_type == "MatMul":  # INT8: the excluded MatMul's InnerProduct keeps float weights, the Gemm's is int8
        plan = ArtifactPlan("ncnn", "int8", QuantizationSettings(samples=16, exclude_nodes=[node]))
        int8 = NCNN.export(spec, plan, _inputs(spec), _mk(tmp_path / "int8"))
        q = NcnnModel.load(*_files(int8))
        storage = {la.name: q.weights[la.name][0].storage for la in q.layers if la.type == "InnerProduct"}
        assert storage == {kept: "fp32", next(n for n in storage if n != kept): "int8"}
        assert int8.details["kept_float"] == [kept]


def test_named_node_that_matches_no_layer_fails_the_artifact(tmp_path: Path) -> None:
    spec = ingest(str(_matmul_gemm_model(tmp_path / "m.onnx", tiny=0.3, huge=0.3)), tmp_path / "w")
    with pytest.raises(BadInput, match="'fc_1'"):  # misspelled: bad input, named
        NCNN.export(spec, ArtifactPlan("ncnn", "fp16", keep_fp32=["fc_1"]), None, _mk(tmp_path / "a"))
    with pytest.raises(BadInput, match="'fc_1'"):
        NCNN.export(spec, ArtifactPlan("ncnn", "int8", QuantizationSettings(samples=8, exclude_nodes=["fc_1"])),
                    _inputs(spec), _mk(tmp_path / "b"))
    # A node pnnx fused away (the Relu went into the InnerProduct) cannot be held in FP32 by itself.
    with pytest.raises(EdgekitError, match=r"act .*no weights"):
        NCNN.export(spec, ArtifactPlan("ncnn", "fp16", keep_fp32=["act"]), None, _mk(tmp_path / "c"))


def test_fp16_build_records_the_kept_layer_in_the_manifest(tmp_path: Path) -> None:
    from conftest import FAST, read_manifest, run_cli

    src = _deconv_bn_model(tmp_path / "m.onnx", variance=1e16)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((20, C, 8, 8)).astype(np.float32))
    r = run_cli("build", src, "--target", "host-cpu", "--backend", "ncnn", "--precision", "fp16",
                "--calib", tmp_path / "d.npz", "--out", tmp_path / "pkg", *FAST)
    assert r.code == 0, r.stderr
    (a,) = read_manifest(tmp_path / "pkg")["artifacts"]
    (kept,) = a["details"]["keep_fp32"]
    assert a["verification"]["passed"] and a["verification"]["cosine_min"] >= 0.999
    assert any(n.startswith(f"ncnn layer {kept} (Deconvolution") and "below 2^-14" in n for n in a["notes"])


# ---------------------------------------------------------------- INT8 retry through `edgekit build`


def _outlier_model(path: Path) -> Path:
    rng = np.random.default_rng(0)

    def w(shape: tuple[int, ...]) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)

    inits = {"w1": w((16, 3, 3, 3)), "w2": w((16, 16, 3, 3)), "w3": w((8, 16, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["a2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_ncnn_int8_retry_with_kl_calibration_through_build(tmp_path: Path) -> None:
    """One calibration sample has a pixel of 200 (a sensor glitch): minmax sets every scale by it and the
    first INT8 build is rejected; ncnn has no 7-bit weights to retry with, so the build retries with KL
    calibration, which clips the outlier, passes, and the manifest says so."""
    from conftest import FAST, read_manifest, run_cli

    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    calib[5, 0, 8, 8] = 200.0
    np.savez(tmp_path / "calib.npz", x=calib)
    np.savez(tmp_path / "val.npz", x=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    r = run_cli("build", _outlier_model(tmp_path / "m.onnx"), "--target", "host-cpu", "--backend", "ncnn",
                "--precision", "int8", "--calib", tmp_path / "calib.npz", "--val", tmp_path / "val.npz",
                "--out", tmp_path / "pkg", *FAST)
    assert r.code == 0, r.stderr
    (a,) = read_manifest(tmp_path / "pkg")["artifacts"]
    v = a["verification"]
    assert v["passed"] and v["cosine_min"] >= 0.99 and v["centred_cosine_min"] >= 0.98
    assert a["details"]["calibration"] == "kl"
    (why,) = [n for n in a["notes"] if n.startswith("first INT8 attempt rejected")]
    assert "cosine 0." in why and why.endswith("entropy (KL) calibration passed")
    assert "REJECTED" in r.stderr  # the first attempt, as verified
    plan = (tmp_path / "pkg" / "plan.yaml").read_text()
    assert "method: entropy" in plan  # the plan records what was built
