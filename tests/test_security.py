"""Untrusted input and interrupted runs: manifests whose paths leave the package, YAML alias bombs and
mistyped plans, a folder appearing at --out during a build, SIGTERM mid-build, leftovers of killed runs.
Every case goes through the real CLI and checks the exit code, the one error line, and that nothing is
left behind or removed that edgekit did not create."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS, FAST, REPO, build_bundled, read_manifest, run_cli

ARTIFACT = "onnxruntime-fp32"


@pytest.fixture(scope="module")
def package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sec") / "pkg"
    return build_bundled(out, defects_data, "fp32", "--val-samples", "40")


def _copy_with(package: Path, dest: Path, edit) -> Path:
    shutil.copytree(package, dest)
    m = read_manifest(dest)
    edit(m["artifacts"][0])
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def _zip_package(folder: Path, out: Path) -> Path:
    """An archive written the way an attacker would: valid checksums over whatever the folder holds."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}\n"
                   for p in files)
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("CHECKSUMS.sha256", sums)
        for p in files:
            z.write(p, p.relative_to(folder).as_posix())
    return out


# ---------------------------------------------------------------- 1. paths that leave the package


@pytest.mark.parametrize("entry", ["/etc/hostname", "../secret/key", "onnxruntime-fp32/../../secret/key",
                                   "C:/Windows/win.ini", "model.onnx"])
def test_manifest_entry_outside_the_package_is_refused_everywhere(package: Path, tmp_path: Path, entry: str) -> None:
    bad = _copy_with(package, tmp_path / "bad", lambda a: a.update(entry=entry))
    r = run_cli("package", bad, "--format", "zip", "--out", tmp_path / "bad.zip")
    assert r.code == 2, r.stderr
    assert entry in r.error_line() and "inside" in r.error_line()
    assert not (tmp_path / "bad.zip").exists()
    # The same manifest inside an archive with valid checksums: --verify and --extract refuse it.
    archive = _zip_package(bad, tmp_path / "crafted.zip")
    r = run_cli("package", "--verify", archive)
    assert r.code == 2 and entry in r.error_line(), r.stderr
    r = run_cli("package", "--extract", archive, tmp_path / "dest")
    assert r.code == 2 and entry in r.error_line(), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "crafted.zip"]  # no DEST, no staging
    for verb in (["report", bad], ["compare", package, bad, "--recorded"]):
        r = run_cli(*verb)
        assert r.code == 2 and entry in r.error_line(), (verb, r.stderr)


def test_file_path_outside_the_package_is_refused(package: Path, tmp_path: Path) -> None:
    def edit(a: dict) -> None:
        a["files"].append({"path": "../../root/.ssh/id_ed25519", "bytes": 1, "sha256": "0" * 64})

    bad = _copy_with(package, tmp_path / "bad", edit)
    r = run_cli("package", bad, "--format", "tar.gz", "--out", tmp_path / "bad.tar.gz")
    assert r.code == 2 and "../../root/.ssh/id_ed25519" in r.error_line(), r.stderr


def test_artifact_folder_linked_outside_is_not_sent_to_a_device(package: Path, tmp_path: Path) -> None:
    """A package whose artifact folder is a link to ~/.ssh-like folder: `profile --device` refuses before it
    connects, so nothing is copied anywhere."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("PRIVATE KEY")
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    model = (bad / ARTIFACT / "model.onnx").read_bytes()
    shutil.rmtree(bad / ARTIFACT)
    (secret / "model.onnx").write_bytes(model)  # the manifest's sha256 still matches
    (bad / ARTIFACT).symlink_to(secret, target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {"EDGEKIT_HOME": str(home)}
    (home / "devices.yaml").write_text("devices:\n  dev1: {url: 'ssh://nobody@127.0.0.1:9', target: host-cpu}\n")
    r = _cli_env(env, "profile", bad, "--device", "dev1")
    assert r.code == 2, r.stderr
    assert "outside the package" in r.stderr and str(secret.resolve()) in r.stderr
    assert "ssh" not in r.stderr.lower().split("outside")[0]  # refused before any connection


# ---------------------------------------------------------------- 2. YAML bombs and mistyped files

BOMB = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def _plan(package: Path) -> dict:
    plan = yaml.safe_load((package / "plan.yaml").read_text())
    plan["artifacts"][0]["quantization"] = {"method": "minmax"}
    return plan


def test_plan_with_alias_bomb_is_refused_at_once(package: Path, defects_data: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    body = {k: v for k, v in _plan(package).items() if k != "reasons"}
    plan.write_text(BOMB + yaml.safe_dump(body) + "reasons: *i\n")
    t0 = time.monotonic()
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--plan", plan, "--calib", defects_data / "calib",
                "--preprocess", BUNDLED_PREPROCESS, "--out", tmp_path / "out", *FAST)
    assert time.monotonic() - t0 < 60
    assert r.code == 2 and "alias" in r.error_line(), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


def _set_method(p: dict, value: object) -> None:
    p["artifacts"][0]["quantization"]["method"] = value


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda p: _set_method(p, 42), "'artifacts[0].quantization.method' is int 42"),
    (lambda p: _set_method(p, "kl"), "method is 'kl'"),
    (lambda p: p.update(model_sha256=1234), "'model_sha256' is int 1234"),
    (lambda p: p["artifacts"][0].update(precision="fp64"), "precision is 'fp64'"),
    (lambda p: p.update(artifacts=7), "'artifacts' is int 7"),
    (lambda p: p["artifacts"][0]["quantization"].update(exclude_nodes="conv1"), "exclude_nodes' is str"),
])
def test_mistyped_plan_is_bad_input(package: Path, defects_data: Path, tmp_path: Path, edit, expected: str) -> None:
    plan = _plan(package)
    edit(plan)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--plan", path, "--calib", defects_data / "calib",
                "--preprocess", BUNDLED_PREPROCESS, "--out", tmp_path / "out", *FAST)
    assert r.code == 2, r.stderr
    assert expected in r.error_line() and str(path) in r.error_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


def test_preprocess_target_and_devices_refuse_aliases(defects_data: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre.yaml"
    pre.write_text(BOMB + "size: [96, 96]\nmean: *i\n")
    t0 = time.monotonic()
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--calib", defects_data / "calib",
                "--preprocess", pre, "--precision", "fp32", "--out", tmp_path / "out", *FAST)
    assert r.code == 2 and "alias" in r.error_line() and str(pre) in r.error_line(), r.stderr
    target = tmp_path / "mytarget.yaml"
    target.write_text(BOMB + (REPO / "targets" / "rpi5.yaml").read_text().replace("name: rpi5", "name: mytarget"))
    r = run_cli("targets", "show", target)
    assert r.code == 2 and "alias" in r.error_line(), r.stderr
    home = tmp_path / "home"
    home.mkdir()
    (home / "devices.yaml").write_text(BOMB + "devices: *i\n")
    r = _cli_env({"EDGEKIT_HOME": str(home)}, "devices", "list")
    assert r.code == 2 and "alias" in r.error_line(), r.stderr
    (home / "devices.yaml").write_text("devices:\n  d: {url: 'ssh://u@h', target: host-cpu, python: [1]}\n")
    r = _cli_env({"EDGEKIT_HOME": str(home)}, "devices", "list")
    assert r.code == 2 and "'python' is list" in r.error_line(), r.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists()


def test_preprocess_values_are_type_checked(defects_data: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre.yaml"
    for text, expected in (("size: [96, 96]\nscale: abc\n", "'scale' is str"),
                           ("size: [96, 96]\nmean: [0.5, 0.5, .nan]\n", "'mean' has a value that is not finite"),
                           ("size: [96, '96']\n", "'size[1]' is str")):
        pre.write_text(text)
        r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--calib", defects_data / "calib",
                    "--preprocess", pre, "--precision", "fp32", "--out", tmp_path / "out", *FAST)
        assert r.code == 2 and expected.replace("not finite", "not a finite number") in r.error_line(), r.stderr


# ---------------------------------------------------------------- 3. --out decided at commit time


def _start_build(out: Path, defects_data: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgekit", "build", str(BUNDLED_ONNX), "--target", "host-cpu",
           "--backend", "onnxruntime", "--precision", "fp32,int8", "--calib", str(defects_data / "calib"),
           "--val", str(defects_data / "val"), "--preprocess", str(BUNDLED_PREPROCESS), "--out", str(out),
           "--no-cache", "--val-samples", "40", *FAST, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})


def _wait_for_staging(parent: Path, name: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [p for p in parent.glob(f".{name}.partial-*") if any(p.iterdir())]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the build never started staging")


def test_folder_created_at_out_during_the_build_is_kept(defects_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    proc = _start_build(out, defects_data)
    _wait_for_staging(tmp_path, "pkg", proc)
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("edgekit: error")]
    assert len(lines) == 1 and "created by someone else" in lines[0], stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no staging left


def test_two_builds_to_one_new_out_one_wins(defects_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    procs = [_start_build(out, defects_data) for _ in range(2)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=900)]]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "created by someone else" in loser
    m = read_manifest(out)
    assert m["passed"] and {a["key"] for a in m["artifacts"]} == {"onnxruntime-fp32", "onnxruntime-int8"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_force_replaces_only_what_edgekit_wrote(package: Path, defects_data: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "fp32",
                "--calib", defects_data / "calib", "--preprocess", BUNDLED_PREPROCESS, "--out", mine, "--force", *FAST)
    assert r.code == 2 and "--force replaces only" in r.error_line(), r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    again = tmp_path / "again"
    shutil.copytree(package, again)
    r = run_cli("build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime", "--precision", "fp32",
                "--calib", defects_data / "calib", "--preprocess", BUNDLED_PREPROCESS, "--out", again, "--force", *FAST)
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine"]


# ---------------------------------------------------------------- 6. SIGTERM and stale leftovers


def test_sigterm_mid_build_leaves_nothing(defects_data: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "pkg"
    proc = _start_build(out, defects_data, env={"TMPDIR": str(tmp)})
    _wait_for_staging(tmp_path, "pkg", proc)
    time.sleep(1.0)  # inside an export or a verification, with temp files of the libraries open
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr.splitlines()[-1]
    assert list(tmp.iterdir()) == []  # edgekit-run-*, edgekit-work-*, the quantizers' temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # no --out, no .pkg.partial-*


def test_stale_leftovers_of_a_killed_run_are_swept(defects_data: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp / f"edgekit-run-{dead.pid}-abcd1234", tmp_path / f".pkg.partial-{dead.pid}-0123abcd",
             tmp_path / f".pkg.old-{dead.pid}-0123abce"]
    live = tmp / f"edgekit-run-{os.getpid()}-live0000"  # this test process: alive, started before it
    foreign = [tmp_path / ".pkg.partial-notours", tmp / "edgekit-run-notapid",
               tmp_path / f".other.partial-{dead.pid}-0123abcd"]
    for p in [*stale, live, *foreign]:
        p.mkdir()
        (p / "f").write_text("x")
    r = _cli_env({"TMPDIR": str(tmp)}, "build", BUNDLED_ONNX, "--target", "host-cpu", "--backend", "onnxruntime",
                 "--precision", "fp32", "--calib", defects_data / "calib", "--preprocess", BUNDLED_PREPROCESS,
                 "--out", tmp_path / "pkg", *FAST)
    assert r.code == 0, r.stderr
    assert not any(p.exists() for p in stale)
    assert live.exists() and all(p.exists() for p in foreign)  # only dead runs' folders, only our names


def _cli_env(env: dict, *args: str | Path):
    from conftest import CliResult

    p = subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "COLUMNS": "200", **env}, timeout=900)
    return CliResult(p.returncode, p.stdout, p.stderr)
