"""The typed package model (edgekit/packaging/model.py) on a package really built from the bundled model:
it round-trips manifest.json byte for byte, rebuilds the Artifacts a backend loads, and refuses what is
not a package with one clear line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import build_bundled, read_manifest, run_cli

from edgekit.errors import BadInput
from edgekit.packaging import compare
from edgekit.packaging.manifest import validate_manifest, write_json
from edgekit.packaging.model import (
    ArtifactRecord,
    LatencyRecord,
    Package,
    VerificationRecord,
    load_package,
    manifest_from_bytes,
)
from edgekit.untrusted import UnsafeInput

INT8 = "onnxruntime-int8"


@pytest.fixture(scope="module")
def package(defects_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "defectnet"
    return build_bundled(out, defects_data, "fp32,int8", "--val-samples", "100")


def _copy(package: Path, dest: Path, edit: Any = None) -> Path:
    shutil.copytree(package, dest)
    if edit is not None:
        m = read_manifest(dest)
        edit(m)
        (dest / "manifest.json").write_text(json.dumps(m, indent=2))
    return dest


def _made_in_code(rec: Any) -> Any:
    """The same record as code would make it: no memory of the keys it was read with."""
    if isinstance(rec, list):
        return [_made_in_code(r) for r in rec]
    if not dataclasses.is_dataclass(rec):
        return rec
    changes = {f.name: _made_in_code(getattr(rec, f.name)) for f in dataclasses.fields(rec) if f.name != "_keys"}
    return dataclasses.replace(rec, **changes, _keys=None)


# ---------------------------------------------------------------- round trip


def test_manifest_round_trips_byte_for_byte(package: Path, tmp_path: Path) -> None:
    raw = (package / "manifest.json").read_bytes()
    d = json.loads(raw)
    pkg = load_package(package, complete=True)
    assert pkg.to_dict() == d and json.dumps(pkg.to_dict()) == json.dumps(d)  # same keys, same order
    write_json(tmp_path / "again.json", pkg.to_dict())
    assert (tmp_path / "again.json").read_bytes() == raw
    assert Package.from_dict(pkg.to_dict(), pkg.path, pkg.plan) == pkg
    for a, rec in zip(d["artifacts"], pkg.records, strict=True):
        assert json.dumps(rec.to_dict()) == json.dumps(a)
        assert ArtifactRecord.from_dict(rec.to_dict()) == rec
        # Made in code, a record writes its fields in the order the build writes them.
        assert json.dumps(_made_in_code(rec).to_dict()) == json.dumps(a)
        assert ArtifactRecord.from_dict(_made_in_code(rec).to_dict()) == _made_in_code(rec)


def test_records_hold_the_real_values(package: Path) -> None:
    pkg = load_package(package)
    assert pkg.keys == ["onnxruntime-fp32", INT8] and pkg.passed
    assert pkg.plan is not None and [f"{a['backend']}-{a['precision']}" for a in pkg.plan["artifacts"]] == pkg.keys
    rec = pkg.artifact(INT8)
    assert (rec.backend, rec.precision, rec.entry, rec.folder) == ("onnxruntime", "int8", f"{INT8}/model.onnx", INT8)
    assert [f.path for f in rec.files] == [rec.entry]
    on_disk = (package / rec.entry).read_bytes()
    assert rec.files[0].sha256 == hashlib.sha256(on_disk).hexdigest()
    assert rec.bytes == rec.files[0].bytes == len(on_disk)
    assert isinstance(rec.verification, VerificationRecord) and rec.passed
    assert rec.verification.samples == 100 and 0.99 < rec.verification.cosine_min <= 1.0
    assert [o["name"] for o in rec.verification.outputs] == ["logits"]
    assert isinstance(rec.latency_ms, LatencyRecord) and rec.latency_ms.where.startswith("local:")
    assert rec.latency_ms.runs >= 10 and rec.latency_ms.p50 <= rec.latency_ms.p99
    assert rec.reference_latency_ms.threads == rec.latency_ms.threads
    assert rec.details["format"] == "QDQ" and rec.host_latency_ms is None and rec.extra == {}
    with pytest.raises(BadInput, match=r"no artifact openvino-fp32 in .*; it has onnxruntime-fp32, onnxruntime-int8"):
        pkg.artifact("openvino-fp32")


def test_older_and_newer_fields_survive_a_loose_load(package: Path, tmp_path: Path) -> None:
    """A package of another version: a field missing, one this version does not know; read and written
    again, it is what it was."""
    def edit(m: dict[str, Any]) -> None:
        del m["artifacts"][1]["speedup_vs_onnxruntime_fp32"]
        m["artifacts"][1]["energy_mj"] = {"p50": 1.5, "where": "meter"}
        m["artifacts"][1]["verification"]["new_metric_min"] = 0.5
        m["future"] = [1, 2]

    other = _copy(package, tmp_path / "other", edit)
    d = read_manifest(other)
    pkg = load_package(other)
    rec = pkg.artifact(INT8)
    assert rec.speedup_vs_onnxruntime_fp32 is None and rec.extra == {"energy_mj": {"p50": 1.5, "where": "meter"}}
    assert rec.verification.extra == {"new_metric_min": 0.5}
    assert json.dumps(pkg.to_dict()) == json.dumps(d)


def test_device_latencies_added_as_profile_adds_them(package: Path) -> None:
    """Typed edits write what `edgekit profile --device` writes into the dict today (profiling/device.py's
    update_manifest): host_latency_ms then device_latency_ms at the end, latency_ms replaced in place."""
    d = read_manifest(package)
    device = {"p50": 2.5, "p90": 2.7, "p99": 3.1, "mean": 2.6, "min": 2.4, "runs": 200, "threads": 4,
              "where": "ssh://pi@rpi5", "conditions": {"power_mode": None, "cpu_governor": "performance"}}
    a = d["artifacts"][1]
    a["host_latency_ms"] = a["latency_ms"]
    a["latency_ms"] = a["device_latency_ms"] = device

    pkg = load_package(package)
    updated = pkg.with_device_latencies({INT8: device})
    assert json.dumps(updated.to_dict()) == json.dumps(d)
    validate_manifest(updated.to_dict())
    rec = updated.artifact(INT8)
    assert rec.latency_ms.conditions["cpu_governor"] == "performance" and rec.latency_ms == rec.device_latency_ms
    assert pkg.artifact(INT8).device_latency_ms is None  # the package read first is left as it was
    # Measured again: the host's figure stays the host's, not the first device run's.
    again = updated.with_device_latencies({INT8: {**device, "p50": 2.0}}).artifact(INT8)
    assert again.host_latency_ms == pkg.artifact(INT8).latency_ms and again.latency_ms.p50 == 2.0


# ---------------------------------------------------------------- Artifacts rebuilt from records


def test_to_artifact_loads_and_runs(package: Path) -> None:
    from edgekit import backends

    rec = load_package(package).artifact(INT8)
    art = rec.to_artifact(package)
    assert (art.backend, art.precision, art.files, art.entry) == ("onnxruntime", "int8", ["model.onnx"], "model.onnx")
    assert Path(art.root) == package / INT8 and art.details == rec.details and art.key == INT8
    session = backends.get("onnxruntime").load(art, 1)
    m = read_manifest(package)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in m["inputs"][0]["shape"]]
    (out,) = session.run({m["inputs"][0]["name"]: np.zeros(shape, np.float32)})
    assert out.shape[-1] == m["outputs"][0]["shape"][-1]
    # compare's name for it gives the same Artifact, from a record or its JSON
    pkg = compare.load_package(package)
    assert compare.artifact_of(pkg, rec) == compare.artifact_of(pkg, pkg.artifacts[INT8]) == art
    assert compare.load_package is load_package and compare.Package is Package


def test_to_artifact_refuses_changed_or_missing_files(package: Path, tmp_path: Path) -> None:
    edited = _copy(package, tmp_path / "edited")
    model = edited / INT8 / "model.onnx"
    data = bytearray(model.read_bytes())
    data[1000] ^= 1
    model.write_bytes(bytes(data))
    rec = load_package(edited).artifact(INT8)
    with pytest.raises(BadInput, match=f"{INT8}/model.onnx does not match its sha256 in manifest.json"):
        rec.to_artifact(edited)
    assert rec.to_artifact(edited, check_sha256=False).entry_path == model  # `edgekit debug` looks at edits
    model.unlink()
    with pytest.raises(BadInput, match=f"{INT8} file {INT8}/model.onnx is missing"):
        rec.to_artifact(edited, check_sha256=False)


# ---------------------------------------------------------------- not a package: one clear line


def _one_line(e: pytest.ExceptionInfo[BadInput]) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


def test_folder_without_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(BadInput) as e:
        load_package(tmp_path)
    assert _one_line(e) == (f"{tmp_path} is not an edgekit package (no manifest.json): give a folder written "
                            "by `edgekit build`")
    r = run_cli("package", tmp_path, "--out", tmp_path.parent / "x.zip")
    assert r.code == 2 and "is not an edgekit package (no manifest.json)" in r.error_line()


@pytest.mark.parametrize("damage, says", [
    ("not-json", "not valid JSON"),
    ("a-list", "is not an edgekit manifest (no schema edgekit-manifest/N or artifacts list)"),
    ("no-entry", "an artifact lacks key/backend/precision/entry/files/bytes"),
    ("verification-a-string", "does not match the manifest schema (artifacts[1].verification: 'yes' is not of "
                              "type 'object'"),
])
def test_damaged_manifest(package: Path, tmp_path: Path, damage: str, says: str) -> None:
    bad = _copy(package, tmp_path / "bad")
    m = read_manifest(bad)
    if damage == "not-json":
        text = json.dumps(m)[:-10]
    elif damage == "a-list":
        text = json.dumps([m])
    elif damage == "no-entry":
        del m["artifacts"][0]["entry"]
        text = json.dumps(m)
    else:
        m["artifacts"][1]["verification"] = "yes"
        text = json.dumps(m)
    (bad / "manifest.json").write_text(text)
    with pytest.raises(BadInput) as e:
        load_package(bad)
    assert says in _one_line(e) and str(bad / "manifest.json") in str(e.value)
    with pytest.raises(BadInput) as e:
        manifest_from_bytes(text.encode())
    assert says in _one_line(e)


def test_missing_field_only_refused_when_complete(package: Path, tmp_path: Path) -> None:
    old = _copy(package, tmp_path / "old", lambda m: m["artifacts"][0].pop("verification"))
    rec = load_package(old).artifact("onnxruntime-fp32")  # compare reads older packages
    assert rec.verification is None and not rec.passed and "verification" not in rec.to_dict()
    with pytest.raises(BadInput) as e:
        load_package(old, complete=True)
    assert "(artifacts[0] (onnxruntime-fp32) has no 'verification')" in _one_line(e)


def test_entry_outside_the_package(package: Path, tmp_path: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["artifacts"][1]["entry"] = "../secret/model.onnx"

    bad = _copy(package, tmp_path / "bad", edit)
    with pytest.raises(UnsafeInput) as e:
        load_package(bad)
    assert "'../secret/model.onnx'" in _one_line(e) and "inside itself" in str(e.value)
    with pytest.raises(UnsafeInput):
        manifest_from_bytes((bad / "manifest.json").read_bytes())
