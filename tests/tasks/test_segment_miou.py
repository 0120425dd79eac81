"""Segmentation: masks read as class indices, the confusion matrix and mIoU on hand-made arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.errors import BadInput
from edgekit.tasks.segment import confusion, mask_file, mean_iou, read_mask


def test_confusion_and_miou_known_answer() -> None:
    truth = np.array([[0, 0, 1, 1],
                      [0, 2, 2, 255],
                      [1, 1, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 2],
                     [1, 3, 2, 0]], dtype=np.uint8)
    conf = confusion(pred, truth, num_classes=4)
    # rows truth, columns prediction; the two 255 pixels are not counted whatever was predicted there.
    np.testing.assert_array_equal(conf, [[2, 1, 0, 0],
                                         [0, 3, 0, 1],
                                         [1, 0, 2, 0],
                                         [0, 0, 0, 0]])
    miou, per_class = mean_iou(conf)
    # IoU = TP / (row + column - TP): class 0 2/(3+3-2), 1 3/(4+4-3), 2 2/(3+2-2), 3 0/(0+1-0): predicted only.
    assert per_class == pytest.approx({0: 0.5, 1: 0.6, 2: 2 / 3, 3: 0.0})
    assert miou == pytest.approx((0.5 + 0.6 + 2 / 3 + 0.0) / 4)
    # A class never seen in truth nor prediction is left out of the mean.
    miou5, per5 = mean_iou(confusion(pred, truth, num_classes=5))
    assert 4 not in per5 and miou5 == pytest.approx(miou)
    assert mean_iou(np.zeros((3, 3))) == (None, {})
    # Another ignore value: the three 2s leave instead (the former 255 pixels, now class 3, count).
    assert confusion(pred, np.where(truth == 255, 3, truth), 4, ignore=2).sum() == 12 - 3


def test_confusion_refuses_mismatches() -> None:
    with pytest.raises(BadInput, match=r"prediction \[2, 2\] and mask \[2, 3\] differ"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(BadInput, match=r"mask holds class 7, outside 0\.\.2"):
        confusion(np.zeros((2, 2)), np.array([[0, 7], [1, 255]]), 3)


def test_masks_are_read_as_indices(tmp_path: Path) -> None:
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))  # black, red, green
    pal.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    got = read_mask(tmp_path / "pal.png")
    assert got.ndim == 2 and got.tolist() == idx.tolist()  # the indices, not (255, 0, 0)
    Image.fromarray(idx * 50).save(tmp_path / "gray.png")
    assert read_mask(tmp_path / "gray.png").tolist() == (idx * 50).tolist()
    Image.fromarray(np.stack([idx] * 3, axis=-1)).save(tmp_path / "rgb.png")
    with pytest.raises(BadInput, match=r"rgb\.png is a RGB image: a class-index PNG is needed"):
        read_mask(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(BadInput, match="cannot read mask"):
        read_mask(tmp_path / "junk.png")
    assert mask_file(Path("/d/images/val/a.jpg")) == Path("/d/masks/val/a.png")
