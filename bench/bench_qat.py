"""Benchmark: a model only quantization-aware training recovers. Writes bench/results/qat-host-cpu.json.

edgekit.zoo.outlier_blocks (four blocks, each with activations whose per-tensor INT8 scale is set by channels the
next layer ignores; labels are the FP32 model's confident top-1) built for host-cpu at FP32 and INT8 with the ladder
(`--recover auto --train train.npz --qat-epochs 30`) on ONNX Runtime and OpenVINO, and without `--train` for
comparison (the QAT rung then trains its default 3 epochs on the 128 calibration samples, and misses too): every
rung's setting, accuracy and seconds, the kept artifact's latency ratio to its
backend's FP32 (the build's interleaved run), and the build's wall time.

    .venv/bin/python bench/bench_qat.py [--backends B,B] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def build(data: Path, out: Path, backends: str, *extra: str) -> tuple[dict[str, Any], float, int]:
    cmd = [str(REPO / ".venv" / "bin" / "edgekit"), "build", str(data / "outlier_blocks.onnx"), "--target",
           "host-cpu", "--backend", backends, "--precision", "fp32,int8", "--calib", str(data / "calib.npz"),
           "--val", str(data / "val.npz"), "--out", str(out), "--force", "--no-cache", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    package = out if (out / "manifest.json").is_file() else out.with_name(out.name + ".rejected")
    return json.loads((package / "manifest.json").read_text()), seconds, proc.returncode


def rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for a in manifest["artifacts"]:
        if a["precision"] != "int8":
            continue
        q, t = a.get("quantization") or {}, a["verification"].get("task") or {}
        out.append({"backend": a["backend"], "passed": a["verification"]["passed"], "accuracy": t.get("value"),
                    "fp32_accuracy": t.get("reference"), "drop_points": t.get("drop_points"),
                    "speedup_vs_fp32": a.get("speedup"), "kept": q.get("kept"), "rungs": q.get("recovery", [])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "qat-host-cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-qat-") as t:
        tmp = Path(t)
        subprocess.run([sys.executable, "-m", "edgekit.zoo.outlier_blocks", str(tmp / "data")], check=True, cwd=REPO)
        ptq, s_ptq, rc_ptq = build(tmp / "data", tmp / "ptq", args.backends)
        qat, s_qat, rc_qat = build(tmp / "data", tmp / "qat", args.backends, "--train", str(tmp / "data" / "train.npz"),
                                   "--qat-epochs", str(args.epochs))
    result = {"model": "edgekit.zoo.outlier_blocks (4 blocks, 10 quantizable layers)", "host": platform.node(),
              "python": platform.python_version(), "validation_samples": 256,
              "without_train": {"qat": "default 3 epochs on the 128 calibration samples",
                                "exit_code": rc_ptq, "wall_seconds": round(s_ptq, 1), "int8": rows(ptq)},
              "with_qat": {"exit_code": rc_qat, "wall_seconds": round(s_qat, 1), "qat_epochs": args.epochs,
                           "int8": rows(qat)}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
