"""`edgekit devices add|remove|list|check`: the devices edgekit reaches over SSH ($EDGEKIT_HOME/devices.yaml)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table
from rich.text import Text

from edgekit.console import emit, out
from edgekit.errors import EdgekitError

VERB = "devices"
ORDER = 50


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    act.add_parser("resources", help="the devices as Ray resources, for the node that reaches them: "
                   "ray start --address HEAD --resources \"$(edgekit devices resources)\"")
    c = act.add_parser("check", help="reachable? can files be copied there? which runtimes, CPU, GPU and "
                       "measuring conditions")
    c.add_argument("name")


def run(args: argparse.Namespace) -> int:
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
    if args.action == "resources":
        import json

        from edgekit.cluster.connection import device_resources
        from edgekit.console import is_json

        # One line of JSON on stdout, nothing else: what `ray start --resources` reads (edgekit/cluster/devices.py).
        resources = device_resources(list(devices.load_devices()))
        emit(resources) if is_json() else print(json.dumps(resources))
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
