"""`edgekit build --task segment`: mIoU against class-index masks beside the images, or against the FP32 model's
own per-pixel classes without them; a mask the model's classes cannot hold is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgekit import api
from edgekit.errors import BadInput

FAST = {"profile_seconds": 0.2, "min_runs": 10, "memory": False}
SIZE, CLASSES = 32, 4


def _segmenter(path: Path) -> Path:
    """[1, 3, 32, 32] -> [1, 4, 32, 32] class scores: two 3x3 convs, fixed seeded weights."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.5, (CLASSES, 8, 3, 3))
    nodes = [helper.make_node("Conv", ["images", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["scores"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                           [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, CLASSES, SIZE, SIZE])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seg")
    model = _segmenter(root / "seg.onnx")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for split, n in (("calib", 24), ("val", 24)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(n):
            # smooth blobs, so the classes form regions as a segmenter's do
            small = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
            im = Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC)
            im.save(root / split / "images" / f"{i:03d}.png")
            x = np.asarray(im, np.float32).transpose(2, 0, 1)[None] / 255
            (scores,) = session.run(None, {"images": x})
            # the FP32 model's own classes as the labels: its mIoU against them is exactly 100
            mask = Image.fromarray(scores[0].argmax(0).astype(np.uint8), mode="L")
            mask.save(root / split / "masks" / f"{i:03d}.png")
    return {"root": root, "model": model}


def test_miou_against_masks(seg: dict[str, Path], tmp_path: Path) -> None:
    m = api.build(seg["model"], "host-cpu", precision="fp32,int8", backend="onnxruntime",
                  calib=str(seg["root"] / "calib"), val=str(seg["root"] / "val"), task="segment",
                  out=str(tmp_path / "pkg"), max_metric_drop=99.0, **FAST)
    assert m["data"]["task"]["task"] == "segment" and m["data"]["task"]["vs"] == "labels"
    for a in m["artifacts"]:
        t = a["verification"]["task"]
        assert t["metric"] == "mIoU" and t["reference"] == pytest.approx(100.0) and t["samples"] == 24
        assert len(t["per_class"]) >= 2 and all(c["reference"] == pytest.approx(100.0) for c in t["per_class"])
    fp32, int8 = (m.artifact(k)["verification"]["task"] for k in ("onnxruntime-fp32", "onnxruntime-int8"))
    assert fp32["value"] == pytest.approx(100.0)
    assert 0 < int8["value"] < 100.0  # INT8 moves some pixels' class: the metric sees it


def test_without_masks_fp32_is_the_reference(seg: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images-only"
    images.mkdir()
    for f in sorted((seg["root"] / "val" / "images").iterdir()):
        (images / f.name).write_bytes(f.read_bytes())
    m = api.build(seg["model"], "host-cpu", precision="int8", backend="onnxruntime", calib=str(seg["root"] / "calib"),
                  val=str(images), task="segment", out=str(tmp_path / "pkg"), max_metric_drop=99.0, **FAST)
    t = m["artifacts"][0]["verification"]["task"]
    assert t["vs"] == "fp32" and t["reference"] == pytest.approx(100.0) and t["value"] < 100.0


def test_a_mask_class_the_model_lacks_is_refused(seg: dict[str, Path], tmp_path: Path) -> None:
    val = tmp_path / "val"
    (val / "images").mkdir(parents=True)
    (val / "masks").mkdir()
    for f in sorted((seg["root"] / "val" / "images").iterdir())[:4]:
        (val / "images" / f.name).write_bytes(f.read_bytes())
        Image.fromarray(np.full((SIZE, SIZE), 9, np.uint8), mode="L").save(val / "masks" / f.name)
    with pytest.raises(BadInput, match="masks hold class 9"):
        api.build(seg["model"], "host-cpu", precision="fp32", backend="onnxruntime", calib=str(seg["root"] / "calib"),
                  val=str(val), task="segment", out=str(tmp_path / "pkg"), **FAST)
