"""Input that cannot be right is bad input (exit 2, one line saying what to do, nothing left behind), never
an internal error (exit 3) nor a verdict on data that could not give one (issue 18, items 4 and 5)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, CliResult, run_cli
from PIL import Image

N_CLASSES = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class classifier with dynamic batch and spatial dims."""
    from models import export_dynamic, mobilenet_like

    return export_dynamic(mobilenet_like(N_CLASSES), tmp_path_factory.mktemp("model") / "dyn.onnx", opset=13)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((40, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def calib(images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, images=images, labels=np.arange(len(images)) % N_CLASSES)
    return path


@pytest.fixture(scope="module")
def package(model: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "pkg"
    r = build(model, calib, out, "--precision", "fp32")
    assert r.code == 0, r.stderr
    return out


def build(model: Path, calib: Path, out: Path, *extra: str | Path) -> CliResult:
    return run_cli("build", model, "--target", "host-cpu", "--backend", "onnxruntime", "--calib", calib,
                   "--input-shape", "images=1,3,64,64", "--out", out, *FAST, *extra)


def assert_nothing_left(out: Path) -> None:
    """No DEST, no DEST.rejected, no hidden staging folder beside it (nor a probe of the writable check)."""
    assert not out.exists() and not out.with_name(out.name + ".rejected").exists()
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and parent.is_dir():
        left = [p.name for p in parent.iterdir() if p.name.startswith((f".{out.name}.", ".edgekit-write-probe-"))]
        assert not left, left


def read_only_folder() -> Path | None:
    """A folder that cannot be written even by root (tests run as root, which ignores permission bits):
    sysfs refuses new entries. None where it can be written."""
    root = Path("/sys")
    if not root.is_dir():
        return None
    try:
        os.rmdir(tempfile.mkdtemp(dir=root))
    except OSError:
        return root
    return None


# ---------------------------------------------------------------- output folders that cannot be written


def test_out_under_a_file_is_refused_before_any_work(model: Path, calib: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "pkg"
    r = build(model, calib, out, "--precision", "int8")
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert "--out" in line and str(tmp_path / "afile") in line and "is a file, not a writable folder" in line
    assert "ingest" not in r.stdout + r.stderr  # refused before the model was even read
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert_nothing_left(out)


def test_read_only_out_is_refused_before_planning(model: Path, calib: Path) -> None:
    folder = read_only_folder()
    if folder is None:
        pytest.skip("no folder here that root cannot write (/sys)")
    out = folder / "edgekit-test" / "pkg"
    # No --precision: the build plans first; the folder is checked before that work, not after it.
    r = run_cli("build", model, "--target", "host-cpu", "--calib", calib, "--input-shape", "images=1,3,64,64",
                "--out", out, *FAST)
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert f"folder {folder} is not writable" in line and "choose another --out" in line
    assert "planning" not in r.stdout + r.stderr
    assert_nothing_left(out)


def test_extract_dest_that_cannot_be_written(package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "pkg.zip"
    assert run_cli("package", package, "--out", archive).code == 0
    (tmp_path / "afile").write_text("x")
    dests = [tmp_path / "afile" / "dest"]
    folder = read_only_folder()
    if folder is not None:
        dests.append(folder / "edgekit-test" / "dest")
    for dest in dests:
        r = run_cli("package", "--extract", archive, dest)
        assert r.code == 2, r.stderr
        line = r.error_line()
        assert f"DEST {dest}" in line and ("is a file" in line or "is not writable" in line), line
        assert_nothing_left(dest)
    r = run_cli("package", "--extract", archive, tmp_path / "new" / "dest")  # a writable DEST still works
    assert r.code == 0, r.stderr


def test_report_out_that_cannot_be_written(package: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = run_cli("report", package, "--out", tmp_path / "afile" / "report.html")
    assert r.code == 2 and "cannot write the report to" in r.error_line()


# ---------------------------------------------------------------- input shapes too large to allocate


def test_huge_input_shape_is_refused_with_its_size(model: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    r = build(model, calib, out, "--precision", "int8", "--input-shape", "images=1,3,20000,20000")
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert "input images at 1x3x20000x20000 float32 is 4.47 GiB" in line and "give a smaller --input-shape" in line
    assert "MemoryError" not in r.stderr
    assert_nothing_left(out)


def test_largest_activation_is_checked_against_memory(model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekit.errors import BadInput
    from edgekit.ingest import canonical as ingest_module

    # 1x3x512x512 float32 is 3 MiB; the first expanded block's 64x256x256 activations are 16 MiB.
    monkeypatch.setattr(ingest_module, "available_memory", lambda: 8 << 20)
    with pytest.raises(BadInput, match=r"more than the 8 MiB of memory available: give a smaller --input-shape"):
        ingest_module.ingest(str(model), tmp_path, {"images": [1, 3, 512, 512]})


def test_samples_that_do_not_fit_in_memory(model: Path, calib: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekit import data as data_module
    from edgekit.errors import BadInput
    from edgekit.ingest import ingest

    spec = ingest(str(model), tmp_path, {"images": [1, 3, 64, 64]})
    monkeypatch.setattr(data_module, "available_memory", lambda: 1 << 20)  # 40 samples of 48 KiB: 1.9 MiB
    with pytest.raises(BadInput, match=r"loading 40 calibration and validation samples \(images 3x64x64 float32 "
                                       r"each\) needs 1.88 MiB, more than the 1 MiB of memory available"):
        data_module.prepare_data(spec, str(calib), None, None)


# ---------------------------------------------------------------- manifests that do not match the schema


def _damaged(package: Path, tmp_path: Path, change: str) -> Path:
    copy = tmp_path / f"pkg-{change}"
    shutil.copytree(package, copy)
    m = json.loads((copy / "manifest.json").read_text())
    if change == "no-source":
        del m["source"]
    elif change == "no-verification":
        del m["artifacts"][0]["verification"]
    elif change == "verification-a-string":
        m["artifacts"][0]["verification"] = "yes"
    (copy / "manifest.json").write_text(json.dumps(m, indent=2))
    return copy


@pytest.mark.parametrize("change, says", [
    ("no-source", "(no 'source' at the top level)"),
    ("no-verification", "(artifacts[0] (onnxruntime-fp32) has no 'verification')"),
])
def test_report_on_a_manifest_missing_a_field(package: Path, tmp_path: Path, change: str, says: str) -> None:
    damaged = _damaged(package, tmp_path, change)
    (damaged / "report.html").unlink()
    r = run_cli("report", damaged)
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert "manifest.json does not match the manifest schema" in line and says in line
    assert not (damaged / "report.html").exists()
    # compare and check read manifests loosely (older packages): never an internal error on these
    for args in (("compare", package, damaged, "--recorded"), ("check", damaged, "--baseline", package, "--recorded"),
                 ("check", package, "--baseline", damaged, "--recorded")):
        r = run_cli(*args)
        assert r.code in (0, 1, 2) and "internal error" not in r.stderr, (args, r.stderr)


def test_manifest_field_of_the_wrong_type_is_refused_by_every_reader(package: Path, tmp_path: Path) -> None:
    damaged = _damaged(package, tmp_path, "verification-a-string")
    for args in (("report", damaged), ("compare", package, damaged, "--recorded"),
                 ("check", damaged, "--baseline", package, "--recorded")):
        r = run_cli(*args)
        assert r.code == 2, (args, r.stderr)
        assert "does not match the manifest schema" in r.error_line() and "verification" in r.error_line()


# ---------------------------------------------------------------- data that cannot be right


@pytest.mark.parametrize("what, value", [("calibration", np.nan), ("validation", np.inf)])
def test_nan_or_inf_in_an_npz_names_the_array_and_sample(model: Path, calib: Path, images: np.ndarray,
                                                         tmp_path: Path, what: str, value: float) -> None:
    bad = images.copy()
    bad[17, 1, 5, 9] = value
    bad[30, 0, 0, 0] = value
    path = tmp_path / "bad.npz"
    np.savez(path, images=bad)
    out = tmp_path / "pkg"
    r = build(model, path, out, "--precision", "int8") if what == "calibration" else \
        build(model, calib, out, "--precision", "int8", "--val", path)
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert f"{what} array 'images' in {path} has NaN/inf at sample 17 (and 1 more sample)" in line
    assert "diverging" not in r.stdout + r.stderr
    assert_nothing_left(out)


def test_preprocessing_that_gives_inf(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(1, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    pre = tmp_path / "pre.yaml"
    pre.write_text("size: [64, 64]\nstd: [1.0e-40, 1.0e-40, 1.0e-40]\n")  # finite and non-zero, yet x / std = inf
    out = tmp_path / "pkg"
    r = build(model, folder, out, "--precision", "int8", "--preprocess", pre)
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert "image" in line and str(folder) in line and "has NaN/inf after preprocessing" in line
    assert_nothing_left(out)


@pytest.mark.parametrize("what, value, at", [("calibration", 99, 7), ("validation", -1, 3)])
def test_labels_outside_the_models_classes(model: Path, calib: Path, images: np.ndarray, tmp_path: Path,
                                           what: str, value: int, at: int) -> None:
    labels = np.arange(len(images)) % N_CLASSES
    labels[at] = value
    labels[at + 10] = value
    path = tmp_path / "labelled.npz"
    np.savez(path, images=images, labels=labels)
    out = tmp_path / "pkg"
    r = build(model, path, out, "--precision", "int8") if what == "calibration" else \
        build(model, calib, out, "--precision", "int8", "--val", path)
    assert r.code == 2, r.stderr
    line = r.error_line()
    assert (f"{what} array 'labels' in {path} has {value} at sample {at} (and 1 more): the model's output "
            f"'scores' has {N_CLASSES} classes, so labels must be 0..{N_CLASSES - 1}") in line
    assert_nothing_left(out)


def test_labels_that_are_not_whole_numbers(model: Path, images: np.ndarray, tmp_path: Path) -> None:
    labels = (np.arange(len(images)) % N_CLASSES).astype(np.float32)
    labels[5] = 1.5
    path = tmp_path / "labelled.npz"
    np.savez(path, images=images, labels=labels)
    out = tmp_path / "pkg"
    r = build(model, path, out, "--precision", "int8")
    assert r.code == 2 and "'labels'" in r.error_line() and "1.5 at sample 5" in r.error_line()
    assert_nothing_left(out)


def test_more_class_folders_than_the_model_has_classes(defects_data: Path, tmp_path: Path) -> None:
    from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS

    val = tmp_path / "val"
    shutil.copytree(defects_data / "val", val)
    (val / "zz-extra").mkdir()
    shutil.copy(next((val / "ok").iterdir()), val / "zz-extra" / "one.png")
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--precision", "fp32", "--calib", defects_data / "calib",
                "--val", val, "--preprocess", BUNDLED_PREPROCESS, "--out", tmp_path / "out", *FAST)
    assert r.code == 2, r.stderr
    assert "has 5 class folders" in r.error_line() and "has 4 classes" in r.error_line()
    assert_nothing_left(tmp_path / "out")
