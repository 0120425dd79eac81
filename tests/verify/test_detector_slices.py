"""Issue 19: INT8 of a detector that finds nothing was shipped as verified. A YOLOv8-style output
[1, 4 + classes, anchors] holds box coordinates in pixels beside 0-1 scores; one INT8 scale for it wipes
the scores out while every whole-output figure stays fine. Outputs are judged per slice, score slices on
their above-threshold sets and rank order, and the detector head stays in float by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, read_manifest, run_cli

from edgekit.verify.metrics import slice_axis
from edgekit.verify.verifier import Thresholds
from edgekit.verify.verifier import verify_outputs as compare

# ---------------------------------------------------------------- verify, on arrays


def _yolo_like(rng: np.random.Generator, n: int = 16, anchors: int = 300) -> np.ndarray:
    """[n, 8, anchors]: 4 box rows in pixels (0-320), 4 sigmoid score rows, mostly background."""
    boxes = rng.uniform(0, 320, (n, 4, anchors))
    scores = 1 / (1 + np.exp(-(rng.standard_normal((n, 4, anchors)) * 2 - 3)))
    return np.concatenate([boxes, scores], axis=1)


def test_a_destroyed_score_slice_is_rejected_while_the_whole_output_passes() -> None:
    rng = np.random.default_rng(0)
    ref = _yolo_like(rng)
    out = ref + rng.standard_normal(ref.shape) * 0.3 * (np.arange(8) < 4)[None, :, None]  # boxes: ~0.3 px
    out[:, 4:] = 0.0  # what one INT8 scale of 320/255 does to 0-1 scores
    v = compare([ref], [out], ["output0"], None, Thresholds(), "int8")
    o = v.outputs[0]
    assert o.cosine > 0.999 and o.snr_db > 25 and o.centred_cosine > 0.98  # what the whole output says: fine
    assert not v.passed and o.slice_axis == 1 and len(o.slices) == 8
    assert any(f.startswith("output output0 slice ") and "(axis 1): score IoU 0.00 < 0.5" in f for f in v.failures)
    scores = o.slices[4:]
    assert all(s.score_like and s.score_iou == 0.0 and s.rank_correlation == 0.0 for s in scores)
    assert all(not s.score_like and s.failed == [] for s in o.slices[:4])  # the box rows are fine
    assert v.score_iou_min == 0.0 and v.worst_slice is not None and v.worst_slice["index"] >= 4
    assert {w["index"] for w in v.worst_slices} <= {4, 5, 6, 7} and len(v.worst_slices) == 3

    healthy = ref + rng.standard_normal(ref.shape) * np.where(np.arange(8) < 4, 0.3, 0.005)[None, :, None]
    ok = compare([ref], [healthy], ["output0"], None, Thresholds(), "int8")
    assert ok.passed, ok.failures
    assert ok.score_iou_min > 0.9 and ok.rank_correlation_min > 0.95


def test_slices_that_cannot_be_judged_are_flagged_not_passed() -> None:
    rng = np.random.default_rng(1)
    ref = _yolo_like(rng)
    ref[:, 3] = 8.0  # a constant row (a stride)
    ref[:, 7] = ref[:, 7] * 0.2  # a class never above 0.25
    v = compare([ref], [ref + 1e-6], ["y"], None, Thresholds())
    s3, s7 = v.outputs[0].slices[3], v.outputs[0].slices[7]
    assert s3.constant and s3.cosine is None and s3.snr_db is None and "not judged" in (s3.note or "")
    assert s7.score_like and s7.score_iou is None and s7.rank_correlation is not None
    assert any("slice 7 (axis 1)" in n and "score IoU not judged" in n for n in v.notes)
    assert v.passed
    # a constant slice gone wrong is still not passed on a cosine: it has none (the whole output fails here)
    bad = ref.copy()
    bad[:, 3] = 0.0
    assert compare([ref], [bad], ["y"], None, Thresholds()).outputs[0].slices[3].cosine is None


def _background(ref: np.ndarray, axis: int, scores: slice) -> np.ndarray:
    """[n, anchors]: no reference score reaches 0.25 there."""
    return np.moveaxis(ref, axis, -1)[..., scores].max(axis=-1) < 0.25


def test_boxes_are_judged_where_something_is_detected() -> None:
    """Box rows at background anchors (which a detector's score cut discards) may swing by 100 px and pass;
    40 px of noise on the anchors that are detected fails; a background anchor whose score rises past the cut
    fails the score IoU."""
    rng = np.random.default_rng(4)
    ref = _yolo_like(rng)
    back = _background(ref, 1, slice(4, 8))
    assert 0.2 < back.mean() < 0.8
    noisy = ref + rng.standard_normal(ref.shape) * 0.05 * (np.arange(8) < 4)[None, :, None]
    noisy[:, :4] += rng.standard_normal((len(ref), 4, ref.shape[2])) * 100 * back[:, None, :]
    v = compare([ref], [noisy], ["output0"], None, Thresholds(), "int8")
    assert v.passed, v.failures
    assert any("slices 0-3 (axis 1, not score-like) judged only at the" in n for n in v.notes), v.notes
    everywhere = compare([ref[:, :4]], [noisy[:, :4]], ["boxes_alone"], None, Thresholds(), "int8")
    assert not everywhere.passed  # the same boxes judged at every anchor: what rejected YOLOv8n's INT8

    wrong = ref.copy()
    wrong[:, 2] += rng.standard_normal(back.shape) * 40.0 * ~back  # 40 px on one coordinate of detected boxes
    v = compare([ref], [wrong], ["output0"], None, Thresholds(), "int8")
    assert not v.passed and any("slice 2 (axis 1)" in f for f in v.failures), v.failures

    ghosts = ref.copy()
    ghosts[:, 5] = np.where(back, 0.9, ghosts[:, 5])  # background anchors now detected as class 1
    v = compare([ref], [ghosts], ["output0"], None, Thresholds(), "int8")
    assert not v.passed and any("slice 5 (axis 1): score IoU" in f for f in v.failures), v.failures


def test_separate_box_outputs_are_judged_where_the_score_output_detects() -> None:
    """SSD / PicoDet layout: scores [n, anchors, classes] (softmax) and boxes [n, anchors, 4] in two outputs."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((16, 400, 6)) * 2
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    boxes = rng.uniform(0, 320, (16, 400, 4))
    back = scores.max(-1) < 0.25
    assert 0.0 < back.mean() < 0.5
    swung = boxes + rng.standard_normal(boxes.shape) * 100 * back[..., None]
    v = compare([scores, boxes], [scores, swung], ["scores", "boxes"], None, Thresholds(), "int8")
    assert v.passed, v.failures
    assert any(n.startswith("output boxes: its values (box-like, beside a score output) judged only") for n in v.notes)
    wrong = boxes + rng.standard_normal(boxes.shape) * 40.0 * ~back[..., None]
    v = compare([scores, boxes], [scores, wrong], ["scores", "boxes"], None, Thresholds(), "int8")
    assert not v.passed and any("output boxes" in f for f in v.failures), v.failures


def test_fp16_slices_are_held_to_the_base_thresholds_and_its_whole_outputs_to_fp16s() -> None:
    """Rounding noise that leaves one slice at a mean-centred cosine near 0.998 (PP-PicoDet's DFL bins in FP16)
    passes FP16; the same slice wiped out fails it; noise that takes the whole output below 0.999 fails it."""
    rng = np.random.default_rng(6)
    ref = _yolo_like(rng)
    out = ref.copy()
    spread = float(ref[:, 5].std())
    out[:, 5] += rng.standard_normal(out[:, 5].shape) * 0.06 * spread
    v = compare([ref], [out], ["output0"], None, Thresholds(), "fp16")
    s5 = v.outputs[0].slices[5]
    assert 0.99 < s5.centred_cosine < 0.999 and v.cosine_min > 0.999, (s5.centred_cosine, v.cosine_min)
    assert v.passed, v.failures
    wiped = ref.copy()
    wiped[:, 5] = 0.0
    assert not compare([ref], [wiped], ["output0"], None, Thresholds(), "fp16").passed
    noisy = ref + rng.standard_normal(ref.shape) * 0.06 * float(ref.std())
    v = compare([ref], [noisy], ["output0"], None, Thresholds(), "fp16")
    assert not v.passed and any(f.startswith("cosine ") and "< 0.999" in f for f in v.failures), v.failures


def test_which_outputs_are_sliced() -> None:
    assert slice_axis((1, 8, 2100)) == 1 and slice_axis((1, 3549, 6)) == 2 and slice_axis((5, 3, 12, 12)) == 1
    assert slice_axis((1, 100, 4)) == 2
    # classifiers, feature maps without one short axis, tiny outputs: judged as a whole only
    for shape in ((16, 1000), (8, 4, 1, 1), (1, 64, 8, 8), (1, 16, 32, 32), (40, 4, 4), (8, 3, 4, 4)):
        assert slice_axis(shape) is None, shape
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((32, 10))
    v = compare([ref], [ref + 0.01 * rng.standard_normal(ref.shape)], ["logits"], None, Thresholds())
    assert v.outputs[0].slices == [] and v.worst_slices == [] and v.worst_slice is None and v.passed
    json_safe = v.to_dict()
    assert json_safe["outputs"][0]["slice_axis"] is None


def test_healthy_int8_noise_on_a_score_map_passes() -> None:
    """Sliced per class, [N, C, H, W] sigmoid maps with INT8-sized noise (and 8-bit output levels, ties)
    must not start being rejected."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((32, 3, 24, 24)) * 2 - 1
    ref = 1 / (1 + np.exp(-logits))
    out = 1 / (1 + np.exp(-(logits + rng.standard_normal(logits.shape) * 0.05)))
    out = np.round(out * 255) / 255
    v = compare([ref], [out], ["scores"], None, Thresholds(), "int8")
    assert v.outputs[0].slice_axis == 1 and v.passed, v.failures


# ---------------------------------------------------------------- the head, from the graph


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The YOLO-style model (tests/models.py) and its data: scenes with bright rectangles."""
    from models import detector_images, export_yolo, yolo_style

    root = tmp_path_factory.mktemp("yolo")
    model = export_yolo(yolo_style(), root / "yolo.onnx")
    np.savez(root / "calib.npz", images=detector_images(64, seed=10))
    np.savez(root / "val.npz", images=detector_images(48, seed=20))
    return {"model": model, "calib": root / "calib.npz", "val": root / "val.npz", "root": root}


def test_head_is_found_from_the_graph(yolo: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    from edgekit.ingest import ingest
    from edgekit.quantize.detection_head import WEIGHTED_OPS, detector_head, head_nodes, looks_like_detector

    spec = ingest(str(yolo["model"]), tmp_path / "spec")
    assert "output output0 [1, 8, 336]" in (looks_like_detector(spec) or "")
    _, nodes = detector_head(spec) or ("", [])
    model = spec.load()
    by_name = {n.name: n for n in model.graph.node}
    weighted = [n for n in nodes if by_name[n].op_type in WEIGHTED_OPS]
    # the last conv of each branch at each of the 3 levels, and the distribution-focal conv after the softmax
    assert len(weighted) == 7 and all(by_name[n].op_type == "Conv" for n in weighted)
    assert {"Softmax", "Sigmoid", "Concat", "Split"} <= {by_name[n].op_type for n in nodes}
    output_producer = next(n.name for n in model.graph.node if "output0" in n.output)
    assert output_producer in nodes
    # nothing of the backbone: the convs that feed the head's last convs are not in it
    feeding = {p.name for n in weighted for p in model.graph.node
               if set(p.output) & set(by_name[n].input) and p.op_type != "Softmax"}
    assert feeding and not feeding & set(nodes)
    assert head_nodes(onnx.load(str(yolo["model"])))  # any ONNX model, canonical or not

    from models import export_detector, tiny_detector

    two = ingest(str(export_detector(tiny_detector(), tmp_path / "det.onnx", opset=12)), tmp_path / "det",
                 {"images": [1, 3, 96, 96]})
    assert "outputs boxes" in (looks_like_detector(two) or "")
    from conftest import BUNDLED_ONNX

    assert looks_like_detector(ingest(str(BUNDLED_ONNX), tmp_path / "cls")) is None


def test_openvino_drops_automatic_head_nodes_it_fused_but_not_named_ones(yolo: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    import openvino as ov
    from conftest import BUNDLED_ONNX

    from edgekit.backends.openvino import _ignored_ops
    from edgekit.errors import EdgekitError
    from edgekit.ingest import ingest

    spec = ingest(str(yolo["model"]), tmp_path / "spec")
    other = ov.convert_model(str(BUNDLED_ONNX))  # an IR that has none of this model's ops
    node = next(n.name for n in spec.load().graph.node if n.op_type == "Reshape")
    ops, fused = _ignored_ops(spec, other, [node], automatic={node})
    assert ops == [] and fused == [node]
    with pytest.raises(EdgekitError, match="no op in the converted IR"):
        _ignored_ops(spec, other, [node])


# ---------------------------------------------------------------- through the real command


def _score_slices(artifact: dict) -> list[dict]:
    return [s for o in artifact["verification"]["outputs"] for s in o.get("slices") or [] if s["score_like"]]


def test_uniform_int8_is_rejected_by_its_score_slices(yolo: dict[str, Path]) -> None:
    """The issue's table, on the tests' model: head quantized too, ONNX Runtime INT8's whole-output figures
    pass (cosine ~0.9993, SNR ~28 dB) while its score rows are gone. The slice check rejects it."""
    out = yolo["root"] / "uniform"
    r = run_cli("build", yolo["model"], "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "int8",
                "--calib", yolo["calib"], "--val", yolo["val"], "--out", out, "--no-detector-head", "--recover", "none",
                *FAST)
    assert r.code == 1, r.stderr
    m = read_manifest(out.with_name("uniform.rejected"))
    (a,) = m["artifacts"]
    v = a["verification"]
    assert not v["passed"] and v["cosine_min"] > 0.99 and v["snr_db_min"] > 15  # the whole output: "fine"
    assert any(f.startswith("output output0 slice ") and "(axis 1): score IoU 0.00 < 0.5" in f for f in v["failures"])
    assert all(s["score_iou"] == 0.0 and "score_iou" in s["failed"] for s in _score_slices(a))
    assert len(_score_slices(a)) == 4 and v["worst_slice"]["index"] >= 4
    assert not any("detector head kept in float" in n for n in a["notes"])
    # the second attempt (7-bit weights) cannot fix a shared output scale either
    assert "passed" not in " ".join(a["notes"])


def test_head_in_float_passes_on_every_backend(yolo: dict[str, Path]) -> None:
    """The default INT8 recipe for a detector keeps the head in float: ONNX Runtime, OpenVINO and NCNN INT8
    verify honestly, score slices included; the manifest says which nodes stayed in float and why."""
    out = yolo["root"] / "head"
    r = run_cli("build", yolo["model"], "--target", "host-cpu", "--backend", "onnxruntime,openvino,ncnn",
                "--precision", "int8", "--calib", yolo["calib"], "--val", yolo["val"], "--out", out, *FAST)
    assert r.code == 0, r.stderr + r.stdout
    assert "weak proxy for mAP" in r.stderr + r.stdout
    m = read_manifest(out)
    assert any("weak proxy for mAP" in w for w in m["data"]["warnings"])
    assert {a["key"] for a in m["artifacts"]} == {"onnxruntime-int8", "openvino-int8", "ncnn-int8"}
    for a in m["artifacts"]:
        v = a["verification"]
        assert v["passed"], (a["key"], v["failures"])
        scores = _score_slices(a)
        assert len(scores) == 4 and all(s["score_iou"] >= 0.8 and s["rank_correlation"] >= 0.98 for s in scores)
        assert any(n.startswith("detector head kept in float (") for n in a["notes"]), a["notes"]
    ort = next(a for a in m["artifacts"] if a["key"] == "onnxruntime-int8")
    assert len(ort["details"]["excluded_nodes"]) >= 20  # the decode ops too: ONNX Runtime quantizes those
    ncnn = next(a for a in m["artifacts"] if a["key"] == "ncnn-int8")
    assert len(ncnn["details"]["kept_float"]) == 7  # ncnn's INT8 quantizes weighted layers only: those 7
    report = (out / "report.md").read_text()
    assert "worst slice output0 slice" in report and "weak proxy for mAP" in report
    html = (out / "report.html").read_text()
    assert "Worst output slices" in html and "score IoU" in html


def test_planner_never_packages_an_artifact_whose_scores_failed(yolo: dict[str, Path]) -> None:
    """`build` without --precision plans first. With the head quantized too (the old default), ONNX
    Runtime INT8 detects nothing: it must be rejected (its mixed-precision search keeps convs in float,
    which cannot fix the shared output scale), never chosen; what is packaged passes, scores included."""
    out = yolo["root"] / "planned"
    r = run_cli("build", yolo["model"], "--target", "host-cpu", "--backend", "onnxruntime", "--calib", yolo["calib"],
                "--val", yolo["val"], "--out", out, "--no-detector-head", "--recover", "none", *FAST)
    assert r.code == 0, r.stderr + r.stdout
    m = read_manifest(out)
    (chosen,) = m["artifacts"]
    assert chosen["verification"]["passed"]
    assert all(s["score_iou"] >= 0.5 for s in _score_slices(chosen))
    cands = {c["key"]: c for c in m["candidates"]}
    ort = cands["onnxruntime-int8"]
    assert ort["verdict"] == "rejected" and "score IoU" in ort["reason"] and not ort["chosen"]
    picked = next(c for c in m["candidates"] if c["chosen"])
    assert picked["verdict"] == "ok" and picked["key"] == chosen["key"]


def _recogniser_like(rng: np.random.Generator, n: int = 12, steps: int = 40, classes: int = 2000) -> np.ndarray:
    """[n, steps, classes]: a text recogniser's per-step softmax (PP-OCR rec: [1, 40, 6625]), one sharp peak
    and one runner-up per step, tails far below 1e-6."""
    logits = rng.standard_normal((n, steps, classes)) * 2.0
    rows, cols = np.arange(n)[:, None], np.arange(steps)[None, :]
    logits[rows, cols, rng.integers(0, classes, (n, steps))] += 21.0
    logits[rows, cols, rng.integers(0, classes, (n, steps))] += 17.0  # a runner-up near 1e-2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_rank_order_is_judged_only_where_a_score_can_decide_something() -> None:
    """FP16 stores a softmax's 1e-7 tails with a few significant bits: their order among themselves is
    rounding, and judging it rejected a faithful FP16 text recogniser. Scores that matter still are judged."""
    from edgekit.verify.metrics import RANK_FLOOR, _spearman

    rng = np.random.default_rng(3)
    ref = _recogniser_like(rng)
    fp16 = ref.astype(np.float16).astype(np.float32)
    v = compare([ref], [fp16], ["probs"], None, Thresholds(), "fp16")
    o = v.outputs[0]
    assert o.slice_axis == 1 and len(o.slices) == 40 and all(s.score_like for s in o.slices)
    whole_order = _spearman(ref[:, 5].ravel(), fp16[:, 5].ravel())  # what was judged before: every value
    assert whole_order < 0.9, whole_order
    assert v.passed, v.failures
    assert v.rank_correlation_min is not None and v.rank_correlation_min > Thresholds().min_rank_correlation
    assert (ref >= RANK_FLOOR).sum() >= 40 * 12  # the peaks at least are ranked: the figure is not empty

    # The artifact puts its mass on the wrong class in half the steps: the ranked values include both peaks.
    wrong = fp16.copy()
    for t in range(0, 40, 2):
        top = wrong[:, t].argmax(-1)
        wrong[np.arange(len(wrong)), t, top] = 1e-4
        wrong[np.arange(len(wrong)), t, (top + 7) % wrong.shape[-1]] = 0.99
    bad = compare([ref], [wrong], ["probs"], None, Thresholds(), "fp16")
    assert not bad.passed
    assert any("rank correlation" in f for f in bad.failures), bad.failures


def test_a_slice_with_too_few_live_scores_has_no_rank_figure() -> None:
    ref = np.full((4, 8, 64), 1e-5, np.float32)
    ref[:, :, 0] = 0.5  # one live score per row and step: 4 per slice, fewer than RANK_MIN_VALUES
    v = compare([ref], [ref * 1.001], ["p"], None, Thresholds())
    s = v.outputs[0].slices[0]
    assert s.rank_correlation is None and "rank correlation not judged" in (s.note or "")


def test_a_softmax_over_positions_is_not_taken_for_a_detector(tmp_path: Path) -> None:
    """PP-OCRv4's recogniser ends Softmax -> Reshape in [1, 40, 6625]: by shape alone a detector's 40 values for
    6,625 anchors. A class distribution is no detection head; the same shape from a Concat still is one."""
    import onnx
    from onnx import TensorProto, helper

    from edgekit.ingest import ingest
    from edgekit.quantize.detection_head import looks_like_detector

    def model(last: str) -> Path:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40, 600])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, 600])
        shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 40, 600])
        if last == "softmax":
            nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1),
                     helper.make_node("Reshape", ["p", "shape"], ["y"])]
        else:
            nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Concat", ["s"], ["c"], axis=1),
                     helper.make_node("Reshape", ["c", "shape"], ["y"])]
        graph = helper.make_graph(nodes, last, [x], [y], [shape])
        path = tmp_path / f"{last}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    assert looks_like_detector(ingest(str(model("softmax")), tmp_path / "a")) is None
    assert "40 values per anchor" in (looks_like_detector(ingest(str(model("concat")), tmp_path / "b")) or "")
