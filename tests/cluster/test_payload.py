"""What a cluster task is sent besides the model: --train (a file or a folder) packed on the driver and unpacked on
the node under its own name, and nothing unpacked outside the task's folder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from edgekit.cluster.candidates import _pack_path, _unpack
from edgekit.errors import EdgekitError


def test_a_training_folder_and_file_arrive_whole_under_their_own_name(tmp_path: Path) -> None:
    train = tmp_path / "train"
    (train / "images").mkdir(parents=True)
    (train / "labels").mkdir()
    for i in range(3):
        (train / "images" / f"{i}.png").write_bytes(bytes([i]) * (100 + i))
        (train / "labels" / f"{i}.txt").write_text(f"0 0.5 0.5 0.{i + 1} 0.2\n")
    (train / "link.png").symlink_to(train / "images" / "0.png")  # links stay behind: only plain files travel
    npz = tmp_path / "train.npz"
    npz.write_bytes(b"PK" + b"\0" * 64)
    node = tmp_path / "node"
    for src in (train, npz):
        _unpack(_pack_path(src), node)
    got = sorted(p.relative_to(node / "train").as_posix() for p in (node / "train").rglob("*") if p.is_file())
    assert got == [f"images/{i}.png" for i in range(3)] + [f"labels/{i}.txt" for i in range(3)]
    assert all((node / "train" / g).read_bytes() == (train / g).read_bytes() for g in got)
    assert (node / "train.npz").read_bytes() == npz.read_bytes()


def test_a_member_that_leaves_the_folder_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(EdgekitError, match="unsafe path"):
        _unpack(buf.getvalue(), tmp_path / "node")
    assert not (tmp_path / "outside.txt").exists()
