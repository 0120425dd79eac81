"""Ground-truth readers: Ultralytics' layout on real JPEGs, class-name files, bad labels, COCO JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.errors import BadInput
from edgekit.tasks.coco import evaluate_detections
from edgekit.tasks.labels import class_names_near, image_size, read_coco_annotations, read_yolo_labels, yolo_label_file
from edgekit.tasks.types import Boxes


def _dataset(root: Path) -> list[Path]:
    """dataset/images/val/{a,b,c}.jpg (640x480, 300x500, 200x100), labels for a and b only."""
    images = root / "dataset" / "images" / "val"
    labels = root / "dataset" / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    out = []
    for name, size in (("a", (640, 480)), ("b", (300, 500)), ("c", (200, 100))):
        Image.new("RGB", size, (120, 30, 200)).save(images / f"{name}.jpg")
        out.append(images / f"{name}.jpg")
    (labels / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n1 0.1 0.2 0.2 0.4\n\n0 0.5 0.5 0.25 0.5\n")  # a duplicate
    (labels / "b.txt").write_text("2 0.2 0.1 0.4 0.1 0.4 0.3 0.2 0.3\n")  # a polygon (a rectangle)
    return out


def test_ultralytics_layout_in_pixels(tmp_path: Path) -> None:
    images = _dataset(tmp_path)
    assert yolo_label_file(images[0]) == tmp_path / "dataset" / "labels" / "val" / "a.txt"
    assert yolo_label_file(Path("/x/images/y/images/z.png")) == Path("/x/images/y/labels/z.txt")  # the last one
    assert yolo_label_file(Path("flat/z.jpeg")) == Path("flat/z.txt")
    assert [image_size(p) for p in images] == [(640, 480), (300, 500), (200, 100)]
    a, b, c = read_yolo_labels(images, num_classes=3)
    np.testing.assert_allclose(a.xyxy, [[240, 120, 400, 360], [0, 0, 128, 192]])
    assert a.classes.tolist() == [0, 1] and a.scores is None
    np.testing.assert_allclose(b.xyxy, [[60, 50, 120, 150]])
    assert b.classes.tolist() == [2]
    assert len(c) == 0  # no label file: an image without objects


def test_class_names(tmp_path: Path) -> None:
    images = _dataset(tmp_path)
    val = images[0].parent
    assert class_names_near(val) is None
    (tmp_path / "dataset" / "data.yaml").write_text("path: .\nnames:\n  1: dog\n  0: cat\n  2: bird\n")
    assert class_names_near(val) == ["cat", "dog", "bird"]  # the grandparent, a dict in index order
    (tmp_path / "dataset" / "images" / "data.yaml").write_text("train: x\n")  # no names: keep looking
    assert class_names_near(val) == ["cat", "dog", "bird"]
    (val / "classes.txt").write_text("person\ncar\n\n")
    assert class_names_near(val) == ["person", "car"]  # the nearest folder first
    (val / "classes.txt").write_text("person\n\ncar\n")
    with pytest.raises(BadInput, match=r"classes\.txt.*line 2 is empty"):
        class_names_near(val)
    (val / "classes.txt").unlink()
    (tmp_path / "dataset" / "data.yaml").write_text("names: {0: cat, 2: bird}\n")
    with pytest.raises(BadInput, match=r"data.yaml: 'names' keys must be the class indices 0..1"):
        class_names_near(val)


@pytest.mark.parametrize(("line", "message"), [
    ("0 0.5 0.5 0.2 0.2 0.9", "line 2: 6 columns; expected 5"),
    ("5 0.5 0.5 0.2 0.2", "line 2: class 5 out of range: the model has 3 classes"),
    ("1.5 0.5 0.5 0.2 0.2", "line 2: class 1.5 is not a non-negative integer"),
    ("-1 0.5 0.5 0.2 0.2", "line 2: class -1 is not"),
    ("0 0.5 nan 0.2 0.2", "line 2: a value is not finite"),
    ("0 320 240 64 48", r"line 2: coordinates must be normalised to \[0, 1\] \(found 48..320\)"),
    ("0 0.5 0.5 0.2 1.002", "line 2: coordinates must be normalised"),
    ("0 a b c d", "line 2: not numbers"),
])
def test_bad_labels_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    images = _dataset(tmp_path)
    label = tmp_path / "dataset" / "labels" / "val" / "b.txt"
    label.write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(BadInput, match=f"label file {re.escape(str(label))} {message}"):
        read_yolo_labels(images, num_classes=3)


def test_label_rounding_tolerance_and_missing_labels(tmp_path: Path) -> None:
    images = _dataset(tmp_path)
    label = tmp_path / "dataset" / "labels" / "val" / "b.txt"
    label.write_text("0 0.5 0.5 1.0005 0.2\n")  # within 1e-3: clipped to the image
    np.testing.assert_allclose(read_yolo_labels(images)[1].xyxy, [[0, 200, 300, 300]])
    for f in (tmp_path / "dataset" / "labels" / "val").iterdir():
        f.unlink()
    looked = re.escape(str(label.parent))
    with pytest.raises(BadInput, match=f"no label file for any of the 3 images: looked in {looked} "):
        read_yolo_labels(images)


def _coco_json(tmp_path: Path) -> Path:
    doc = {
        "images": [{"id": 11, "file_name": "val/a.jpg", "width": 640, "height": 480},
                   {"id": 12, "file_name": "b.jpg", "width": 300, "height": 500},
                   {"id": 13, "file_name": "other.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 7, "name": "bird"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [10, 20, 30, 40], "iscrowd": 0, "area": 1200},
            {"id": 2, "image_id": 11, "category_id": 1, "bbox": [100.5, 50, 20, 10], "iscrowd": 0, "area": 200},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 600, 400], "iscrowd": 1, "area": 1},
            {"id": 4, "image_id": 12, "category_id": 3, "bbox": [5, 6, 7, 8], "iscrowd": 0, "area": 56},
            {"id": 5, "image_id": 13, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0, "area": 4},
        ],
    }
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_annotations_round_trip(tmp_path: Path) -> None:
    images = _dataset(tmp_path)
    path = _coco_json(tmp_path)
    truth, names, ids = read_coco_annotations(path, images)
    assert names == ["cat", "dog", "bird"] and ids == [1, 3, 7]  # model class i = i-th id ascending
    a, b, c = truth
    np.testing.assert_allclose(a.xyxy, [[10, 20, 40, 60], [100.5, 50, 120.5, 60]])
    assert a.classes.tolist() == [2, 0]  # id 7 -> 2, id 1 -> 0; the crowd box left out
    np.testing.assert_allclose(b.xyxy, [[5, 6, 12, 14]])
    assert b.classes.tolist() == [1]
    assert c is None  # c.jpg is not in the JSON: no ground truth (not "no objects")
    # The boxes read back score 1.0 against themselves; the metric needs only the images the JSON knows.
    known = [t for t in truth if t is not None]
    preds = [Boxes(t.xyxy, t.classes, np.full(len(t), 0.9)) for t in known]
    score = evaluate_detections(known, preds, [(640, 480), (300, 500)], num_classes=len(names))
    assert score.map50_95 == pytest.approx(1.0) and sorted(score.per_class) == [0, 1, 2]


def test_coco_annotations_bad_input(tmp_path: Path) -> None:
    path = _coco_json(tmp_path)
    strangers = [tmp_path / "x.jpg", tmp_path / "y.jpg"]
    with pytest.raises(BadInput, match=r"none of the 2 images is listed in it \(compared file names such as x.jpg "
                                       r"with 3 file_name entries\)"):
        read_coco_annotations(path, strangers)
    doc = json.loads(path.read_text())
    doc["annotations"][0]["category_id"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(BadInput, match=r"annotation 1: category_id 2 is not among the categories \[1, 3, 7\]"):
        read_coco_annotations(path, [tmp_path / "a.jpg"])
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(BadInput, match="not a COCO annotations file"):
        read_coco_annotations(path, [tmp_path / "a.jpg"])
