"""`edgekit package`: deterministic archives of a package, and --verify / --extract refusing hostile
or tampered archives, through the CLI a user runs."""

from __future__ import annotations

import io
import json
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import build_bundled, read_manifest, run_cli

from edgekit.packaging.archive import ArchiveLimits as Limits
from edgekit.packaging.archive import UnsafeArchive, safe_name, verify_archive

ARTIFACT = "onnxruntime-int8/model.onnx"


@pytest.fixture(scope="module")
def package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "defectnet"
    return build_bundled(out, defects_data, "fp32,int8")


@pytest.fixture(scope="module")
def archives(package: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("arch")
    made = {}
    for fmt in ("zip", "tar.gz"):
        r = run_cli("package", package, "--format", fmt, "--out", d / f"pkg.{fmt}")
        assert r.code == 0, r.stderr
        made[fmt] = d / f"pkg.{fmt}"
    return made


def _copy_zip(src: Path, dst: Path, change: dict[str, bytes] | None = None,
              extra: list[tuple[zipfile.ZipInfo | str, bytes]] | None = None) -> Path:
    """src's entries into dst, some replaced, some added: how an attacker would edit one."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, (change or {}).get(info.filename, zin.read(info)))
        for info, data in extra or []:
            zout.writestr(info, data)
    return dst


def _copy_tar(src: Path, dst: Path, extra: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin:
            tout.addfile(m, tin.extractfile(m))
        for info, data in extra:
            info.size = len(data) if info.isreg() else 0
            tout.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return dst


def _flip_byte(data: bytes, at: int = 1000) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


# ---------------------------------------------------------------- writing


def test_round_trip_verifies_and_lists_every_file(package: Path, archives: dict[str, Path]) -> None:
    for fmt, path in archives.items():
        r = run_cli("package", "--verify", path, "--json")
        assert r.code == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["ok"] and doc["problems"] == [] and doc["format"] == fmt
        expected = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())
        assert doc["files_checked"] == len(expected) + 1  # + CHECKSUMS.sha256
        assert {"manifest.json", "labels.txt", "preprocess.yaml", "plan.yaml", "report.md", ARTIFACT} <= set(expected)
    with zipfile.ZipFile(archives["zip"]) as zf:
        names = zf.namelist()
        assert names == sorted(names) and "CHECKSUMS.sha256" in names
        lines = zf.read("CHECKSUMS.sha256").decode().splitlines()
        assert len(lines) == len(names) - 1 and all(ln[64:66] == "  " for ln in lines)  # sha256sum -c format
        assert {(i.external_attr >> 16) & 0o777 for i in zf.infolist()} == {0o644}


def test_same_package_gives_the_same_bytes(package: Path, archives: dict[str, Path], tmp_path: Path) -> None:
    for fmt, first in archives.items():
        again = tmp_path / f"again.{fmt}"
        r = run_cli("package", package, "--out", again, "--json")  # the format from the name
        assert r.code == 0, r.stderr
        assert json.loads(r.stdout)["sha256"] == json.loads(run_cli("package", "--verify", first, "--json").stdout)[
            "sha256"]
        assert again.read_bytes() == first.read_bytes(), fmt
    # extracted and archived again: still the same bytes (CHECKSUMS.sha256 is regenerated, not doubled)
    r = run_cli("package", "--extract", archives["tar.gz"], tmp_path / "x")
    assert r.code == 0, r.stderr
    assert run_cli("package", tmp_path / "x", "--out", tmp_path / "x.tar.gz").code == 0
    assert (tmp_path / "x.tar.gz").read_bytes() == archives["tar.gz"].read_bytes()


def test_refuses_existing_out_and_rejected_build(package: Path, archives: dict[str, Path], tmp_path: Path) -> None:
    r = run_cli("package", package, "--out", archives["zip"])
    assert r.code == 2 and "--force" in r.error_line()
    rejected = tmp_path / "rejected"
    shutil.copytree(package, rejected)
    m = read_manifest(rejected)
    m["passed"] = False
    (rejected / "manifest.json").write_text(json.dumps(m))
    r = run_cli("package", rejected, "--out", tmp_path / "r.zip")
    assert r.code == 2 and "rejected" in r.error_line() and not (tmp_path / "r.zip").exists()
    r = run_cli("package", rejected, "--out", tmp_path / "r.zip", "--allow-rejected")
    assert r.code == 0, r.stderr
    assert run_cli("package", "--verify", tmp_path / "r.zip").code == 1  # verify refuses it too, unless asked
    assert run_cli("package", "--verify", tmp_path / "r.zip", "--allow-rejected").code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_artifact_changed_after_the_build_is_not_sealed(package: Path, tmp_path: Path) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(package, edited)
    (edited / ARTIFACT).write_bytes(_flip_byte((edited / ARTIFACT).read_bytes()))
    r = run_cli("package", edited, "--out", tmp_path / "e.zip")
    assert r.code == 1 and ARTIFACT in r.error_line() and not (tmp_path / "e.zip").exists()


# ---------------------------------------------------------------- tampered (exit 1)


def test_tampered_artifact_is_refused_naming_it(archives: dict[str, Path], tmp_path: Path) -> None:
    with zipfile.ZipFile(archives["zip"]) as zf:
        data = zf.read(ARTIFACT)
    bad = _copy_zip(archives["zip"], tmp_path / "tampered.zip", change={ARTIFACT: _flip_byte(data)})
    r = run_cli("package", "--verify", bad)
    assert r.code == 1 and ARTIFACT in r.error_line() and "CHECKSUMS.sha256" in r.error_line()
    doc = json.loads(run_cli("package", "--verify", bad, "--json").stdout)
    assert not doc["ok"] and doc["exit_code"] == 1
    assert any(ARTIFACT in p and "manifest.json" in p for p in doc["problems"])  # the manifest cross-check too


def test_checksums_rewritten_still_caught_by_the_manifest(archives: dict[str, Path], tmp_path: Path) -> None:
    import hashlib

    with zipfile.ZipFile(archives["zip"]) as zf:
        data = _flip_byte(zf.read(ARTIFACT))
        sums = zf.read("CHECKSUMS.sha256").decode()
    line = next(ln for ln in sums.splitlines() if ln.endswith(ARTIFACT))
    sums = sums.replace(line, f"{hashlib.sha256(data).hexdigest()}  {ARTIFACT}")
    bad = _copy_zip(archives["zip"], tmp_path / "t.zip", change={ARTIFACT: data, "CHECKSUMS.sha256": sums.encode()})
    r = run_cli("package", "--verify", bad)
    assert r.code == 1 and ARTIFACT in r.error_line() and "manifest.json" in r.error_line()


def test_unlisted_and_missing_files(archives: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy_zip(archives["zip"], tmp_path / "extra.zip", extra=[("onnxruntime-int8/extra.bin", b"x")])
    r = run_cli("package", "--verify", bad)
    assert r.code == 1 and "onnxruntime-int8/extra.bin is not listed" in r.error_line()
    with zipfile.ZipFile(archives["zip"]) as zin, zipfile.ZipFile(tmp_path / "missing.zip", "w") as zout:
        for info in zin.infolist():
            if info.filename != "labels.txt":
                zout.writestr(info, zin.read(info))
    r = run_cli("package", "--verify", tmp_path / "missing.zip")
    assert r.code == 1 and "labels.txt is listed in CHECKSUMS.sha256 but missing" in r.error_line()


# ---------------------------------------------------------------- unsafe (exit 2)


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(("entry", "why"), [
    ("../evil", "'..'"),
    ("/tmp/evil", "absolute"),
    ("onnxruntime-int8/../../evil", "'..'"),
    ("..\\evil", "backslash"),
    ("C:/evil", "drive letter"),
    ("evil\n.txt", "control character"),
])
def test_unsafe_names_are_refused(archives: dict[str, Path], tmp_path: Path, entry: str, why: str) -> None:
    bad = _copy_zip(archives["zip"], tmp_path / "bad.zip", extra=[(entry, b"owned")])
    r = run_cli("package", "--verify", bad)
    assert r.code == 2, r.stderr
    assert repr(entry) in r.error_line() and why in r.error_line()


def test_zip_symlink_duplicates_and_entry_count(archives: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy_zip(archives["zip"], tmp_path / "link.zip", extra=[_symlink("evil", "/etc/passwd")])
    r = run_cli("package", "--verify", bad)
    assert r.code == 2 and "'evil'" in r.error_line() and "symbolic link" in r.error_line()
    with pytest.warns(UserWarning):  # zipfile itself warns: the attack writes it anyway
        bad = _copy_zip(archives["zip"], tmp_path / "dup.zip", extra=[("labels.txt", b"x")])
    r = run_cli("package", "--verify", bad)
    assert r.code == 2 and "duplicate entry 'labels.txt'" in r.error_line()
    bad = _copy_zip(archives["zip"], tmp_path / "case.zip", extra=[("Labels.TXT", b"x")])
    assert "case-insensitive" in run_cli("package", "--verify", bad).error_line()
    r = run_cli("package", "--verify", archives["zip"], "--max-entries", "3")
    assert r.code == 2 and "--max-entries" in r.error_line()


def test_zip_bomb_is_refused_while_inflating(archives: dict[str, Path], tmp_path: Path) -> None:
    bomb = _copy_zip(archives["zip"], tmp_path / "bomb.zip", extra=[("onnxruntime-int8/pad.bin", bytes(50 << 20))])
    assert bomb.stat().st_size < archives["zip"].stat().st_size + (1 << 20)  # 50 MiB in well under 1 MiB
    r = run_cli("package", "--verify", bomb)
    assert r.code == 2 and "'onnxruntime-int8/pad.bin'" in r.error_line() and "ratio" in r.error_line()
    r = run_cli("package", "--verify", bomb, "--max-file-size", "4M", "--max-ratio", "100000")
    assert r.code == 2 and "per-file limit" in r.error_line()
    r = run_cli("package", "--verify", bomb, "--max-total-size", "20M", "--max-ratio", "100000")
    assert r.code == 2 and "total limit" in r.error_line()


def test_zip_header_that_lies_about_the_size(archives: dict[str, Path], tmp_path: Path) -> None:
    """Headers claiming 1 KiB for a 5 MiB member: reading stops at what was counted, the header is never trusted."""
    bad = _copy_zip(archives["zip"], tmp_path / "lie.zip", extra=[("z.bin", bytes(5 << 20))])
    with zipfile.ZipFile(bad) as zf:
        local = zf.getinfo("z.bin").header_offset
    raw = bytearray(bad.read_bytes())
    central = raw.rindex(b"z.bin") - 46  # the central directory record's fixed part precedes the name
    for at in (local + 22, central + 24):  # uncompressed size in the local header / central record
        assert int.from_bytes(raw[at:at + 4], "little") == 5 << 20
        raw[at:at + 4] = (1024).to_bytes(4, "little")
    bad.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match=r"z\.bin"):
        verify_archive(bad, Limits(max_ratio=1e9, max_file_bytes=4 << 20))
    r = run_cli("package", "--verify", bad, "--max-ratio", "1e9", "--max-file-size", "4M")
    assert r.code == 2 and "z.bin" in r.error_line()


def test_tar_gz_traversal_and_links(archives: dict[str, Path], tmp_path: Path) -> None:
    evil = tarfile.TarInfo("../evil")
    r = run_cli("package", "--verify", _copy_tar(archives["tar.gz"], tmp_path / "t1.tar.gz", [(evil, b"owned")]))
    assert r.code == 2 and "'../evil'" in r.error_line()
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    r = run_cli("package", "--verify", _copy_tar(archives["tar.gz"], tmp_path / "t2.tar.gz", [(link, b"")]))
    assert r.code == 2 and "'evil'" in r.error_line() and "symbolic link" in r.error_line()
    hard = tarfile.TarInfo("hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "manifest.json"
    r = run_cli("package", "--verify", _copy_tar(archives["tar.gz"], tmp_path / "t3.tar.gz", [(hard, b"")]))
    assert r.code == 2 and "hard link" in r.error_line()
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.CHRTYPE
    r = run_cli("package", "--verify", _copy_tar(archives["tar.gz"], tmp_path / "t4.tar.gz", [(dev, b"")]))
    assert r.code == 2 and "'dev'" in r.error_line()
    absolute = tarfile.TarInfo("/tmp/evil")
    r = run_cli("package", "--verify", _copy_tar(archives["tar.gz"], tmp_path / "t5.tar.gz", [(absolute, b"x")]))
    assert r.code == 2 and "absolute" in r.error_line()


def test_tar_gz_bomb(archives: dict[str, Path], tmp_path: Path) -> None:
    pad = tarfile.TarInfo("pad.bin")
    bomb = _copy_tar(archives["tar.gz"], tmp_path / "b.tar.gz", [(pad, bytes(50 << 20))])
    r = run_cli("package", "--verify", bomb)
    assert r.code == 2 and "ratio" in r.error_line()
    r = run_cli("package", "--verify", bomb, "--max-file-size", "4M", "--max-ratio", "100000")
    assert r.code == 2 and "'pad.bin'" in r.error_line() and "4,194,304" in r.error_line()


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    r = run_cli("package", "--verify", tmp_path / "x.zip")
    assert r.code == 2 and "malformed" in r.error_line()
    (tmp_path / "y.zip").write_text("hello")
    assert "not a zip or tar.gz" in run_cli("package", "--verify", tmp_path / "y.zip").error_line()


def test_safe_name() -> None:
    assert safe_name("a/./b") == "a/b" and safe_name("./") is None and safe_name("dir/") == "dir"
    for bad in ("", "/a", "a/../../b", "a\\b", "c:x", "a\x00b"):
        with pytest.raises(ValueError):
            safe_name(bad)


# ---------------------------------------------------------------- extract


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_extract_writes_only_into_dest(package: Path, archives: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for fmt, path in archives.items():
        dest = work / f"dest-{fmt}"
        r = run_cli("package", "--extract", path, dest, "--json")
        assert r.code == 0, r.stderr
        assert json.loads(r.stdout)["dest"] == str(dest.resolve())
        assert _tree(dest) == _tree(package) | {"CHECKSUMS.sha256"}
        assert (dest / ARTIFACT).read_bytes() == (package / ARTIFACT).read_bytes()
    assert sorted(p.name for p in work.iterdir()) == ["dest-tar.gz", "dest-zip"]  # no staging left over
    r = run_cli("package", "--extract", archives["zip"], work / "dest-zip")
    assert r.code == 2 and "--force" in r.error_line()


def test_extract_of_a_hostile_archive_writes_nothing(archives: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    bad_zip = _copy_zip(archives["zip"], tmp_path / "bad.zip", extra=[("../evil", b"owned")])
    bad_tar = _copy_tar(archives["tar.gz"], tmp_path / "bad.tar.gz", [(tarfile.TarInfo("../evil"), b"owned")])
    with zipfile.ZipFile(archives["zip"]) as zf:
        data = zf.read(ARTIFACT)
    tampered = _copy_zip(archives["zip"], tmp_path / "tampered.zip", change={ARTIFACT: _flip_byte(data)})
    for bad, code in ((bad_zip, 2), (bad_tar, 2), (tampered, 1)):
        r = run_cli("package", "--extract", bad, work / "inner" / "dest")
        assert r.code == code, r.stderr
        assert _tree(work) == {"inner"}, bad  # no DEST, no staging, no ../evil beside it
    assert not (tmp_path / "evil").exists()
