"""Benchmark: a second identical build against the first (the build cache). Writes
bench/results/rebuild-host-cpu.json.

The README's demo build of the bundled DefectNet (every backend, FP32/FP16/INT8) runs twice with an empty
cache ($EDGEKIT_HOME in a temporary folder), then once more after the calibration data changed (only the
stages that depend on it rerun). Wall times of the whole `edgekit build` command, and whether the
artifacts' sha256 are identical.

    .venv/bin/python bench/bench_rebuild.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _build(env: dict[str, str], out: Path, calib: Path, val: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "edgekit", "build", str(REPO / "examples" / "defects" / "defectnet.onnx"),
           "--target", "host-cpu", "--backend", "all", "--precision", "fp32,fp16,int8", "--calib", str(calib),
           "--val", str(val), "--preprocess", str(REPO / "examples" / "defects" / "preprocess.yaml"),
           "--out", str(out), "--force"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((out / "manifest.json").read_text())


def _hashes(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for a in manifest["artifacts"] for f in a["files"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO / "calibration" / "defects"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "rebuild-host-cpu.json"))
    args = ap.parse_args(argv)

    from edgekit.zoo.defects_data import generate

    data = generate(Path(args.data))
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-rebuild-") as tmp:
        env = {**os.environ, "EDGEKIT_HOME": str(Path(tmp) / "home")}
        first_s, first = _build(env, Path(tmp) / "a", data / "calib", data / "val")
        second_s, second = _build(env, Path(tmp) / "b", data / "calib", data / "val")
        # Half the calibration images: INT8 depends on them, FP32/FP16 do not.
        fewer = Path(tmp) / "calib-half"
        for cls in sorted(p for p in (data / "calib").iterdir() if p.is_dir()):
            (fewer / cls.name).mkdir(parents=True)
            for img in sorted(cls.iterdir())[::2]:
                shutil.copyfile(img, fewer / cls.name / img.name)
        third_s, third = _build(env, Path(tmp) / "c", fewer, data / "val")

    changed = sorted(k for k, v in _hashes(third).items() if _hashes(first).get(k) != v)
    report = {
        "benchmark": "rebuild-host-cpu",
        "command": "edgekit build defectnet.onnx --target host-cpu --backend all --precision fp32,fp16,int8 ...",
        "first_build_s": round(first_s, 2),
        "second_build_s": round(second_s, 2),
        "speedup_second_vs_first": round(first_s / second_s, 2),
        "identical_artifact_hashes": _hashes(first) == _hashes(second),
        "second_build_reused": second["cache"]["reused"],
        "changed_calibration_build_s": round(third_s, 2),
        "changed_calibration_reused": third["cache"]["reused"],
        "changed_calibration_files_that_differ": changed,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if "reused" not in k}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
