"""Benchmark: device-pool throughput with one and two devices (issue 16). Writes bench/results/device-pool.json.

Two sshd "devices" on 127.0.0.1 (tests/profiling/test_devices.py's Sshd, throwaway keys), six copies of a small
package (ONNX Runtime and NCNN at FP32/INT8: four artifacts), `edgekit profile ... --once` (each package measured
once, on whichever device is free): with dev-a alone, with dev-a and dev-b (threads here), and with both through a
Ray cluster of this process's own (`--cluster local`). The configurations alternate, `--rounds` times each;
throughput is jobs per second of the whole command (startup, probes, copies and clean-up included).

What this machine bounds: the two "devices" are this machine's own 2 cores, so two devices can at best double the
throughput, and the runners use one thread each (`--threads 1`; two runners spinning two threads each on two cores
slow each other down by orders of magnitude). Real boards are separate machines: there the pool's limit is the
driver's ssh connections, not the boards' cores.

    .venv/bin/python bench/bench_device_pool.py [--rounds 3] [--packages 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for folder in ("tests", "tests/profiling", "tests/backends"):
    sys.path.insert(0, str(REPO / folder))

SETTINGS = ["--seconds", "0.5", "--min-runs", "20", "--warmup", "5", "--threads", "1"]
CONFIGS = {"1 device": ["--devices", "dev-a"], "2 devices": ["--devices", "dev-a,dev-b"],
           "2 devices, --cluster local": ["--devices", "dev-a,dev-b", "--cluster", "local"]}


def _profile(pkgs: list[Path], extra: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgekit", "profile", *map(str, pkgs), "--once", *extra, *SETTINGS,
                        "--json"], capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"profile failed ({r.returncode}): {r.stderr[-2000:]}")
    return seconds, json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--packages", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "device-pool.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ekp", dir="/tmp") as tmp:
        root = Path(tmp)
        os.environ["EDGEKIT_HOME"], os.environ["EDGEKIT_PROFILES"] = str(root / "home"), str(root / "profiles")
        from test_device_pool import build_tiny_package
        from test_devices import Sshd, _add

        servers = []
        for name in ("a", "b"):
            (root / f"sshd-{name}").mkdir()
            servers.append(Sshd(root / f"sshd-{name}"))
            _add(servers[-1], root, f"dev-{name}")
        (root / "build").mkdir()
        built = build_tiny_package(root / "build")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        seconds: dict[str, list[float]] = {c: [] for c in CONFIGS}
        busy: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        load = []
        try:
            for i in range(args.rounds):
                for c, (config, extra) in enumerate(CONFIGS.items()):
                    pkgs = [Path(shutil.copytree(built, root / f"r{i}-c{c}-{k}"))
                            for k in range(args.packages)]
                    s, doc = _profile(pkgs, extra, env)
                    jobs = doc["run"]["jobs"]
                    assert len(jobs) == args.packages and all(j["error"] is None for j in jobs), jobs
                    seconds[config].append(round(s, 2))
                    busy[config].append(doc["run"]["busy_s"])
                    load.append(os.getloadavg()[0])
                    print(f"round {i + 1} {config}: {s:.1f} s ({args.packages / s:.2f} jobs/s)", file=sys.stderr)
        finally:
            for s in servers:
                s.stop()
    median = {c: statistics.median(v) for c, v in seconds.items()}
    rate = {c: round(args.packages / m, 3) for c, m in median.items()}
    result = {"bench": "device-pool", "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                                               "load_avg_1m_max": round(max(load), 2)},
              "package": "small conv model: onnxruntime + ncnn x fp32/int8 (4 artifacts)", "packages": args.packages,
              "settings": " ".join(SETTINGS), "mode": "--once (each package on the first free device)",
              "seconds": seconds, "median_s": median, "jobs_per_s": rate,
              "two_vs_one": round(rate["2 devices"] / rate["1 device"], 3),
              "cluster_two_vs_one": round(rate["2 devices, --cluster local"] / rate["1 device"], 3),
              "device_busy_s": busy,
              "bound": "the two loopback devices share this machine's 2 cores: at most 2x; one runtime thread per "
                       "runner. Ray's local cluster adds its start-up (a few seconds) to the run"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
