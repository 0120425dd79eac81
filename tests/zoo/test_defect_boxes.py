"""The defect-detection data generator (edgekit.zoo.defect_boxes) and the shipped DefectDet ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from edgekit.errors import BadInput
from edgekit.zoo.defect_boxes import (
    _MIN_BOX,
    CLASSES,
    _image_rng,
    _scene,
    generate,
    main,
    make_detection_arrays,
    yolo_lines,
)

REPO = Path(__file__).resolve().parents[2]
DETECT = REPO / "examples" / "detect"
SIZE = 160
VAL_SEED = 2  # generate()'s val split for seed 0


def test_generator_is_deterministic_and_seeded() -> None:
    a, boxes_a = make_detection_arrays(6, seed=3)
    b, boxes_b = make_detection_arrays(6, seed=3)
    assert a.shape == (6, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert all(np.array_equal(x, y) for x, y in zip(boxes_a, boxes_b))
    # Each image has its own stream: image 4 alone equals image 4 of the batch; another seed differs.
    assert _scene(_image_rng(3, 4), SIZE)[0].tobytes() == a[4].tobytes()
    assert make_detection_arrays(6, seed=4)[0].tobytes() != a.tobytes()


def test_boxes_surround_the_drawn_defects() -> None:
    n_boxes = 0
    for i in range(40):
        img, boxes = _scene(_image_rng(VAL_SEED, i), SIZE)
        clean, same = _scene(_image_rng(VAL_SEED, i), SIZE, with_defects=False)
        assert np.array_equal(boxes, same)
        # Same random stream with and without the defects: the difference is the defects alone.
        diff = np.abs(img.astype(np.int16) - clean.astype(np.int16)).max(-1)
        changed = np.zeros_like(diff, dtype=bool)
        for cls, x1, y1, x2, y2 in boxes:
            assert int(cls) in range(len(CLASSES)) and cls == int(cls)
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            assert x2 - x1 >= _MIN_BOX - 1e-9 and y2 - y1 >= _MIN_BOX - 1e-9
            c0, r0, c1, r1 = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
            inside = diff[r0:r1, c0:c1]
            assert inside.max() >= 10, (i, cls, inside.max())
            changed[r0:r1, c0:c1] = True
            if x2 - x1 > _MIN_BOX + 1e-6 and y2 - y1 > _MIN_BOX + 1e-6:  # tight: the defect touches every side
                sides = (inside[:, 0], inside[:, -1], inside[0, :], inside[-1, :])
                assert min(int(s.max()) for s in sides) >= 3, (i, cls, [int(s.max()) for s in sides])
            n_boxes += 1
        if not len(boxes):
            assert diff.max() == 0  # a true negative is the bare texture
        # Far from every box (4 px margin) the surface is untouched but for the soft tails of big spots (< 2 %).
        grown = np.zeros_like(changed)
        for _, x1, y1, x2, y2 in boxes:
            grown[max(0, int(y1) - 4) : int(np.ceil(y2)) + 4, max(0, int(x1) - 4) : int(np.ceil(x2)) + 4] = True
        assert diff[~grown].max(initial=0) <= 5, i
    assert n_boxes >= 40


def test_counts_classes_sizes_and_negatives() -> None:
    _, boxes = make_detection_arrays(200, seed=VAL_SEED)
    counts = np.array([len(b) for b in boxes])
    assert counts.min() == 0 and counts.max() == 4
    assert 0.07 <= (counts == 0).mean() <= 0.25  # true negatives, about 15 %
    allb = np.concatenate(boxes)
    per_class = np.bincount(allb[:, 0].astype(int), minlength=3)
    assert per_class.min() >= 0.25 * len(allb), per_class
    side = np.maximum(allb[:, 3] - allb[:, 1], allb[:, 4] - allb[:, 2])
    assert (side <= 12).mean() >= 0.1 and side.max() >= 60  # small ones and large ones


def test_yolo_label_lines() -> None:
    text = yolo_lines(np.array([[2, 10.0, 20.0, 30.0, 60.0], [0, 0.0, 0.0, 160.0, 4.0]]), SIZE)
    assert text == "2 0.125000 0.250000 0.125000 0.250000\n0 0.500000 0.012500 1.000000 0.025000\n"
    assert yolo_lines(np.zeros((0, 5)), SIZE) == ""


def test_cli_writes_ultralytics_layout_and_skips_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "boxes"
    assert main([str(out), "--train", "5", "--calib", "2", "--val", "3"]) == 0
    first = capsys.readouterr().out
    assert "train" in first and "boxes" in first and "wrote" in first
    for split, n in (("train", 5), ("calib", 2), ("val", 3)):
        assert len(list((out / split / "images").glob("*.png"))) == n
        assert len(list((out / split / "labels").glob("*.txt"))) == n
    assert (out / "classes.txt").read_text().split() == list(CLASSES)
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(CLASSES)) and data["train"] == "train/images"
    assert data["val"] == "val/images" and data["nc"] == 3
    # The val files are make_detection_arrays(3, seed=2): PNG is lossless, labels are the boxes normalised.
    images, boxes = make_detection_arrays(3, seed=VAL_SEED)
    for i in range(3):
        png = np.asarray(Image.open(out / "val" / "images" / f"{i:05d}.png"))
        assert png.tobytes() == images[i].tobytes()
        rows = [r.split() for r in (out / "val" / "labels" / f"{i:05d}.txt").read_text().splitlines()]
        assert len(rows) == len(boxes[i])
        for r in rows:
            assert len(r) == 5 and all(len(v.split(".")[1]) == 6 for v in r[1:])
            assert all(0.0 <= float(v) <= 1.0 for v in r[1:])
    stamp = (out / ".complete").stat().st_mtime_ns
    png_time = (out / "train" / "images" / "00000.png").stat().st_mtime_ns
    assert main([str(out), "--train", "5", "--calib", "2", "--val", "3"]) == 0
    assert (out / ".complete").stat().st_mtime_ns == stamp
    assert (out / "train" / "images" / "00000.png").stat().st_mtime_ns == png_time
    # Other arguments regenerate, and leftovers of the old configuration go.
    generate(out, 2, 1, 1)
    assert len(list((out / "train" / "images").glob("*.png"))) == 2
    assert len(list((out / "train" / "labels").glob("*.txt"))) == 2


def test_bad_size_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="multiple of 32"):
        make_detection_arrays(1, 0, size=100)
    assert main([str(tmp_path / "x"), "--size", "100"]) == 2


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / ((box[2] - box[0]) * (box[3] - box[1]) + area - inter)


def test_shipped_detector_finds_the_labelled_defects() -> None:
    cfg = yaml.safe_load((DETECT / "preprocess.yaml").read_text())
    assert cfg["size"] == [SIZE, SIZE]
    sess = ort.InferenceSession(str(DETECT / "defectdet.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "images" and inp.shape == [1, 3, SIZE, SIZE]
    anchors = sum((SIZE // s) ** 2 for s in (8, 16, 32))
    assert out.name == "output0" and out.shape == [1, 4 + len(CLASSES), anchors]
    images, boxes = make_detection_arrays(16, seed=VAL_SEED)
    best, empty_peak = [], []
    for img, gt in zip(images, boxes):
        x = (img.astype(np.float32) * np.float32(cfg["scale"])).transpose(2, 0, 1)[None]
        y = sess.run(["output0"], {"images": x})[0][0]
        assert y.shape == (7, anchors) and y[4:].min() >= 0.0 and y[4:].max() <= 1.0
        xyxy = np.concatenate([y[:2] - y[2:4] / 2, y[:2] + y[2:4] / 2]).T  # cx, cy, w, h pixels -> xyxy
        if not len(gt):
            empty_peak.append(float(y[4:].max()))
        for cls, *box in gt:
            confident = y[4 + int(cls)] >= 0.25
            best.append(float(_iou(np.asarray(box), xyxy[confident]).max(initial=0.0)))
    assert len(best) >= 15
    assert np.mean(best) > 0.5, best
    assert not empty_peak or np.median(empty_peak) < 0.5, empty_peak  # negatives mostly stay quiet
