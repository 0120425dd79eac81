"""`edgekit profile PKG [PKG ...] --devices A,B | --target-devices T [--once] [--cluster ADDRESS|local]`: a device
pool (profiling/pool.py), here or through a Ray cluster; per-device figures, the spread across boards of one
target, and the run's record (what ran where, what was retried, which device was lost)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from edgekit.console import emit, err, note, out
from edgekit.errors import EXIT_FAILED
from edgekit.packaging.model import load_package
from edgekit.profiling.device import RemoteSettings
from edgekit.profiling.pool import LocalSlots, PoolRun, pool_devices, recorder, run_pool


def run_device_pool(args: argparse.Namespace, settings: RemoteSettings) -> int:
    run, spreads = profile_on_pool([Path(p) for p in args.package], settings, args.devices or args.device,
                                   args.target_devices, args.once, args.cluster, args.artifact)
    print_pool_table(run, spreads)
    emit({"ok": not run.failed, "run": run.to_dict(), "spread": spreads,
          "latencies": {str(o.package): {o.device: o.measurement.latencies} for o in run.outcomes if o.measurement}})
    return EXIT_FAILED if run.failed else 0


def profile_on_pool(packages: list[Path], settings: RemoteSettings, devices: str | None = None,
                    target_devices: str | None = None, once: bool = False, cluster: str | None = None,
                    keys: list[str] | None = None) -> tuple[PoolRun, dict[str, dict[str, Any]]]:
    """The pool run (the CLI's and edgekit.api.profile_pool's): BadInput before anything is measured for a package
    that is not one or a device the pool cannot reach; then every job, recorded as it finishes."""
    from edgekit.profiling.devices import load_devices

    packages = list(dict.fromkeys(Path(p).resolve() for p in packages))
    targets = {p: str(load_package(p, complete=True).header.get("target")) for p in packages}
    if cluster:
        from edgekit.cluster.devices import RaySlots

        slots: Any = RaySlots(cluster)
        offered = slots.offered() if target_devices else {}
    else:
        slots, offered = LocalSlots(), {}
    try:
        names = pool_devices(devices, target_devices, load_devices(), offered)
        device_targets = slots.targets(names)
    except BaseException:
        slots.close()
        raise
    for p, t in targets.items():
        other = sorted({d for d, dt in device_targets.items() if dt != t})
        if other:
            note(f"{p.name} was built for {t}; {', '.join(other)} {'is' if len(other) == 1 else 'are'} not")
    note(f"{len(packages)} package(s) on {len(names)} device(s) ({'each once' if once else 'each on every'}"
         f" device), {slots.where}")
    run = run_pool(packages, names, slots, settings, keys, once, recorder(settings, keys))
    return run, _headline(run, targets)


def _headline(run: PoolRun, targets: dict[Path, str]) -> dict[str, dict[str, Any]]:
    """Each package measured on several devices: its headline latency the slowest of them, the spread kept.
    Returns {package: {artifact: device_spread}}."""
    from edgekit.profiling.device import replace_manifest

    spreads: dict[str, dict[str, Any]] = {}
    for package in targets:
        devices = [o.device for o in run.outcomes if o.package == package and o.measurement and o.device]
        if not devices:
            continue
        pkg = load_package(package, complete=True)
        if len(devices) > 1:
            pkg = pkg.with_records([r.with_slowest_device(devices) for r in pkg.records])
            replace_manifest(package, pkg.to_dict())
        spreads[str(package)] = {r.key: r.device_spread for r in pkg.records if r.device_spread}
    return spreads


def print_pool_table(run: PoolRun, spreads: dict[str, dict[str, Any]]) -> None:
    devices = run.devices
    table = Table(title=f"p50 ms by device ({run.mode}: {run.where})")
    for col in ("package", "artifact", *devices, "spread"):
        table.add_column(col, justify="left" if col in ("package", "artifact") else "right")
    by_package: dict[Path, dict[str, dict[str, Any]]] = {}
    for o in run.outcomes:
        if o.measurement:
            for key, lat in o.measurement.latencies.items():
                by_package.setdefault(o.package, {}).setdefault(key, {})[o.device or ""] = lat
    for package, arts in by_package.items():
        for key, per_device in arts.items():
            sp = spreads.get(str(package), {}).get(key)
            cells = [f"{per_device[d]['p50']:.3f}" if d in per_device else "–" for d in devices]
            table.add_row(package.name, key, *cells, f"{sp['ratio']:.2f}x ({sp['devices']} boards)" if sp else "–")
    out.print(table)
    rec = run.to_dict()
    busy = ", ".join(f"{d} {s:.1f} s" for d, s in rec["busy_s"].items()) or "none"
    out.print(f"{len(run.outcomes) - len(run.failed)} of {len(run.outcomes)} job(s) measured in {run.seconds:.1f} s; "
              f"devices busy: {busy}; retried: {len(rec['retried'])}", markup=False)
    for d, why in run.lost.items():
        err.print(f"device {d} was lost: {why}", markup=False, soft_wrap=True)
    for o in run.failed:
        why = o.error or "; ".join(f"{k}: {v}" for k, v in o.measurement.errors.items()) if o.measurement else o.error
        err.print(f"not measured: {o.package.name} on {o.device or 'the pool'}: {why}", markup=False, soft_wrap=True)

