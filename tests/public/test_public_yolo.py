"""Issue 12: a public YOLO-family detector gets a verified INT8 artifact on ONNX Runtime, OpenVINO and NCNN
with the default recipe. YOLOv8n from Ultralytics' own definition (yolov8n.yaml, nc=4, random init), trained
briefly on generated shapes with Ultralytics' loss, exported as Ultralytics exports it (output0 [1, 8, 525]),
built through the real command; every INT8 artifact is also judged on decoded boxes against FP32
(bench/public_models.py: decode, NMS, matching), outside edgekit.

The trained model is cached by a hash of its settings under $EDGEKIT_TEST_CACHE (default
~/.cache/edgekit-tests): 450 steps, deterministic, 150-210 s of training the first time, instant after."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FAST, REPO, read_manifest, run_cli

from edgekit.quantize.detection_head import head_nodes

sys.path.insert(0, str(REPO / "bench"))
# Ultralytics is installed by scripts/setup.sh (--no-deps): missing, the fixture fails rather than skips
from public_models import box_agreement, yolov8n_trained

CACHE = Path(os.environ.get("EDGEKIT_TEST_CACHE", "~/.cache/edgekit-tests")).expanduser()
TRAIN_STEPS = 450
BACKENDS = ("onnxruntime", "openvino", "ncnn")
# INT8 boxes vs FP32 boxes (conf 0.25, NMS 0.45, same class). Measured on this model: recall 1.00 and mean
# best IoU 0.985-0.992 with the head in float on all three; ONNX Runtime with --no-detector-head: no boxes.
MIN_RECALL, MIN_MEAN_IOU = 0.9, 0.9


@pytest.fixture(scope="module")
def yolov8n():
    built = yolov8n_trained(CACHE, steps=TRAIN_STEPS)
    with np.load(built.val) as z:
        images = z["images"]
    return built, images, built.labels()


def test_the_fp32_model_detects_what_was_drawn(yolov8n) -> None:
    """A model that detects nothing would make every box comparison vacuous."""
    built, images, labels = yolov8n
    m = built.meta
    assert m["val_map50"] >= 0.4 and m["val_recall50"] >= 0.4, m
    assert m["val_found"] >= 0.5 * m["val_boxes"], m
    model = onnx.load(str(built.onnx))
    (out,) = model.graph.output
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 8, 525]
    assert model.opset_import[0].version == 17
    assert images.shape == (48, 3, 160, 160) and len(labels) == 48


def test_the_whole_yolov8_head_is_found(yolov8n) -> None:
    """From the graph alone: the six branches' last convs, the DFL (Softmax and its fixed 1x1 conv), the
    dist2bbox decode (Sub/Add/Div), the stride Mul, the score Sigmoid and every Concat up to output0; and
    nothing of the backbone (no SiLU Sigmoid/Mul pairs, no 3x3 convs)."""
    built, _, _ = yolov8n
    model = onnx.load(str(built.onnx))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    taken = set(head_nodes(model))
    head = [n for n in model.graph.node if n.name in taken]
    ops = [n.op_type for n in head]
    convs = [n for n in head if n.op_type == "Conv"]
    assert len(convs) == 7 and {inits[n.input[1]].shape[2:] for n in convs} == {(1, 1)}  # 6 branch ends + DFL
    assert sum(producer[n.input[0]].op_type == "Softmax" for n in convs) == 1  # the DFL's expectation conv
    assert ops.count("Softmax") == 1 and ops.count("Sigmoid") == 1 and "Div" in ops and "Sub" in ops
    assert ops.count("Concat") >= 4  # boxes, scores, the decoded xywh, output0
    assert producer[model.graph.output[0].name].name in taken
    # the stride Mul: a constant input holding the strides 8, 16, 32
    strides = [n for n in head if n.op_type == "Mul" and any(
        x in inits and set(np.unique(inits[x]).tolist()) == {8, 16, 32} for x in n.input)]
    assert len(strides) == 1
    # nothing of the backbone: no 3x3 conv, no SiLU (Sigmoid feeding a Mul with the same input)
    assert not any(n.op_type == "Sigmoid" and n.input[0] in {x for m in head if m.op_type == "Mul" for x in m.input}
                   for n in head)


def test_int8_verifies_on_every_backend_and_its_boxes_match_fp32(yolov8n, tmp_path: Path) -> None:
    built, images, labels = yolov8n
    out = tmp_path / "y8"
    # --recover none: the default recipe must verify at the first attempt (no retry hides a weak default).
    r = run_cli("build", built.onnx, "--target", "host-cpu", "--backend", ",".join(BACKENDS),
                "--precision", "fp32,int8", "--calib", built.calib, "--val", built.val, "--out", out,
                "--recover", "none", *FAST)
    package = out if r.code == 0 else out.with_name("y8.rejected")
    assert r.code in (0, 1) and (package / "manifest.json").is_file(), r.stderr + r.stdout
    m = read_manifest(package)
    assert any("weak proxy for mAP" in w for w in m["data"]["warnings"])
    arts = {a["key"]: a for a in m["artifacts"]}
    assert set(arts) == {f"{b}-{p}" for b in BACKENDS for p in ("fp32", "int8")}, set(arts)
    for b in BACKENDS:
        assert arts[f"{b}-fp32"]["verification"]["passed"], arts[f"{b}-fp32"]["verification"]["failures"]

    # the head stayed in float, and the artifacts say which nodes
    expected = set(head_nodes(onnx.load(str(built.onnx))))
    for b in BACKENDS:
        a = arts[f"{b}-int8"]
        assert any(n.startswith("detector head kept in float (") for n in a["notes"]), a["notes"]
    assert expected <= set(arts["onnxruntime-int8"]["details"]["excluded_nodes"])
    assert expected <= set(arts["openvino-int8"]["details"]["excluded_nodes"])
    assert len(arts["ncnn-int8"]["details"]["kept_float"]) == 7  # the head's weighted layers

    # the task check: INT8 boxes vs FP32 boxes, each artifact in its own runtime
    agree = box_agreement(package, images, labels)
    assert agree["onnxruntime-fp32"]["found"] >= 40
    for b in BACKENDS:
        g = agree[f"{b}-int8"]
        assert g["recall"] >= MIN_RECALL and g["mean_best_iou"] >= MIN_MEAN_IOU, (b, g)
        assert g["extra"] <= 0.1 * g["wanted"], (b, g)
        assert g["map50"] >= agree["onnxruntime-fp32"]["map50"] - 0.05, (b, g)
        scores = [s for o in arts[f"{b}-int8"]["verification"]["outputs"] for s in o["slices"] if s["score_like"]]
        # Rank correlation: above 0.95 on a VNNI host; OpenVINO on an AVX2-only host gave 0.94 for one class, with
        # its boxes matching as above. The bar is the verifier's own (0.9): what "verified" means.
        assert len(scores) == 4 and all(s["score_iou"] >= 0.8 and s["rank_correlation"] >= 0.9 for s in scores), \
            [(b, s["index"], s["score_iou"], s["rank_correlation"]) for s in scores]

    for b in BACKENDS:  # verified by the tensor figures too: box rows judged where a score reaches 0.25
        v = arts[f"{b}-int8"]["verification"]
        assert v["passed"], (b, v["failures"])
        assert any("slices 0-3 (axis 1, not score-like) judged only at the" in n for n in v["notes"]), v["notes"]
    assert r.code == 0, r.stderr + r.stdout


def test_without_the_head_in_float_onnxruntime_int8_finds_nothing_and_is_rejected(yolov8n, tmp_path: Path) -> None:
    """The comparison: --no-detector-head, one INT8 scale for pixels and 0-1 scores. The verdict means what it
    says: rejected, and its decoded boxes are gone."""
    built, images, _ = yolov8n
    out = tmp_path / "nohead"
    r = run_cli("build", built.onnx, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "int8",
                "--calib", built.calib, "--val", built.val, "--out", out, "--no-detector-head", "--recover", "none",
                *FAST)
    assert r.code == 1, r.stderr + r.stdout
    package = out.with_name("nohead.rejected")
    (a,) = read_manifest(package)["artifacts"]
    v = a["verification"]
    assert not v["passed"] and v["cosine_min"] > 0.99  # the whole output still looks fine by cosine
    assert v["score_iou_min"] == 0.0 and v["worst_slice"]["score_like"]
    run = box_agreement(package, images[:16])
    assert run["onnxruntime-int8"]["found"] == 0
