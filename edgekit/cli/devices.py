"""The `edgekit devices` and `edgekit profile` verbs, and `build --device` (measuring over SSH)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from edgekit.console import emit, err, out
from edgekit.errors import EdgekitError


def add_parsers(sub: Any, model_args: Any = None) -> None:
    d = sub.add_parser("devices", help="devices reached over SSH: add, remove, list, check")
    act = d.add_subparsers(dest="action", required=True, parser_class=type(d))
    a = act.add_parser("add", help="add a device (stored in $EDGEKIT_HOME/devices.yaml)")
    a.add_argument("name")
    a.add_argument("url", metavar="ssh://user@host[:port]")
    a.add_argument("--target", required=True, help="the device's target (`edgekit targets`)")
    a.add_argument("--identity", metavar="FILE", help="private key file, as ssh -i (default: your keys and agent)")
    a.add_argument("--known-hosts", metavar="FILE", help="known_hosts file to check the host key against "
                   "(default: ~/.ssh/known_hosts)")
    a.add_argument("--accept-new", action="store_true",
                   help="trust the device's host key on first connection (StrictHostKeyChecking=accept-new)")
    a.add_argument("--python", default="python3", help="the device's Python that runs the runner (default python3)")
    a.add_argument("--force", action="store_true", help="replace a device of the same name")
    r = act.add_parser("remove", help="forget a device")
    r.add_argument("name")
    act.add_parser("list", help="the devices, as a table")
    c = act.add_parser("check", help="reachable? can files be copied there? which runtimes, CPU, GPU and "
                       "measuring conditions")
    c.add_argument("name")

    p = sub.add_parser("profile", help="measure a package's artifacts on a device over SSH")
    p.add_argument("package", metavar="PACKAGE", help="a package folder (edgekit build --out)")
    p.add_argument("--device", required=True, help="a name from `edgekit devices list`")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per artifact, at least (default 3)")
    p.add_argument("--min-runs", type=int, default=50)
    p.add_argument("--max-runs", type=int, default=2000, help="stop timing an artifact after this many runs")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--artifact", action="extend", nargs="+", metavar="KEY",
                   help="only these artifacts (BACKEND-PRECISION; default: all)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the device's usable cores)")
    p.add_argument("--timeout", type=float, help="seconds for the measuring step on the device "
                   "(default: estimated from --seconds and the artifacts)")


def cmd_devices(args: argparse.Namespace) -> int:
    from edgekit.profiling import devices

    if args.action == "add":
        dev = devices.add_device(args.name, args.url, args.target, args.identity, args.known_hosts,
                                 args.accept_new, args.python, args.force)
        out.print(f"added {dev.name}: {dev.url} ({dev.target}) to {devices.devices_file()}; "
                  f"check it with: edgekit devices check {dev.name}", markup=False)
        emit({"ok": True, "added": _device_dict(dev), "file": str(devices.devices_file())})
        return 0
    if args.action == "remove":
        dev = devices.remove_device(args.name)
        out.print(f"removed {dev.name} ({dev.url}) from {devices.devices_file()}", markup=False)
        emit({"ok": True, "removed": _device_dict(dev), "file": str(devices.devices_file())})
        return 0
    if args.action == "list":
        found = devices.load_devices()
        emit({"devices": [_device_dict(d) for d in found.values()], "file": str(devices.devices_file())})
        if not found:
            out.print("no devices yet; add one with: edgekit devices add NAME ssh://user@host --target TARGET",
                      markup=False)
            return 0
        table = Table(title=f"edgekit devices ({devices.devices_file()})")
        for col in ("name", "address", "target", "identity", "host keys", "python"):
            table.add_column(col)
        for dev in found.values():
            keys = (dev.known_hosts or "~/.ssh/known_hosts") + (" (accept new)" if dev.accept_new else "")
            table.add_row(dev.name, dev.url, dev.target, dev.identity or "keys/agent", keys, dev.python)
        out.print(table)
        return 0
    return _check(devices.get_device(args.name))


def _check(dev: Any) -> int:
    from rich.markup import escape

    from edgekit import backends
    from edgekit.errors import DeviceUnreachable
    from edgekit.profiling.device import fmt_conditions
    from edgekit.profiling.devices import LEGACY_SCP, SCP, check_copy, missing_runtime, probe
    from edgekit.targets import load_target

    facts = probe(dev)  # DeviceUnreachable (exit 2) when ssh cannot get there
    table = Table(title=f"{dev.name}: {dev.url} ({dev.target})")
    table.add_column("")
    table.add_column("on the device")
    rows: list[tuple[str, str]] = [("reachable", "yes")]
    # A real copy, as `edgekit profile` makes: a small file into a fresh mktemp folder, then removed.
    copy_error: EdgekitError | None = None
    try:
        protocol = check_copy(dev)
    except EdgekitError as e:
        if isinstance(e, DeviceUnreachable):
            raise
        copy_error, protocol = e, None
        rows.append(("copy (scp)", f"[red]fails[/red]: {escape(str(e))}"))
    else:
        rows.append(("copy (scp)", {
            LEGACY_SCP: "yes, with the legacy SCP protocol (scp -O): the device's sshd has no SFTP subsystem",
            SCP: "yes, with the legacy SCP protocol (this machine's scp is older than OpenSSH 9)",
        }.get(protocol, "yes (SFTP)")))
    if not facts.get("python"):
        rows.append(("python", f"[red]not found[/red] ({dev.python}: {facts.get('python_error') or 'missing'})"))
    else:
        rows.append(("python", f"{facts['python']} ({facts.get('executable')})"))
        for name, info in (facts.get("runtimes") or {}).items():
            v = info.get("version")
            rows.append((name, v if v else ("[red]broken[/red]: " + info["error"] if info.get("error") else "–")))
        rows.append(("trtexec", facts.get("trtexec") or "–"))
        cpu, gpu = facts.get("cpu") or {}, facts.get("gpu") or {}
        rows.append(("cpu", f"{cpu.get('model')} ({cpu.get('arch')})"))
        rows.append(("cores", f"{cpu.get('cores')} ({cpu.get('usable_cores')} usable)"))
        rows.append(("cpu flags", ", ".join(cpu.get("flags") or []) + f"  ({cpu.get('flag_count', 0)} in all)"))
        rows.append(("gpu", "; ".join(gpu.get("nvidia_smi") or []) or "–"))
        rows.append(("jetson", " ".join(x for x in (gpu.get("jetson_model"), gpu.get("l4t")) if x) or "–"))
        rows.append(("conditions", fmt_conditions(facts.get("conditions") or {})))
        target = load_target(dev.target)
        for b in target.backends:
            miss = missing_runtime(dev, facts, b) if b in backends.names() else "not in edgekit yet"
            rows.append((f"runs {b}", "[green]yes[/green]" if not miss else f"[yellow]no[/yellow]: {miss}"))
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
    if copy_error is not None:  # measuring needs the copy: one error line, exit 3
        raise copy_error
    emit({"ok": True, "device": _device_dict(dev), "facts": facts, "copy": {"ok": True, "protocol": protocol},
          "backends": {k[len("runs "):]: Text.from_markup(v).plain for k, v in rows if k.startswith("runs ")}})
    return 0


def _device_dict(dev: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(dev) if is_dataclass(dev) else dict(vars(dev))


def cmd_profile(args: argparse.Namespace) -> int:
    from edgekit.profiling.device import RemoteSettings, profile_package
    from edgekit.profiling.devices import get_device

    dev = get_device(args.device)
    settings = RemoteSettings(seconds=args.seconds, min_runs=args.min_runs, max_runs=args.max_runs,
                              warmup_runs=args.warmup, threads=args.threads, timeout=args.timeout)
    latencies = profile_package(args.package, dev, settings, args.artifact)
    print_device_table(Path(args.package), dev, latencies)
    emit({"ok": True, "device": dev.name, "where": dev.where, "latencies": latencies})
    return 0


def resolve_build_device(args: argparse.Namespace) -> Any:
    """`build --device NAME`: the device, looked up before the build so a typo costs nothing."""
    if not getattr(args, "device", None):
        return None
    from edgekit.profiling.devices import get_device

    return get_device(args.device)


def profile_built_package(args: argparse.Namespace, device: Any, result: Any) -> int:
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
    import json

    from edgekit.profiling.device import fmt_conditions, profile_path

    manifest = json.loads((package / "manifest.json").read_text())
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


VERBS = {"devices": cmd_devices, "profile": cmd_profile}
