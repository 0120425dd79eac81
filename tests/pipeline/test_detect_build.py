"""`edgekit build --task detect` on the bundled defect detector and its generated labelled data: mAP decides,
the manifest records it, and edgekit's mAP equals pycocotools run by hand on predictions decoded by hand."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgekit import api

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "examples" / "detect" / "defectdet.onnx"
PRE = REPO / "examples" / "detect" / "preprocess.yaml"
FAST = {"profile_seconds": 0.2, "min_runs": 10, "memory": False}


@pytest.fixture(scope="module")
def boxes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("boxes")
    subprocess.run([sys.executable, "-m", "edgekit.zoo.defect_boxes", str(root), "--train", "0", "--calib", "64",
                    "--val", "64"], check=True, cwd=REPO, capture_output=True)
    return root


@pytest.fixture(scope="module")
def built(boxes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> api.Manifest:
    out = tmp_path_factory.mktemp("pkg") / "det"
    return api.build(MODEL, "host-cpu", precision="fp32,int8", backend="onnxruntime", calib=str(boxes_data / "calib"),
                     val=str(boxes_data / "val"), preprocess=str(PRE), task="detect", out=str(out), force=True,
                     **FAST)


def test_map_decides_and_is_recorded(built: api.Manifest) -> None:
    assert built.exit_code == 0
    m = built
    assert m["data"]["task"]["task"] == "detect" and m["data"]["task"]["decoder"] == "yolov8"  # guessed
    assert m["data"]["task"]["vs"] == "labels"
    for a in m["artifacts"]:
        t = a["verification"]["task"]
        assert t["metric"] == "mAP50-95" and t["vs"] == "labels" and t["samples"] == 64
        assert t["reference"] > 30  # a trained detector: the metric can fail
        assert abs(t["drop_points"] - (t["reference"] - t["value"])) < 1e-3 and t["passed"] == (t["drop_points"] <= 1)
        assert {c["name"] for c in t["per_class"]} <= {"crack", "scratch", "spot"} and len(t["per_class"]) == 3
        assert t["examples"] and all((built.path / ex["image"]).is_file() for ex in t["examples"])
    fp32 = built.artifact("onnxruntime-fp32")["verification"]["task"]
    assert fp32["drop_points"] == 0 and fp32["value"] == fp32["reference"]


def _decode_by_hand(out: np.ndarray, conf: float, iou: float) -> list[tuple[list[float], float, int]]:
    """[4 + nc, A] -> boxes after a brute-force per-class NMS (no edgekit code)."""
    xywh, scores = out[:4].T, out[4:].T
    cls, score = scores.argmax(1), scores.max(1)
    keep = score > conf
    xyxy = np.c_[xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2][keep]
    cls, score = cls[keep], score[keep]
    found = []
    for c in np.unique(cls):
        idx = list(np.flatnonzero(cls == c)[np.argsort(-score[cls == c], kind="stable")])
        while idx:
            i = idx.pop(0)
            found.append((xyxy[i].tolist(), float(score[i]), int(c)))
            rest = []
            for j in idx:
                x1, y1 = np.maximum(xyxy[i, :2], xyxy[j, :2])
                x2, y2 = np.minimum(xyxy[i, 2:], xyxy[j, 2:])
                inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
                union = np.prod(xyxy[i, 2:] - xyxy[i, :2]) + np.prod(xyxy[j, 2:] - xyxy[j, :2]) - inter
                if inter / union <= iou:
                    rest.append(j)
            idx = rest
    return sorted(found, key=lambda f: -f[1])[:300]


def test_map_equals_pycocotools_run_by_hand(built: api.Manifest, boxes_data: Path, tmp_path: Path) -> None:
    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    images, annotations, results = [], [], []
    names = (boxes_data / "classes.txt").read_text().split()
    for i, f in enumerate(sorted((boxes_data / "val" / "images").iterdir())):
        im = np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0  # 160 x 160: stretch is the identity
        h, w = im.shape[:2]
        images.append({"id": i, "width": w, "height": h, "file_name": f.name})
        for line in (boxes_data / "val" / "labels" / f"{f.stem}.txt").read_text().splitlines():
            c, cx, cy, bw, bh = (float(v) for v in line.split())
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c) + 1,
                                "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h],
                                "area": bw * w * bh * h, "iscrowd": 0})
        (out,) = session.run(None, {session.get_inputs()[0].name: im.transpose(2, 0, 1)[None]})
        for xyxy, s, c in _decode_by_hand(out[0], 0.001, 0.7):
            x1, y1, x2, y2 = np.clip(xyxy, 0, [w, h, w, h])
            results.append({"image_id": i, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}))
    dt_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(dt_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    t = built.artifact("onnxruntime-fp32")["verification"]["task"]
    assert t["reference"] == pytest.approx(ev.stats[0] * 100, abs=1e-3)
    assert t["reference_map50"] == pytest.approx(ev.stats[1] * 100, abs=1e-3)


def test_without_labels_fp32_boxes_are_the_reference(boxes_data: Path, tmp_path: Path) -> None:
    images = tmp_path / "unlabelled"
    images.mkdir()
    for f in sorted((boxes_data / "val" / "images").iterdir())[:32]:
        (images / f.name).write_bytes(f.read_bytes())
    m = api.build(MODEL, "host-cpu", precision="fp32", backend="onnxruntime", calib=str(boxes_data / "calib"),
                  val=str(images), preprocess=str(PRE), task="detect", out=str(tmp_path / "pkg"), **FAST)
    t = m["artifacts"][0]["verification"]["task"]
    assert t["vs"] == "fp32" and t["reference"] == pytest.approx(100.0) and t["value"] == pytest.approx(100.0)
    assert any("FP32 model's detections" in n for n in m["data"]["task"]["notes"])


def test_uniform_int8_of_the_whole_head_is_judged_by_map(boxes_data: Path, tmp_path: Path) -> None:
    """Head quantized too and no recovery: the verdict is the mAP drop, whatever the tensor figures say."""
    r = api.build(MODEL, "host-cpu", precision="int8", backend="onnxruntime", calib=str(boxes_data / "calib"),
                  val=str(boxes_data / "val"), preprocess=str(PRE), task="detect", detector_head=False,
                  recover="none", out=str(tmp_path / "uni"), **FAST)
    v = r["artifacts"][0]["verification"]
    t = v["task"]
    assert v["passed"] == (t["drop_points"] <= 1.0)
    if not v["passed"]:
        assert v["failures"][0].startswith("mAP50-95") and "points below FP32" in v["failures"][0]
