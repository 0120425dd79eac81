"""`edgekit profile PACKAGE --device NAME`: measure a package's artifacts on a device over SSH; also
what `edgekit build --device` uses to measure the package it just wrote."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from edgekit.console import emit, err, out
from edgekit.errors import EdgekitError
from edgekit.packaging.model import load_package

VERB = "profile"
ORDER = 60


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure packages' artifacts on devices over SSH (one, or a pool)")
    p.add_argument("package", metavar="PACKAGE", nargs="+", help="package folders (edgekit build --out)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="a name from `edgekit devices list`")
    where.add_argument("--devices", metavar="A,B,...", help="a pool of devices: every package on every one (per-device "
                       "figures and the spread across boards of one target), one measurement per device at a time")
    where.add_argument("--target-devices", metavar="TARGET", help="the pool is every device of this target")
    p.add_argument("--once", action="store_true", help="with a pool: each package once, on whichever device is "
                   "free first (a lost device's jobs go to the others)")
    p.add_argument("--cluster", default=os.environ.get("EDGEKIT_CLUSTER") or None, metavar="ADDRESS|local",
                   help="reach the devices through a Ray cluster: each device is the resource edgekit-device:NAME "
                   "of the node that reaches it (`ray start --resources \"$(edgekit devices resources)\"`); "
                   "local: this machine's devices (default $EDGEKIT_CLUSTER)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per artifact, at least (default 3)")
    p.add_argument("--min-runs", type=int, default=50)
    p.add_argument("--max-runs", type=int, default=2000, help="stop timing an artifact after this many runs")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--artifact", action="extend", nargs="+", metavar="KEY",
                   help="only these artifacts (BACKEND-PRECISION; default: all)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the device's usable cores)")
    p.add_argument("--timeout", type=float, help="seconds for the measuring step on the device "
                   "(default: estimated from --seconds and the artifacts)")


def run(args: argparse.Namespace) -> int:
    from edgekit.profiling.device import RemoteSettings, profile_package
    from edgekit.profiling.devices import get_device

    settings = RemoteSettings(seconds=args.seconds, min_runs=args.min_runs, max_runs=args.max_runs,
                              warmup_runs=args.warmup, threads=args.threads, timeout=args.timeout)
    if args.device and len(args.package) == 1 and not args.cluster:
        dev = get_device(args.device)
        latencies = profile_package(args.package[0], dev, settings, args.artifact)
        print_device_table(Path(args.package[0]), dev, latencies)
        emit({"ok": True, "device": dev.name, "where": dev.where, "latencies": latencies})
        return 0
    from edgekit.cli.profile_pool import run_device_pool

    return run_device_pool(args, settings)


def resolve_device(args: argparse.Namespace) -> Any:
    """`build --device NAME`: the device, looked up before the build so a typo costs nothing."""
    if not getattr(args, "device", None):
        return None
    from edgekit.profiling.devices import get_device

    return get_device(args.device)


def measure_built_package(args: argparse.Namespace, device: Any, result: Any) -> int:
    """`build --device`: measure the committed package on the device and record device_latency_ms."""
    from edgekit.profiling.device import RemoteSettings, profile_package

    if result.exit_code != 0:
        err.print(f"[yellow]not measured on {device.name}[/yellow]: the build was rejected")
        return result.exit_code
    settings = RemoteSettings(seconds=args.profile_seconds, min_runs=args.min_runs, threads=args.threads)
    try:
        latencies = profile_package(result.path, device, settings)
    except EdgekitError:
        err.print(f"package {result.path} was written; measuring it on {device.name} failed:", markup=False)
        raise
    print_device_table(Path(result.path), device, latencies)
    return result.exit_code


def print_device_table(package: Path, device: Any, latencies: dict[str, dict[str, Any]]) -> None:
    from edgekit.profiling.device import fmt_conditions, profile_path

    manifest = load_package(package).manifest
    table = Table(title=f"measured on {device.name} ({device.where}, {device.target})")
    for col in ("artifact", "p50 ms", "p90 ms", "p99 ms", "min ms", "runs", "threads", "here p50 ms"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for a in manifest["artifacts"]:
        lat = latencies.get(a["key"])
        if not lat:
            continue
        here = a.get("host_latency_ms") or {}
        here_p50 = f"{here['p50']:.3f}" + (" est." if here.get("where") == "estimate" else "") if here else "–"
        table.add_row(a["key"], f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}", f"{lat['min']:.3f}",
                      str(lat["runs"]), str(lat["threads"]), here_p50)
    out.print(table)
    cond = next(iter(latencies.values()))["conditions"] if latencies else {}
    out.print(f"conditions: {fmt_conditions(cond)}", markup=False)
    first = next((a for a in manifest["artifacts"] if a["key"] in latencies), None)
    if first:
        rec = profile_path(device, manifest["source"]["sha256"], first["backend"], first["precision"])
        out.print(f"recorded: {package / 'manifest.json'} (device_latency_ms) and {rec.parent}/", markup=False)
