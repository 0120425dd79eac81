"""Decoders: synthetic outputs encoded from known boxes the way each format does, decoded, NMS'd, compared."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import BadInput
from edgekit.tasks.decoders import decoder_notes, get_decoder, guess_decoder
from edgekit.tasks.nms import nms

# Known boxes in model-input pixels: (cx, cy, w, h, class, score), two images.
TRUE = [
    [(100.0, 80.0, 60.0, 40.0, 2, 0.91), (300.5, 200.25, 120.0, 90.0, 0, 0.83), (50.0, 250.0, 30.0, 60.0, 1, 0.67)],
    [(200.0, 150.0, 80.0, 80.0, 1, 0.77)],
]
NC = 3
HW = (320, 416)  # not square, so a swapped x/y in the grid shows


def _xyxy(cx: float, cy: float, w: float, h: float) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _expected(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = sorted(TRUE[i], key=lambda r: -r[5])
    return (np.array([_xyxy(*r[:4]) for r in rows]), np.array([r[4] for r in rows]), np.array([r[5] for r in rows]))


def _check(boxes: list, images: int = 2) -> None:
    assert len(boxes) == images
    for i in range(images):
        kept = nms(boxes[i], iou=0.5, conf=0.25)
        xyxy, cls, scores = _expected(i)
        np.testing.assert_allclose(kept.xyxy, xyxy, atol=1e-4)
        np.testing.assert_array_equal(kept.classes, cls)
        np.testing.assert_allclose(kept.scores, scores, atol=1e-4)


def _anchor_rows(rng: np.random.Generator, anchors: int, per_box: list[int]) -> list[list[int]]:
    """Distinct anchor indices: for each true box, the anchor that carries it, then 3 duplicates."""
    idx = rng.permutation(anchors)[: 4 * sum(per_box)].reshape(-1, 4)
    return [list(r) for r in idx]


def _ultralytics(rng: np.random.Generator, anchors: int, with_obj: bool) -> np.ndarray:
    """[N, A, 4 (+1) + nc] like an exported YOLOv8 (transposed) or YOLOv5: cxcywh in pixels, sigmoided scores.
    Each true box sits on one anchor, with 3 weaker, slightly moved copies NMS must remove; the rest is
    background with scores under the 0.25 threshold."""
    extra = 1 if with_obj else 0
    out = np.zeros((2, anchors, 4 + extra + NC))
    out[..., :2] = rng.uniform(0, 300, (2, anchors, 2))
    out[..., 2:4] = rng.uniform(5, 50, (2, anchors, 2))
    out[..., 4:] = rng.uniform(0, 0.2, (2, anchors, extra + NC))
    for i, boxes in enumerate(TRUE):
        for (cx, cy, w, h, c, s), rows in zip(boxes, _anchor_rows(rng, anchors, [1] * len(boxes))):
            for k, a in enumerate(rows):
                score = s if k == 0 else s - 0.05 * k
                out[i, a, :4] = [cx + 2 * k, cy - k, w, h]
                out[i, a, 4:] = 0.1
                if with_obj:
                    out[i, a, 4] = 0.95
                    out[i, a, 5 + c] = score / 0.95
                else:
                    out[i, a, 4 + c] = score
    return out


def test_yolov8_both_layouts() -> None:
    out = _ultralytics(np.random.default_rng(0), 2100, with_obj=False)
    decode = get_decoder("yolov8")
    _check(decode([out.transpose(0, 2, 1).astype(np.float32)], HW))  # [N, 4 + nc, A], the export's own
    _check(decode([out], HW))  # [N, A, 4 + nc]
    assert decoder_notes() == []  # probabilities already: no sigmoid


def test_yolov5() -> None:
    out = _ultralytics(np.random.default_rng(1), 6300, with_obj=True)
    boxes = get_decoder("yolov5")([out], HW)
    assert len(boxes[0]) == 6300
    _check(boxes)


def _yolox_index(cx: float, cy: float, stride: int) -> tuple[int, float, float]:
    """The anchor of the cell holding the centre at `stride`, counted as YOLOX lays them out, by hand."""
    h, w = HW
    offset = sum((h // s) * (w // s) for s in (8, 16, 32) if s < stride)
    gx, gy = int(cx // stride), int(cy // stride)
    return offset + gy * (w // stride) + gx, gx, gy


def _yolox_output(rng: np.random.Generator, logits: bool = False) -> np.ndarray:
    h, w = HW
    anchors = sum((h // s) * (w // s) for s in (8, 16, 32))
    out = np.zeros((2, anchors, 5 + NC))
    out[..., :2] = rng.uniform(0, 1, (2, anchors, 2))
    out[..., 2:4] = rng.uniform(-1, 1, (2, anchors, 2))
    out[..., 4:] = rng.uniform(0, 0.2, (2, anchors, 1 + NC))
    for i, boxes in enumerate(TRUE):
        for cx, cy, bw, bh, c, s in boxes:
            # The true box at stride 16; copies at strides 8 and 32 (weaker, a pixel off) for NMS to drop.
            for k, stride in enumerate((16, 8, 32)):
                a, gx, gy = _yolox_index(cx + k, cy, stride)
                out[i, a, :4] = [(cx + k) / stride - gx, cy / stride - gy, math.log(bw / stride),
                                 math.log(bh / stride)]
                out[i, a, 4:] = 0.1
                out[i, a, 4] = 0.95
                out[i, a, 5 + c] = (s - 0.04 * k) / 0.95
    if logits:
        out[..., 4:] = np.log(out[..., 4:] / (1 - out[..., 4:]))
    return out


def test_yolox_grid_order_and_strides() -> None:
    out = _yolox_output(np.random.default_rng(2))
    boxes = get_decoder("yolox")([out.astype(np.float32)], HW)
    assert len(boxes[0]) == 40 * 52 + 20 * 26 + 10 * 13
    _check(boxes)
    with pytest.raises(BadInput, match=r"2730 anchors, but a 320x320 input has 2100"):
        get_decoder("yolox")([out], (320, 320))


def test_logits_get_a_sigmoid_and_a_note() -> None:
    decoder_notes()
    _check(get_decoder("yolox")([_yolox_output(np.random.default_rng(3), logits=True)], HW))
    notes = decoder_notes()
    assert len(notes) == 1 and "yolox" in notes[0] and "sigmoid" in notes[0]
    assert decoder_notes() == []  # said once, then cleared
    out = _ultralytics(np.random.default_rng(4), 2100, with_obj=False)
    out[..., 4:] = np.log(out[..., 4:] / (1 - out[..., 4:]))
    _check(get_decoder("yolov8")([out.transpose(0, 2, 1)], HW))
    assert "logits" in decoder_notes()[0]


def test_wrong_shapes_are_bad_input() -> None:
    with pytest.raises(BadInput, match=r"output shape \[2, 100\], expected \[N, 4 \+ classes, anchors\]"):
        get_decoder("yolov8")([np.zeros((2, 100))], HW)
    with pytest.raises(BadInput, match=r"one output .* has 2"):
        get_decoder("yolov5")([np.zeros((1, 100, 8)), np.zeros((1, 32, 80, 80))], HW)
    with pytest.raises(BadInput, match=r"output shape \[1, 8, 100\], expected \[N, anchors, 5 \+ classes\]"):
        get_decoder("yolov5")([np.zeros((1, 8, 100))], HW)


def test_guess_decoder() -> None:
    assert guess_decoder([[1, 84, 8400]]) == "yolov8"
    assert guess_decoder([[-1, 84, 8400]]) == "yolov8"
    assert guess_decoder([[1, 8400, 85]]) is None  # YOLOv5, YOLOX or a transposed YOLOv8: no telling
    assert guess_decoder([[1, 25200, 85]], input_hw=(640, 640)) == "yolov5"  # 3 anchors per cell
    assert guess_decoder([[1, 8400, 85]], input_hw=(640, 640)) is None
    assert guess_decoder([[1, 116, 8400], [1, 32, 160, 160]]) is None  # a segmentation head
    assert guess_decoder([[1, 84, -1]]) is None


def test_user_decoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_decode.py").write_text(
        "import numpy as np\n"
        "def decode(outputs, input_hw):\n"
        "    h, w = input_hw\n"
        "    return [(o[:, :4] * [w, h, w, h], o[:, 4], o[:, 5]) for o in outputs[0]]\n"
        "def bad(outputs, input_hw):\n"
        "    return [(o[:, :3], o[:, 4], o[:, 5]) for o in outputs[0]]\n"
        "def short(outputs, input_hw):\n"
        "    return []\n")
    raw = np.array([[[0.1, 0.2, 0.3, 0.4, 0.9, 2], [0.5, 0.5, 0.6, 0.6, 0.4, 0]]])
    boxes = get_decoder(f"{tmp_path / 'my_decode.py'}:decode")([raw], (100, 200))
    np.testing.assert_allclose(boxes[0].xyxy, [[20, 20, 60, 40], [100, 50, 120, 60]])
    assert boxes[0].classes.tolist() == [2, 0] and boxes[0].scores.tolist() == [0.9, 0.4]
    with pytest.raises(BadInput, match=r"my_decode.py:bad: image 0: shapes xyxy \[2, 3\]"):
        get_decoder(f"{tmp_path / 'my_decode.py'}:bad")([raw], (100, 200))
    with pytest.raises(BadInput, match=r"my_decode\.py:short returned 0 results for 1 images"):
        get_decoder(f"{tmp_path / 'my_decode.py'}:short")([raw], (100, 200))
    monkeypatch.syspath_prepend(str(tmp_path))  # by module name, as an installed package would be found
    assert get_decoder("my_decode:decode")([raw], (100, 200))[0].xyxy[1].tolist() == [100, 50, 120, 60]
    with pytest.raises(BadInput, match="has no function missing"):
        get_decoder("my_decode:missing")
    with pytest.raises(BadInput, match="no file"):
        get_decoder(f"{tmp_path / 'absent.py'}:decode")
    with pytest.raises(BadInput, match="choose one of yolov8, yolov5, yolox"):
        get_decoder("yolov9")
