from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.data import Preprocess, prepare_data
from edgekit.errors import BadInput
from edgekit.ingest import ModelSpec, TensorSpec


def _spec(shape: list[int], name: str = "image") -> ModelSpec:
    return ModelSpec("m", "0" * 64, 0, "m.onnx", "0" * 64, 17, 17, [TensorSpec(name, shape, "float32")],
                     [TensorSpec("y", [shape[0], 4], "float32")], 0, 0)


def _folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_preprocess_formula_color_and_layout(tmp_path: Path) -> None:
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 100, 200
    Image.fromarray(img).save(tmp_path / "a.png")
    pre = Preprocess.from_dict({"size": [4, 6], "color": "bgr", "scale": 0.5, "mean": [1, 2, 3],
                                "std": [2, 2, 2], "layout": "nchw"})
    x = pre.apply(tmp_path / "a.png")
    assert x.shape == (3, 4, 6)
    assert x[0, 0, 0] == pytest.approx((200 * 0.5 - 1) / 2)  # BGR: blue first
    assert x[2, 0, 0] == pytest.approx((10 * 0.5 - 3) / 2)
    assert Preprocess.from_dict({"size": [4, 6], "layout": "nhwc"}).apply(tmp_path / "a.png").shape == (4, 6, 3)


def test_letterbox_keeps_aspect_and_pads(tmp_path: Path) -> None:
    Image.fromarray(np.full((20, 40, 3), 255, np.uint8)).save(tmp_path / "wide.png")
    pre = Preprocess.from_dict({"size": [40, 40], "resize": "letterbox", "scale": 1.0, "layout": "nhwc"})
    x = pre.apply(tmp_path / "wide.png")
    assert x[0, 20, 0] == 114 and x[20, 20, 0] == 255  # top rows padded, middle is image
    crop = Preprocess.from_dict({"size": [10, 10], "resize": "center-crop", "scale": 1.0, "layout": "nhwc"})
    assert crop.apply(tmp_path / "wide.png").shape == (10, 10, 3)


def test_preprocess_unknown_key_and_bad_values(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("size: [96, 96]\nnormalise: true\n")
    with pytest.raises(BadInput, match=r"p.yaml: unknown key 'normalise'"):
        Preprocess.from_file(f)
    with pytest.raises(BadInput, match="key 'resize'"):
        Preprocess.from_dict({"size": [9, 9], "resize": "squash"})
    with pytest.raises(BadInput, match="key 'mean' needs 3 values"):
        Preprocess.from_dict({"size": [9, 9], "mean": [1, 2]})


def test_image_folder_gives_labels_and_a_disjoint_holdout(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"bad": 10, "good": 15})
    split = prepare_data(_spec([1, 3, 32, 32]), str(root), None, None, holdout=0.2)
    assert split.validation.class_names == ["bad", "good"]
    assert len(split.validation) == 5 and len(split.calibration) == 20
    assert set(split.validation.labels.tolist()) == {0, 1}  # stratified: both classes held out
    val = {x.tobytes() for x in split.validation.inputs["image"]}
    assert not val & {x.tobytes() for x in split.calibration.inputs["image"]}


def test_folder_size_mismatch_with_model_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 2})
    pre = Preprocess.from_dict({"size": [64, 64]})
    with pytest.raises(BadInput, match=r"model input 'image' is \[1, 3, 96, 96\].*size: \[96, 96\]"):
        prepare_data(_spec([1, 3, 96, 96]), str(root), None, pre)


def test_npz_checks(tmp_path: Path) -> None:
    spec = _spec([1, 3, 8, 8], "x")
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((6, 3, 8, 8), np.float64), labels=np.arange(6) % 2)
    split = prepare_data(spec, str(good), None, None)
    assert split.validation.inputs["x"].dtype == np.float32 and split.validation.labels is not None
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.ones((6, 3, 9, 8), np.float32))
    with pytest.raises(BadInput, match=r"samples of shape \[3, 9, 8\] but the model input is \[1, 3, 8, 8\]"):
        prepare_data(spec, str(wrong), None, None)
    named = tmp_path / "named.npz"
    np.savez(named, images=np.ones((6, 3, 8, 8), np.float32))
    with pytest.raises(BadInput, match=r"no array named 'x'.*name the arrays after the model inputs"):
        prepare_data(spec, str(named), None, None)
    ints = tmp_path / "ints.npz"
    np.savez(ints, x=np.ones((6, 3, 8, 8), np.int32))
    with pytest.raises(BadInput, match="is int32 but the model input is float32"):
        prepare_data(spec, str(ints), None, None)
    with pytest.raises(BadInput, match="calibration data not found"):
        prepare_data(spec, str(tmp_path / "missing"), None, None)
