from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from edgekit.errors import BadInput
from edgekit.targets import load_all, load_target

REQUIRED = ["host-cpu", "intel-cpu-avx2", "intel-cpu-vnni", "jetson-nano", "jetson-xavier-nx", "jetson-orin-nano",
            "jetson-agx-orin", "rpi4", "rpi5", "rk3588", "android-arm64"]


def test_every_required_target_loads_with_consistent_tables() -> None:
    targets = {t.name: t for t in load_all()}
    assert set(REQUIRED) <= set(targets)
    for t in targets.values():
        assert t.backends and t.precisions
        assert all(t.peak_tops[p] > 0 and t.channel_multiple[p] >= 1 for p in t.precisions)
        assert t.memory["bandwidth_gbps"] > 0 and t.memory["size_gb"] > 0


def test_hardware_facts() -> None:
    assert "int8" not in load_target("jetson-nano").precisions
    assert load_target("jetson-nano").runtimes["tensorrt"].startswith("8.2")
    orin = load_target("jetson-agx-orin")
    assert orin.peak_tops["int8"] == pytest.approx(2 * orin.peak_tops["fp16"])
    orin_nano = load_target("jetson-orin-nano").channel_multiple
    assert (orin_nano["fp16"], orin_nano["int8"]) == (8, 16)  # tensor-core tiles
    assert load_target("rpi4").channel_multiple["fp16"] == 4  # ARMv8.0: no fp16 arithmetic, pack4
    assert load_target("rpi5").channel_multiple["fp16"] == 8  # ARMv8.2: fp16 arithmetic, pack8
    assert load_target("rpi4").backends[0] == "ncnn"
    assert load_target("intel-cpu-vnni").backends[0] == "openvino"


def test_host_cpu_is_read_from_this_machine() -> None:
    import os

    host = load_target("host-cpu")
    assert host.is_host
    assert host.cpu["cores"] == len(os.sched_getaffinity(0))
    flags = Path("/proc/cpuinfo").read_text()
    assert ("avx2" in host.cpu["isa"]) == (" avx2" in flags)
    assert host.peak_tops["fp32"] > 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(frequency=3), "unknown key 'frequency'"),
        (lambda d: d.pop("runtimes"), "missing key 'runtimes'"),
        (lambda d: d["memory"].pop("bandwidth_gbps"), "missing key 'memory.bandwidth_gbps'"),
        (lambda d: d["memory"].update(speed=1), "unknown key 'memory.speed'"),
        (lambda d: d["channel_multiple"].pop("fp16"), "'channel_multiple' lacks an entry for precision(s) fp16"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path: Path, edit, message: str) -> None:
    data = yaml.safe_load((REPO / "targets" / "rpi4.yaml").read_text())
    edit(data)
    path = tmp_path / "rpi4.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput) as e:
        load_target(str(path))
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_targets_table_and_show(tmp_path: Path) -> None:
    r = run_cli("targets")
    assert r.code == 0
    for name in REQUIRED:
        assert name in r.stdout
    r = run_cli("targets", "show", "jetson-nano")
    assert r.code == 0
    shown = yaml.safe_load(r.stdout)
    assert shown["precisions"] == ["fp32", "fp16"] and shown["gpu"]["compute_capability"] == "5.3"


def test_unknown_target_lists_known_ones() -> None:
    r = run_cli("targets", "show", "jetson-nanoo")
    assert r.code == 2
    line = r.error_line()
    assert "unknown target 'jetson-nanoo'" in line and "jetson-nano" in line and "rpi5" in line


def test_target_search_path_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(REPO / "targets" / "rpi5.yaml", tmp_path / "rpi5.yaml")
    data = yaml.safe_load((tmp_path / "rpi5.yaml").read_text())
    data["name"] = "my-board"
    (tmp_path / "my-board.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path))
    assert load_target("my-board").peak_tops == load_target("rpi5").peak_tops
