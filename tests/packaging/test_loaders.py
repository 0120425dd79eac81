"""examples/loaders: the run_*.py apps, run as an app runs them (a fresh process, edgekit not importable),
on a built package; their predictions against the folder classes and edgekit's own pipeline; the
runtime lock."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, REPO, read_manifest, run_cli

from edgekit.data import Preprocess

LOADERS = REPO / "examples" / "loaders"
PER_CLASS = 10


def _helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgekit_package", LOADERS / "edgekit_package.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ek = _helper()


def _build(defects_data: Path, out: Path, target: str, backend: str, precision: str) -> Path:
    r = run_cli("build", BUNDLED_ONNX, "--target", target, "--backend", backend, "--precision", precision,
                "--calib", defects_data / "calib", "--val", defects_data / "val", "--preprocess", BUNDLED_PREPROCESS,
                "--out", out, *FAST)
    assert r.code == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(defects_data, tmp_path_factory.mktemp("l") / "pkg", "host-cpu", "all", "fp32,int8")


@pytest.fixture(scope="module")
def images(defects_data: Path) -> list[tuple[Path, str]]:
    """The first few validation images of every class folder, with the folder's class."""
    return [(p, d.name) for d in sorted((defects_data / "val").iterdir()) if d.is_dir()
            for p in sorted(d.iterdir())[:PER_CLASS]]


@pytest.fixture(scope="module")
def reference(package: Path, images: list[tuple[Path, str]]) -> list[str]:
    """edgekit's own answer for each image: its preprocessing, the FP32 model in ONNX Runtime."""
    import onnxruntime as ort

    m = read_manifest(package)
    pre = Preprocess.from_dict(m["preprocess"])
    session = ort.InferenceSession(str(package / "onnxruntime-fp32" / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [m["labels"][int(session.run(None, {name: pre.apply(p)[None]})[0].argmax())] for p, _ in images]


def run_loader(script: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The example in a fresh process with `import edgekit` made to fail: apps do not have it."""
    boot = ("import runpy, sys; sys.modules['edgekit'] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, sys.argv[0].rpartition('/')[0]); runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", boot, str(LOADERS / script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def _predictions(stdout: str) -> list[tuple[str, float, str]]:
    rows = [line.split("\t") for line in stdout.splitlines()]
    return [(label, float(score), key) for label, score, key, _ in rows]


def _check_predictions(manifest: dict, key: str, rows: list[tuple[str, float, str]],
                       images: list[tuple[Path, str]], reference: list[str]) -> None:
    assert len(rows) == len(images) and {k for _, _, k in rows} == {key}
    assert all(0 < s <= 1 for _, s, _ in rows)
    labels = [label for label, _, _ in rows]
    accuracy = np.mean([label == cls for label, (_, cls) in zip(labels, images)])
    agreement = np.mean([a == b for a, b in zip(labels, reference)])
    v = next(a for a in manifest["artifacts"] if a["key"] == key)["verification"]
    assert accuracy >= 0.75, f"{key}: {accuracy:.0%} of the images get their folder's class"
    assert abs(accuracy - v["accuracy"]) <= 0.1, f"{key}: {accuracy:.0%} here, {v['accuracy']:.0%} in the manifest"
    if key.endswith("fp32"):
        assert agreement == 1.0, f"{key}: FP32 must give edgekit's own answer on every image"
    else:
        assert agreement >= v["top1_agreement"] - 0.1, f"{key}: agrees with edgekit on {agreement:.0%}"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "ncnn"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_loader_predicts_what_edgekit_verified(package: Path, images: list[tuple[Path, str]], reference: list[str],
                                               backend: str, precision: str) -> None:
    key = f"{backend}-{precision}"
    r = run_loader(f"run_{backend}.py", package, *[p for p, _ in images], "--artifact", key)
    assert r.returncode == 0, r.stderr
    _check_predictions(read_manifest(package), key, _predictions(r.stdout), images, reference)


def test_default_artifact_and_unknown_key(package: Path, images: list[tuple[Path, str]]) -> None:
    r = run_loader("run_onnxruntime.py", package, images[0][0])
    assert r.returncode == 0 and _predictions(r.stdout)[0][2] == "onnxruntime-int8"  # the lowest precision
    r = run_loader("run_onnxruntime.py", package, images[0][0], "--artifact", "ncnn-int8")
    assert r.returncode == 1 and "no onnxruntime artifact 'ncnn-int8'" in r.stderr


def test_ort_mobile_loader(defects_data: Path, tmp_path: Path, images: list[tuple[Path, str]],
                           reference: list[str]) -> None:
    pkg = _build(defects_data, tmp_path / "mobile", "android-arm64", "ort-mobile", "int8")
    r = run_loader("run_ort_mobile.py", pkg, *[p for p, _ in images])
    assert r.returncode == 0, r.stderr
    _check_predictions(read_manifest(pkg), "ort-mobile-int8", _predictions(r.stdout), images, reference)


# ---------------------------------------------------------------- runtime lock


def _with_toolchain(package: Path, dest: Path, **versions: str) -> Path:
    """A copy of the package's manifest (and ONNX Runtime artifacts) claiming other runtime versions."""
    dest.mkdir()
    for d in ("onnxruntime-fp32", "onnxruntime-int8"):
        shutil.copytree(package / d, dest / d)
    m = read_manifest(package)
    m["toolchain"].update(versions)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_older_runtime_is_refused(package: Path, images: list[tuple[Path, str]], tmp_path: Path) -> None:
    import onnxruntime

    newer = _with_toolchain(package, tmp_path / "newer", onnxruntime="99.1.0")
    r = run_loader("run_onnxruntime.py", newer, images[0][0])
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"onnxruntime {onnxruntime.__version__} is older than 99.1.0" in lines[0]
    assert "onnxruntime>=99.1.0" in lines[0]


def test_newer_major_runtime_warns(package: Path, images: list[tuple[Path, str]], tmp_path: Path) -> None:
    older = _with_toolchain(package, tmp_path / "older", onnxruntime="0.9.0")
    r = run_loader("run_onnxruntime.py", older, images[0][0])
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "newer major version than 0.9.0" in r.stderr


def test_check_runtime_versions() -> None:
    m = {"toolchain": {"onnxruntime": "1.32.0", "openvino": "2026.4.1", "ncnn": "1.0.20261020"}}
    a = {"key": "x-int8", "entry": "x-int8/model"}
    ek.check_runtime(m, a, "onnxruntime", "1.32.3")  # a newer patch is the same release
    ek.check_runtime(m, a, "openvino", "2026.4.1-22982-e213a147257-releases/2026/4")
    ek.check_runtime(m, a, "ncnn", "1.0.20261020")
    for name, version in (("onnxruntime", "1.31.9"), ("openvino", "2025.4.0"), ("ncnn", "1.0.20240410")):
        with pytest.raises(SystemExit, match=f"{name} {version} is older than"):
            ek.check_runtime(m, a, name, version)
    ek.check_runtime({"toolchain": {}}, a, "onnxruntime", "1.0")  # nothing recorded: warns, runs


@pytest.fixture(scope="module")
def tensorrt_package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(defects_data, tmp_path_factory.mktemp("t") / "trt", "jetson-orin-nano", "tensorrt", "fp32")


def test_tensorrt_lock(tensorrt_package: Path, tmp_path: Path) -> None:
    """engine.json ties the engine to TensorRT 10.3 on sm 8.7 (the target's JetPack 6.1 and GPU)."""
    pkg = tmp_path / "trt"
    shutil.copytree(tensorrt_package, pkg)
    m = read_manifest(pkg)
    a = ek.pick_artifact(m, "tensorrt")
    tied = json.loads((pkg / "tensorrt-fp32" / "engine.json").read_text())["tied_to"]
    assert (tied["tensorrt"], tied["compute_capability"]) == ("10.3", "8.7")
    ek.check_runtime(m, a, "tensorrt", "10.3.0.30", package=pkg, compute_capability="8.7")
    ek.check_runtime(m, a, "tensorrt", "10.3.0.30", package=pkg)  # no GPU read yet: the version alone
    for version, cc, what in (("8.6.2", "8.7", "TensorRT 10.3, this device has TensorRT 8.6.2"),
                              ("10.7.0", "8.7", "this device has TensorRT 10.7.0"),
                              ("10.3.0.30", "7.2", "compute capability 8.7"),
                              ("10.3.0.30", "sm_72", "this GPU is sm_72")):
        with pytest.raises(SystemExit, match=r"rebuild the engine on this device with build_engine\.sh") as e:
            ek.check_runtime(m, a, "tensorrt", version, package=pkg, compute_capability=cc)
        assert what in str(e.value)
    # after build_engine.py built it: the exact TensorRT release it was built with
    (pkg / "tensorrt-fp32" / "model.engine.json").write_text(json.dumps(
        {"tensorrt": "10.3.0.30", "gpu": {"name": "Orin", "compute_capability": "8.7"}}))
    ek.check_runtime(m, a, "tensorrt", "10.3.0.30", package=pkg, compute_capability="8.7")
    with pytest.raises(SystemExit, match=r"tied to TensorRT 10\.3\.0\.30"):
        ek.check_runtime(m, a, "tensorrt", "10.3.0.26", package=pkg, compute_capability="8.7")


def test_tensorrt_loader_refuses_a_mismatched_engine(tensorrt_package: Path, images: list[tuple[Path, str]],
                                                     tmp_path: Path) -> None:
    """run_tensorrt.py's real code path as far as it goes without a GPU: a (fake) TensorRT 8.6 module."""
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "tensorrt.py").write_text('__version__ = "8.6.1"\n')
    r = run_loader("run_tensorrt.py", tensorrt_package, images[0][0], env={"PYTHONPATH": str(fake)})
    assert r.returncode == 1, r.stderr
    assert "tied to TensorRT 10.3, this device has TensorRT 8.6.1" in r.stderr and "build_engine.sh" in r.stderr
    r = run_loader("run_tensorrt.py", tensorrt_package, images[0][0])
    if importlib.util.find_spec("tensorrt") is None:
        assert r.returncode == 1 and "tensorrt is not importable" in r.stderr


# ---------------------------------------------------------------- preprocessing and the no-edgekit rule


@pytest.mark.parametrize("spec", [
    {"size": [96, 96]},
    {"size": [64, 80], "resize": "letterbox", "color": "bgr", "layout": "nhwc", "pad_value": 0,
     "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4]},
    {"size": [72, 48], "resize": "center-crop", "scale": 1.0, "mean": [120.0, 110.0, 100.0]},
    {"size": [32, 32], "resize": "letterbox", "color": "gray", "mean": 0.5, "std": 0.25},
])
def test_preprocess_matches_edgekit(tmp_path: Path, spec: dict) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 256, (83, 131, 3), dtype=np.uint8)).save(image)
    pre = Preprocess.from_dict(dict(spec))
    ours = ek.preprocess(image, {"preprocess": spec})
    assert ours.shape == (1, *pre.apply(image).shape) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], pre.apply(image), rtol=0, atol=1e-5)


def test_loaders_do_not_import_edgekit() -> None:
    scripts = sorted(LOADERS.glob("*.py"))
    assert {p.name for p in scripts} >= {"edgekit_package.py", "run_onnxruntime.py", "run_openvino.py",
                                         "run_ncnn.py", "run_tensorrt.py"}
    for p in scripts:
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n == "edgekit" or n.startswith("edgekit.")], p.name
