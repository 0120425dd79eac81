"""Quantization-aware training (NNCF's PyTorch QAT, exported as a Q/DQ ONNX) and the recovery ladder's QAT rung:
real NNCF training, real ONNX Runtime and OpenVINO builds of the result, compared with post-training INT8."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nncf  # noqa: F401  (both install here with the torch and openvino extras: missing is a failure)
import numpy as np
import onnx
import pytest
import torch  # noqa: F401
import yaml
from onnx import TensorProto, helper, numpy_helper

from edgekit import backends
from edgekit.data import Dataset, DataSplit
from edgekit.errors import EdgekitError
from edgekit.ingest import ModelSpec, ingest
from edgekit.pipeline.candidates import Verifier
from edgekit.pipeline.options import BuildOptions
from edgekit.pipeline.qat_rung import qat_rung
from edgekit.pipeline.recovery import Rejected
from edgekit.pipeline.stages import CachedStages
from edgekit.planning.types import ArtifactPlan, Plan, QuantizationSettings
from edgekit.quantize.qat import quantization_aware_training
from edgekit.verify.verifier import Thresholds

C = 16


def _w(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)


def _outlier_model(path: Path, gain: float = 300.0, logits: bool = True) -> Path:
    """conv1 -> conv2 -> relu2 -> hostile (1x1) -> conv4 -> conv5 -> features, and GAP -> fc -> logits.

    conv2's first two output channels are `gain` times larger than the rest and vary with the input
    (massive activations: the per-tensor INT8 scale of relu2's output is set by them); `hostile` ignores
    them (zero weights), so FP32 does not depend on them, but post-training INT8 at that scale rounds
    the 14 useful channels to a few levels. A calibrator that clips (entropy) trades some of that for the
    clipped channels' range; none can tell they do not matter. Training the range can. `logits=False`: the
    feature map alone (no classifier output, whose top-1 would decide the verdict as the task metric)."""
    rng = np.random.default_rng(0)
    w2, w3 = _w(rng, (C, C, 3, 3)), _w(rng, (C, C, 1, 1))
    w2[:2] *= gain
    w3[:, :2] = 0.0
    inits = {"w1": _w(rng, (C, 3, 3, 3)), "w2": w2, "b2": np.zeros(C, np.float32), "w3": w3,
             "w4": _w(rng, (C, C, 3, 3)), "w5": _w(rng, (C, C, 1, 1)), "fc": _w(rng, (10, C)),
             "fcb": np.zeros(10, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["a2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["a3"], name="hostile"),
             helper.make_node("Relu", ["a3"], ["r3"], name="relu3"),
             helper.make_node("Conv", ["r3", "w4"], ["a4"], name="conv4", pads=[1] * 4),
             helper.make_node("Relu", ["a4"], ["r4"], name="relu4"),
             helper.make_node("Conv", ["r4", "w5"], ["features"], name="conv5")]
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, C, 16, 16])]
    if logits:
        nodes += [helper.make_node("GlobalAveragePool", ["features"], ["g"], name="gap"),
                  helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
                  helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1)]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10]))
    else:
        del inits["fc"], inits["fcb"]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _normal(seed: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _build(spec: ModelSpec, backend: str, q: QuantizationSettings, calib: Dataset | None, root: Path):
    root.mkdir(parents=True)
    precision = "fp32" if q is None else "int8"
    return backends.get(backend).export(spec, ArtifactPlan(backend, precision, q), calib, root)


def _outputs(art, name: str, x: np.ndarray) -> list[np.ndarray]:
    session = backends.get(art.backend).load(art, 1)
    runs = [session.run({name: v[None]}) for v in x]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Dataset, Dataset, np.ndarray]:
    tmp = tmp_path_factory.mktemp("outlier")
    spec = ingest(str(_outlier_model(tmp / "m.onnx")), tmp / "w")
    return (spec, Dataset({"x": _normal(0, 256, (3, 16, 16))}), Dataset({"x": _normal(1, 64, (3, 16, 16))}),
            _normal(2, 64, (3, 16, 16)))


def test_qat_of_a_pytorch_resnet_is_a_qdq_onnx_that_onnxruntime_and_openvino_run(tmp_path: Path) -> None:
    """The torch-factory path (BatchNorm folded first), hard labels (cross-entropy + distillation): the Q/DQ
    ONNX keeps the model's names and shapes, holds int8 weights, and both backends run it. Measured: QAT
    cosine 0.9948 on ONNX Runtime (top-1 agreement 0.96), its own PTQ 0.9950 (0.92): ORT's asymmetric
    activations suit this model as well as QAT's symmetric ones; on OpenVINO 0.9955 (0.96), NNCF's PTQ
    0.9786 (0.84)."""
    spec = ingest("models:tiny_resnet", tmp_path / "w", {"images": [1, 3, 32, 32]})
    assert spec.torch_factory == "models:tiny_resnet"
    train_x, calib_x, val_x = _normal(0, 256, (3, 32, 32)), _normal(1, 64, (3, 32, 32)), _normal(2, 100, (3, 32, 32))
    fp32 = _build(spec, "onnxruntime", None, None, tmp_path / "fp32")
    ref = _outputs(fp32, "images", val_x)[0]
    labels = _outputs(fp32, "images", train_x)[0].argmax(1)  # the FP32 model's own classes
    res = quantization_aware_training(spec, Dataset({"images": train_x}, labels), Dataset({"images": calib_x}), 10,
                                      tmp_path / "qat.onnx", threads=1)
    assert (res.epochs, res.steps) == (10, 80) and res.library.startswith("nncf ") and res.loss_last < res.loss_first
    model = onnx.load(str(res.qdq_onnx))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops and "BatchNormalization" not in ops
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["output"]
    int8 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert len(int8) == 13  # every conv and linear weight: int8 codes, no float copy left
    assert not [i for i in model.graph.initializer if i.name.endswith(".weight")]

    figures = {}
    for backend in ("onnxruntime", "openvino"):
        ptq = _build(spec, backend, QuantizationSettings(samples=64), Dataset({"images": calib_x}),
                     tmp_path / f"ptq-{backend}")
        qat = _build(spec, backend, QuantizationSettings(qdq_model=str(res.qdq_onnx)), None,
                     tmp_path / f"qat-{backend}")
        assert qat.details["quantizer"] == f"qat ({res.library})"
        figures[backend] = (_cosine(ref, _outputs(ptq, "images", val_x)[0]),
                            _cosine(ref, _outputs(qat, "images", val_x)[0]))
    assert (tmp_path / "qat-onnxruntime" / "model.onnx").read_bytes() == res.qdq_onnx.read_bytes()  # run as it is
    (ort_ptq, ort_qat), (ov_ptq, ov_qat) = figures["onnxruntime"], figures["openvino"]
    assert ort_qat > 0.99 and ov_qat > 0.99, figures
    assert ov_qat > ov_ptq + 0.005, figures  # NNCF's PTQ on OpenVINO: 0.981
    assert ort_qat > ort_ptq - 0.005, figures  # as good as ORT's own PTQ (0.9948 vs 0.9950), not better


def test_qat_recovers_an_outlier_channel_model_that_no_uniform_ptq_does(outlier, tmp_path: Path) -> None:
    """Post-training INT8 of every calibration on ONNX Runtime, and NNCF's on OpenVINO, keep the feature map at
    cosine 0.53-0.96 (measured: minmax 0.533, percentile 0.630, entropy 0.956, NNCF 0.724); QAT (30 epochs of
    256 samples, 7 s) learns a range for relu2's output that clips the ignored outliers (scale 0.17 against
    minmax's 6.2) and reaches 0.9987 on both backends."""
    spec, train, calib, val = outlier
    fp32 = _build(spec, "onnxruntime", None, None, tmp_path / "fp32")
    ref = _outputs(fp32, "x", val)[0]
    ptq = {}
    for method in ("minmax", "entropy", "percentile"):
        art = _build(spec, "onnxruntime", QuantizationSettings(method=method, samples=64), calib, tmp_path / method)
        ptq[method] = _cosine(ref, _outputs(art, "x", val)[0])
    minmax = onnx.load(str(tmp_path / "minmax" / "model.onnx"))
    ov = _build(spec, "openvino", QuantizationSettings(samples=64), calib, tmp_path / "nncf-ov")
    ptq["nncf-openvino"] = _cosine(ref, _outputs(ov, "x", val)[0])
    assert max(ptq.values()) < 0.97, ptq

    res = quantization_aware_training(spec, train, calib, 30, tmp_path / "qat.onnx", threads=1)
    qat = {b: _cosine(ref, _outputs(_build(spec, b, QuantizationSettings(qdq_model=str(res.qdq_onnx)), None,
                                           tmp_path / f"qat-{b}"), "x", val)[0]) for b in ("onnxruntime", "openvino")}
    assert min(qat.values()) > 0.995 and min(qat.values()) > max(ptq.values()) + 0.03, (qat, ptq)
    learned, calibrated = _input_scale(onnx.load(str(res.qdq_onnx))), _input_scale(minmax)
    assert learned < calibrated / 10, (learned, calibrated)

    a, b = (onnx.load(str(quantization_aware_training(spec, train, calib, 2, tmp_path / f"seeded{i}.onnx",
                                                      threads=1).qdq_onnx)) for i in (0, 1))
    assert [i.SerializeToString() for i in a.graph.initializer] == [i.SerializeToString() for i in b.graph.initializer]
    assert a.graph.node == b.graph.node  # deterministic: the same codes and the same learned scales


def _input_scale(model: onnx.ModelProto) -> float:
    """The activation scale of the input of the `hostile` Conv (ORT's quantizer keeps the node's name; the
    torch exporter scopes it, /net/hostile/Conv)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
               if n.op_type == "Constant"}
    by_output = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "hostile" in n.name)
    dq = by_output[conv.input[0]]
    assert dq.op_type == "DequantizeLinear"
    return float(values[dq.input[1]])


def test_qat_rung_gives_an_attempt_that_passes_where_ptq_failed(outlier, tmp_path: Path) -> None:
    """The rung end to end, as the ladder runs it: --train as an .npz, the attempt built and verified by the
    build's own stages; the QAT model trained once and reused from the cache for the next backend; a plain
    reason, no attempt, for a backend that cannot take a Q/DQ ONNX; plan.yaml never names the scratch file."""
    _, train, calib, val = outlier
    spec = ingest(str(_outlier_model(tmp_path / "features.onnx", logits=False)), tmp_path / "w")
    stages = CachedStages(BuildOptions(model=spec.source, target="host-cpu"))
    data = DataSplit(calib, Dataset({"x": val}), "validation: its own samples")
    fp32 = stages.export(spec, ArtifactPlan("onnxruntime", "fp32"), data, tmp_path / "pkg" / "onnxruntime-fp32")
    verifier = Verifier(spec, fp32, data, Thresholds(), 1, stages)
    np.savez(tmp_path / "train.npz", x=train.inputs["x"])

    def rejected(backend: str, work: str = "work") -> Rejected:
        ap = ArtifactPlan(backend, "int8", QuantizationSettings(samples=64))
        art = stages.export(spec, ap, data, tmp_path / "pkg" / f"{backend}-int8")
        return Rejected(spec, ap, art, verifier.check(art), data, tmp_path / "pkg", tmp_path / work, verifier,
                        None, train=str(tmp_path / "train.npz"), qat_epochs=30)

    r = rejected("onnxruntime")
    assert not r.verification.passed  # minmax INT8 wipes out the feature map
    (attempt,) = list(qat_rung(r))
    path = Path(attempt.settings.qdq_model)
    assert path.is_file() and r.work in path.parents and attempt.folder == "qat-onnxruntime-int8"
    assert dataclasses.replace(attempt.settings, qdq_model=None) == r.plan.quantization
    assert "30 epoch(s), 240 steps on 256 training samples from" in attempt.setting and attempt.setting in attempt.why
    retry = dataclasses.replace(r.plan, quantization=attempt.settings)
    art = stages.export(spec, retry, data, r.work / attempt.folder)
    v = verifier.check(art)
    assert v.passed and v.cosine_min > 0.995, v.failures
    assert art.details["quantizer"].startswith("qat (nncf ")

    assert path.with_suffix(".json").is_file()  # the next backend's rung in this build takes it as it is
    r_ov = rejected("openvino", work="another-build")
    reused_before = stages.cache.reused.count("quantization-aware training")
    (attempt_ov,) = list(qat_rung(r_ov))
    assert stages.cache.reused.count("quantization-aware training") == reused_before + 1  # trained once
    assert Path(attempt_ov.settings.qdq_model).read_bytes() == path.read_bytes()
    assert r_ov.work in Path(attempt_ov.settings.qdq_model).parents

    assert backends.get("onnxruntime").takes_qdq_onnx and backends.get("openvino").takes_qdq_onnx
    assert not backends.get("ncnn").takes_qdq_onnx
    r_ncnn = dataclasses.replace(r, plan=ArtifactPlan("ncnn", "int8", QuantizationSettings(samples=64)))
    with pytest.raises(EdgekitError, match="ncnn cannot take a quantization-aware-trained model"):
        list(qat_rung(r_ncnn))  # the ladder records the reason; no attempt

    plan = Plan("host-cpu", spec.sha256, [retry, dataclasses.replace(
        retry, quantization=dataclasses.replace(attempt.settings, qdq_model="qat/model.onnx"))])
    written = yaml.safe_load(plan.to_yaml())
    assert "qdq_model" not in written["artifacts"][0]["quantization"]  # a scratch path stays out of plan.yaml
    assert written["artifacts"][1]["quantization"]["qdq_model"] == "qat/model.onnx"
    again = Plan.from_dict(written)
    assert again.artifacts[0].quantization.qdq_model is None
    assert again.artifacts[1].quantization.qdq_model == "qat/model.onnx"
