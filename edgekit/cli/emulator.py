"""`edgekit emulator setup|status`: the aarch64 emulator that verifies ARM targets' artifacts on the board's own
arithmetic (edgekit.emulate). `setup` does now what the first ARM build would do; `status` only reads."""

from __future__ import annotations

import argparse

from rich.table import Table

from edgekit.console import emit, out

VERB = "emulator"
ORDER = 75


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("emulator", help="set up or show the ARM emulator (qemu-user) that verifies ARM artifacts")
    e.add_argument("action", nargs="?", choices=["setup", "status"], default="status")
    e.add_argument("--runtime", action="append", default=[], metavar="DIST",
                   help="runtime distributions to set up (default: those of every backend that verifies under "
                   "emulation; the host's versions)")
    e.add_argument("--cpu", default="cortex-a76", help="CPU model the setup's check runs on (default cortex-a76)")


def run(args: argparse.Namespace) -> int:
    from edgekit.emulate import emulator_status, ensure_emulator, qemu_cpu
    from edgekit.pipeline.isa_check import emulated_backends, emulation_fallbacks

    if args.action == "setup":
        chosen = emulated_backends()
        default = sorted({d for b in chosen for d in b.runtime_distributions})
        emu = ensure_emulator(tuple(args.runtime or default), emulation_fallbacks(chosen))
        model, stand_in = qemu_cpu(args.cpu, emu.qemu)
        table = Table(title=f"edgekit emulator: qemu-aarch64 {emu.to_dict()['qemu_version']} ({emu.home})")
        for col in ("runtime", "version under qemu", "note"):
            table.add_column(col)
        for dist, version in emu.runtimes.items():
            table.add_row(dist, version, emu.notes.get(dist, "the host's version"))
        for dist, why in emu.broken.items():
            table.add_row(dist, "–", why)
        out.print(table)
        if stand_in:
            out.print(stand_in)
        emit({**emu.to_dict(), "cpu": model, "stand_in": stand_in})
        return 0
    status = emulator_status()
    table = Table(title="edgekit emulator")
    table.add_column("what")
    table.add_column("state")
    table.add_row("qemu-aarch64", f"{status['qemu']} ({status['qemu_version']})" if status["qemu"]
                  else f"missing: {status['install_hint']}")
    table.add_row("mmdebstrap", status["mmdebstrap"] or "missing (needed once, for the setup)")
    table.add_row("arm64 userland", f"ready in {status['home']}" if status["rootfs"]
                  else "not set up: `edgekit emulator setup`, or the first ARM build does it")
    for spec, entry in sorted(status["runtimes"].items()):
        if entry.get("version"):
            state = f"runs as {entry['version']}" + (f" ({entry['why']})" if entry.get("why") else "")
        else:
            state = f"does not run: {entry.get('why')}"
        table.add_row(spec, state)
    out.print(table)
    emit(status)
    return 0
