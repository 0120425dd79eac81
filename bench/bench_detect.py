"""Benchmark: detectors judged by mAP, and the INT8 recovery ladder. Writes bench/results/detect-host-cpu.json.

1. The bundled defect detector (examples/detect/defectdet.onnx, YOLOv8 export format) on its generated data
   with labels: uniform INT8 (head quantized too, `--no-detector-head --recover none`) on ONNX Runtime, OpenVINO
   and NCNN, then the same with the ladder (`--recover auto`): every rung's setting, mAP50-95, seconds, and the
   kept artifact's latency ratio to its backend's FP32, measured side by side in the build's interleaved run.
2. `edgekit plan --task detect` over the three CPU backends on the same network at 640x640 input (2.1 GMAC),
   from its PyTorch source: wall time, the chosen candidate, and its speed against the fastest FP32
   candidate of any backend, both from the planner's interleaved run.
3. With `--prune-plan R,R`: `edgekit plan --task detect --prune R,R --train` at the detector's own 160x160, its
   pruned candidates distilled from the original on 800 labelled training images (`--prune-epochs`), every
   candidate judged by mAP50-95 against the labels, pruning and quantization losses together.

    .venv/bin/python bench/bench_detect.py [--backends B,B] [--skip-plan] [--skip-ladder] [--plan-size 640]
    .venv/bin/python bench/bench_detect.py --skip-ladder --skip-plan --prune-plan 0.15,0.25 \
        --out bench/results/detect-prune-plan-host-cpu.json
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
MODEL = REPO / "examples" / "detect" / "defectdet.onnx"
PRE = REPO / "examples" / "detect" / "preprocess.yaml"


def data(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "edgekit.zoo.defect_boxes", str(root), "--train", "0", "--calib", "200",
                    "--val", "200"], check=True, cwd=REPO)
    return root


def _task(a: dict[str, Any]) -> dict[str, Any]:
    t = a["verification"].get("task") or {}
    return {k: t.get(k) for k in ("metric", "value", "reference", "drop_points", "map50", "vs", "passed")}


def build(model: Path, backend: str, ds: Path, out: Path, *extra: str) -> tuple[dict[str, Any], float]:
    cmd = [str(REPO / ".venv" / "bin" / "edgekit"), "build", str(model), "--target", "host-cpu", "--backend", backend,
           "--precision", "fp32,int8", "--calib", str(ds / "calib"), "--val", str(ds / "val"), "--preprocess",
           str(PRE), "--task", "detect", "--out", str(out), "--force", "--no-cache", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=False)
    seconds = time.perf_counter() - t0
    package = out if (out / "manifest.json").is_file() else out.with_name(out.name + ".rejected")
    return json.loads((package / "manifest.json").read_text()), seconds


def ladder(backends: list[str], ds: Path, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for b in backends:
        uniform, s_uniform = build(MODEL, b, ds, tmp / f"{b}-uniform", "--no-detector-head", "--recover", "none")
        recovered, s_rec = build(MODEL, b, ds, tmp / f"{b}-recovered", "--no-detector-head", "--recover", "auto")
        u8 = next(a for a in uniform["artifacts"] if a["precision"] == "int8")
        r8 = next(a for a in recovered["artifacts"] if a["precision"] == "int8")
        fp32 = next(a for a in recovered["artifacts"] if a["precision"] == "fp32")
        rows.append({
            "backend": b,
            "fp32": _task(fp32),
            "uniform_int8": {**_task(u8), "speedup_vs_fp32": u8.get("speedup"), "build_seconds": round(s_uniform, 1)},
            "recovered_int8": {**_task(r8), "speedup_vs_fp32": r8.get("speedup"), "build_seconds": round(s_rec, 1),
                               "kept": (r8.get("quantization") or {}).get("kept"),
                               "rungs": (r8.get("quantization") or {}).get("recovery", [])},
        })
        print(json.dumps(rows[-1], indent=1))
    return rows


def plan(backends: list[str], ds: Path, tmp: Path, size: int) -> dict[str, Any]:
    """The planner on the same network at size x size input (fully convolutional: 0.133 GMAC at 160, 2.1 at
    640), from its PyTorch source (so the QAT rung needs no ONNX -> torch conversion), with the labels
    (normalised, so they hold at any input size; the images are upscaled by the preprocessing)."""
    out = tmp / "plan.yaml"
    pre = tmp / f"preprocess-{size}.yaml"
    pre.write_text(PRE.read_text().replace("size: [160, 160]", f"size: [{size}, {size}]"))
    assert f"[{size}, {size}]" in pre.read_text()
    cmd = [str(REPO / ".venv" / "bin" / "edgekit"), "plan", "--model", "edgekit.zoo.defectdet:defectdet",
           "--weights", str(MODEL.with_suffix(".pt")), "--input-shape", f"images=1,3,{size},{size}",
           "--target", "host-cpu", "--backend", ",".join(backends), "--calib", str(ds / "calib"), "--val",
           str(ds / "val"), "--preprocess", str(pre), "--task", "detect", "--out", str(out), "--json",
           "--calib-samples", "100", "--val-samples", "100"]
    return _planned(cmd, size)


def prune_plan(backends: list[str], tmp: Path, ratios: str, epochs: int) -> dict[str, Any]:
    """The planner with pruned candidates at 160x160 (the size the detector was trained at, mAP50-95 60 on the
    labels), each distilled for `epochs` on 800 labelled training images (none of them validation images)."""
    ds = tmp / "prune-data"
    subprocess.run([sys.executable, "-m", "edgekit.zoo.defect_boxes", str(ds), "--train", "800", "--calib", "128",
                    "--val", "200"], check=True, cwd=REPO)
    cmd = [str(REPO / ".venv" / "bin" / "edgekit"), "plan", "--model", "edgekit.zoo.defectdet:defectdet",
           "--weights", str(MODEL.with_suffix(".pt")), "--input-shape", "images=1,3,160,160",
           "--target", "host-cpu", "--backend", ",".join(backends), "--calib", str(ds / "calib"), "--val",
           str(ds / "val"), "--train", str(ds / "train"), "--preprocess", str(PRE), "--task", "detect",
           "--prune", ratios, "--epochs", str(epochs), "--augment", "dihedral", "--out", str(tmp / "prune-plan.yaml"),
           "--json"]  # dihedral: defects on a surface have no orientation (the detector was trained so)
    return _planned(cmd, 160) | {"prune": ratios, "epochs": epochs}


def _planned(cmd: list[str], size: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    payload = _last_json(proc.stdout)
    cands = payload.get("candidates", [])
    chosen = next((c for c in cands if c.get("chosen")), None)
    fp32 = [c for c in cands if c["precision"] == "fp32" and c.get("measured_ms")]
    fastest_fp32 = min(fp32, key=lambda c: c["measured_ms"]) if fp32 else None
    speedup = (fastest_fp32["measured_ms"] / chosen["measured_ms"]
               if chosen and fastest_fp32 and chosen.get("measured_ms") else None)
    return {"input": [size, size], "wall_seconds": round(wall, 1),
            "exit_code": proc.returncode, "chosen": chosen and chosen["key"],
            "chosen_task": chosen and chosen.get("task"), "fastest_fp32": fastest_fp32 and fastest_fp32["key"],
            "speedup_vs_fastest_fp32": None if speedup is None else round(speedup, 3),
            **_vs_original(chosen, fp32),
            "command": " ".join(Path(c).name if c.startswith(str(REPO)) else c for c in cmd),
            "candidates": [{k: c.get(k) for k in ("key", "measured_ms", "task", "verdict", "reason")} for c in cands],
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def _vs_original(chosen: dict[str, Any] | None, fp32: list[dict[str, Any]]) -> dict[str, Any]:
    """With pruned candidates: the choice against the fastest FP32 of the model as given (what ships without
    edgekit's compression), beside the figure above, which counts the pruned FP32 candidates too. The pruned
    candidates were timed in their own build with the original model, and scaled onto the first build's rounds
    through it (planning/search.py)."""
    original = [c for c in fp32 if not c["key"].startswith("prune")]
    if len(original) == len(fp32) or not chosen or not chosen.get("measured_ms") or not original:
        return {}
    fastest = min(original, key=lambda c: c["measured_ms"])
    return {"fastest_fp32_of_the_original": fastest["key"],
            "speedup_vs_fastest_fp32_of_the_original": round(fastest["measured_ms"] / chosen["measured_ms"], 3)}


def _last_json(text: str) -> dict[str, Any]:
    try:
        return json.loads(text)  # --json prints exactly one document
    except json.JSONDecodeError:
        pass
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="onnxruntime,openvino,ncnn")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--skip-ladder", action="store_true")
    ap.add_argument("--plan-size", type=int, default=640, help="input size of the planned detector (640: 2.1 GMAC)")
    ap.add_argument("--prune-plan", default="", help="pruning ratios of the planned pruned candidates: 0.15,0.25")
    ap.add_argument("--prune-epochs", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "detect-host-cpu.json"))
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-detect-") as t:
        tmp = Path(t)
        ds = data(tmp / "data")
        from edgekit.targets import detect_host

        cpu = detect_host()["cpu"]
        result: dict[str, Any] = {"model": str(MODEL.relative_to(REPO)), "host": platform.node(),
                                  "python": platform.python_version(),
                                  "cpu": {k: cpu.get(k) for k in ("model", "cores", "isa")}}
        if not args.skip_ladder:
            result["ladder"] = ladder(backends, ds, tmp)
        if not args.skip_plan:
            result["plan"] = plan(backends, ds, tmp, args.plan_size)
        if args.prune_plan:
            result["prune_plan"] = prune_plan(backends, tmp, args.prune_plan, args.prune_epochs)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
