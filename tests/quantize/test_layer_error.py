"""The cheap per-layer INT8 ranking (one Q/DQ pass, edgekit.quantize.layer_error), with real ONNX Runtime,
OpenVINO and NCNN builds confirming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgekit import backends
from edgekit.data import Dataset
from edgekit.ingest import ModelSpec, ingest
from edgekit.planning.types import QuantizationSettings
from edgekit.quantize.layer_error import qdq_layer_errors, search_order
from edgekit.quantize.sensitivity import layer_sensitivity, mixed_precision
from edgekit.verify.verifier import Thresholds

PRODUCER, CONSUMER = "/layer2/conv1/Conv", "/layer2/conv2/Conv"
# What the undamaged TinyResNet's uniform INT8 meets on all three backends (OpenVINO's is the weakest:
# cosine ~0.97), so that a miss is the damage's.
LOOSE = Thresholds(min_cosine=0.95, min_snr_db=10.0, min_top1_agreement=0.75)


def _outlier_channel(model: onnx.ModelProto, producer: str, consumer: str, factor: float = 100.0) -> onnx.ModelProto:
    """The same function with a hostile tensor: the producer's output channel 0 (weights and bias) times
    `factor`, the consumer's input channel 0 divided by it. ReLU between them is positively homogeneous, so
    FP32 computes the same; the tensor between has one channel 100x the others, and its one INT8 scale
    rounds the others away."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for axis, f, inputs in ((0, factor, nodes[producer].input[1:3]), (1, 1 / factor, nodes[consumer].input[1:2])):
        for inp in inputs:
            a = numpy_helper.to_array(inits[inp]).copy()
            index = [slice(None)] * a.ndim
            index[axis if a.ndim > 1 else 0] = 0
            a[tuple(index)] *= f
            inits[inp].CopyFrom(numpy_helper.from_array(a, inp))
    return model


@pytest.fixture(scope="module")
def resnets(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, ModelSpec, Dataset, Dataset]:
    from models import export_fixed, tiny_resnet

    tmp = tmp_path_factory.mktemp("resnet")
    clean = ingest(str(export_fixed(tiny_resnet(), tmp / "clean.onnx", size=32)), tmp / "clean")
    onnx.save(_outlier_channel(clean.load(), PRODUCER, CONSUMER), tmp / "damaged.onnx")
    damaged = ingest(str(tmp / "damaged.onnx"), tmp / "damaged")
    rng = np.random.default_rng(0)
    calib = Dataset({"images": rng.standard_normal((64, 3, 32, 32)).astype(np.float32)})
    val = Dataset({"images": rng.standard_normal((32, 3, 32, 32)).astype(np.float32)})
    return clean, damaged, calib, val


def test_the_damage_keeps_the_fp32_function(resnets) -> None:
    clean, damaged, _, val = resnets
    x = {"images": val.inputs["images"][:1]}
    a = ort.InferenceSession(clean.onnx_path).run(None, x)[0]
    b = ort.InferenceSession(damaged.onnx_path).run(None, x)[0]
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()


def test_the_layer_whose_activation_has_an_outlier_channel_ranks_first(resnets) -> None:
    clean, damaged, calib, val = resnets
    settings = QuantizationSettings(samples=64)
    hurt = qdq_layer_errors(damaged, calib, val.batches(damaged)[:8], settings)
    healthy = qdq_layer_errors(clean, calib, val.batches(clean)[:8], settings)
    assert len(hurt.layers) == len(healthy.layers) == 13 and not hurt.skipped
    top, second = hurt.layers[0], hurt.layers[1]
    # Most of its channels rounded away (per-channel error ~0.3), its weights fine (~3e-5), while the whole
    # tensor's SNR, held up by the outlier channel, looks healthy (> 20 dB).
    assert top.node == PRODUCER and top.error > 0.1 and top.weight_error < 1e-3 and top.output_snr_db > 20, top
    assert top.error > 10 * second.error, [e.to_dict() for e in hurt.layers[:3]]
    assert max(e.error for e in healthy.layers) < 0.01  # undamaged: no layer near it
    # The model output is what the damage wrecks (noise amplified downstream is not "introduced" there).
    assert hurt.output_snr_db < 5 < 15 < healthy.output_snr_db
    assert CONSUMER in top.consumers and top.introduced_db < 10
    # Its consumer first (NNCF and ncnn quantize that input), itself next (ONNX Runtime needs both).
    assert [e.node for e in search_order(hurt)[:2]] == [CONSUMER, PRODUCER]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "ncnn"])
def test_real_builds_confirm_the_cheap_ranking(resnets, tmp_path: Path, backend: str) -> None:
    """Ranked in one Q/DQ pass, confirmed by the backend's own builds: ncnn and OpenVINO need the consumer only,
    ONNX Runtime both ends of the tensor. Leave-one-out, one build per layer, cannot see it on ONNX Runtime:
    neither end alone helps there."""
    assert backends.get(backend).missing() is None  # every backend installs here: a missing one is a failure
    _, damaged, calib, val = resnets
    settings = QuantizationSettings(samples=64)
    sens = layer_sensitivity(damaged, backend, calib, val, settings, cache_dir=tmp_path, method="qdq_error",
                             max_batches=8)
    assert sens.method == "qdq_error" and sens.backend == backends.REFERENCE_BACKEND
    assert [s.node for s in sens[:2]] == [CONSUMER, PRODUCER] and sens[1].snr_gain_db > 1
    r = mixed_precision(damaged, backend, calib, val, LOOSE, settings, sensitivities=sens, max_float_fraction=0.25)
    uniform, final = r.steps[0], r.steps[-1]
    assert not uniform.passed and uniform.cosine_min < 0.9, r.to_dict()
    expected = [CONSUMER, PRODUCER] if backend == "onnxruntime" else [CONSUMER]
    assert r.passed and r.float_nodes == expected, r.reason
    assert final.cosine_min > 0.95 and final.snr_db_min > uniform.snr_db_min + 6
    again = layer_sensitivity(damaged, "openvino", calib, val, settings, cache_dir=tmp_path, method="qdq_error",
                              max_batches=8)
    assert again.cached and [s.node for s in again] == [s.node for s in sens]  # one proxy for every backend
    if backend == "onnxruntime":
        loo = layer_sensitivity(damaged, backend, calib, val, settings, cache_dir=tmp_path, max_batches=8)
        assert all(s.snr_gain_db < 2 for s in loo), [(s.node, s.snr_gain_db) for s in loo]


def test_hostile_weights_and_outlier_activations_rank_first(tmp_path: Path) -> None:
    """The sensitivity tests' hostile model: a weight of 300 on a dead channel makes `hostile` lose everything
    (error 1.0); outlier activations out of conv2 make conv2 lose its tensor, `hostile` (its consumer) first."""
    from test_sensitivity import _data, _hostile_model

    for outliers, first, order in ((False, "hostile", ["hostile", "conv2"]), (True, "conv2", ["hostile", "conv2"])):
        spec = ingest(str(_hostile_model(tmp_path / f"{outliers}.onnx", outliers)), tmp_path / str(outliers))
        errors = qdq_layer_errors(spec, _data(1), _data(2).batches(spec), QuantizationSettings(samples=32))
        ranked = errors.layers
        assert ranked[0].node == first and ranked[0].error > 0.5 and ranked[1].error < 0.01, \
            [e.to_dict() for e in ranked]
        assert [e.node for e in search_order(errors)[:2]] == order
        assert errors.output_snr_db < 5 and errors.seconds > 0
