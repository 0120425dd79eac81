"""Benchmark: `edgekit plan` wall time here vs on a two-node Ray cluster on loopback (issue 16). Writes
bench/results/cluster-plan.json.

The bundled DefectNet on host-cpu over ONNX Runtime and OpenVINO at FP32/FP16/INT8 (`--objective size`, so both
runs choose alike whatever the timing noise), planned `--rounds` times each way, alternating, each with an empty
build cache (a fresh $EDGEKIT_HOME): locally, and with `--cluster` on a head plus one worker started here on
127.0.0.1 (1 CPU each; tests/cluster/ray_cluster.py). The ratio is what matters, measured side by side. On this
2-core machine the local plan already uses both cores, so the cluster can at best match it: it shows the cost of
the object store and the workers' own imports, not a speedup that only more machines give.

    .venv/bin/python bench/bench_cluster.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "cluster"))


def _plan(home: Path, out: Path, data: Path, env: dict[str, str], cluster: str | None) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "edgekit", "plan", str(REPO / "examples" / "defects" / "defectnet.onnx"),
           "--target", "host-cpu", "--backend", "onnxruntime,openvino", "--calib", str(data / "calib"), "--val",
           str(data / "val"), "--preprocess", str(REPO / "examples" / "defects" / "preprocess.yaml"),
           "--objective", "size", "--out", str(out), "--json", *(["--cluster", cluster] if cluster else [])]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "EDGEKIT_HOME": str(home)}, cwd=REPO)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"plan failed ({r.returncode}): {r.stderr[-2000:]}")
    return seconds, json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cluster-plan.json"))
    args = ap.parse_args(argv)
    from ray_cluster import RayCluster

    from edgekit.zoo.defects_data import generate

    with tempfile.TemporaryDirectory(prefix="ekb", dir="/tmp") as tmp:
        work = Path(tmp)
        data = generate(work / "defects", n_train=0, n_calib=200, n_val=200)
        cluster = RayCluster(work / "ray-nodes")
        (work / "ray-nodes").mkdir()
        t0 = time.perf_counter()
        cluster.start_head()
        cluster.add_worker()
        cluster.wait_for(2)
        startup_s = time.perf_counter() - t0
        runs: dict[str, list[float]] = {"local": [], "cluster": []}
        chosen: dict[str, set[str]] = {"local": set(), "cluster": set()}
        try:
            for i in range(args.rounds):
                for mode in ("local", "cluster"):
                    seconds, result = _plan(work / f"home-{mode}-{i}", work / f"plan-{mode}-{i}.yaml", data,
                                            cluster.env, cluster.address if mode == "cluster" else None)
                    runs[mode].append(round(seconds, 2))
                    chosen[mode].add(result["chosen"])
                    print(f"round {i + 1} {mode}: {seconds:.1f} s, chose {result['chosen']}", file=sys.stderr)
        finally:
            cluster.stop()
    local, remote = statistics.median(runs["local"]), statistics.median(runs["cluster"])
    result = {"bench": "cluster-plan", "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
              "model": "examples/defects/defectnet.onnx", "candidates": "onnxruntime + openvino x fp32/fp16/int8",
              "cluster": "head + 1 worker on 127.0.0.1, 1 CPU each", "cluster_startup_s": round(startup_s, 1),
              "plan_seconds": runs, "median_local_s": local, "median_cluster_s": remote,
              "cluster_vs_local": round(local / remote, 3), "same_choice": chosen["local"] == chosen["cluster"],
              "chosen": sorted(chosen["local"] | chosen["cluster"]),
              "bound": "2 cores: the local plan already uses both; two 1-CPU workers cannot beat it here, they show "
                       "the object store's and the workers' own import costs"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
