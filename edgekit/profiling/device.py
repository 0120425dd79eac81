"""Measure a package on a device over SSH, record the measurements, update the package's manifest.

Steps, each with its own timeout: probe the device's Python and runtimes (the runner sent on stdin,
nothing written), `mktemp -d -t edgekit-XXXXXX` there with the runner written into it, copy
manifest.json and the artifact folders (scp), run the runner inside a shell wrapper whose EXIT
trap removes the folder, then — in a `finally`, whatever happened — one more ssh call that stops
the runner if it still runs and removes the folder.

Stopping the runner: only the pid edgekit's wrapper wrote into edgekit's own folder (and that
process's group: the runner makes itself a group leader, so trtexec or build_engine.sh go with it).
SIGTERM and SIGCONT (a stopped process keeps a TERM pending until it is continued), up to
STOP_GRACE_S seconds to exit, then SIGKILL, which also ends a stopped or TERM-ignoring runner; then
the folder is removed and checked to be gone.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from edgekit import backends
from edgekit.backends import Backend
from edgekit.console import err, note
from edgekit.errors import BackendUnavailable, BadInput, EdgekitError
from edgekit.packaging.manifest import render_report, validate_manifest, write_json
from edgekit.profiling import store
from edgekit.profiling.device_lock import device_lock
from edgekit.profiling.devices import (
    CONNECT_TIMEOUT_S,
    LEGACY_SCP,
    REMOTE_DIR,
    RUNNER,
    Device,
    StepTimedOut,
    _last_json_line,
    _last_line,
    missing_runtime,
    probe,
    python_command,
    scp_to,
    ssh,
)
from edgekit.version import __version__

ENGINE_BUILD_S = 1200.0  # a TensorRT engine build on the device, at most (Jetson Nano: minutes)
REMOTE_NAME = "edgekit-runner.py"  # the runner's file name in the device's temporary folder
_REMOTE_DIR = REMOTE_DIR
STOP_GRACE_S = 5  # seconds a runner has to exit after SIGTERM before SIGKILL


def _stop_function(grace_s: float = STOP_GRACE_S) -> str:
    """A POSIX sh function `stop PID`: TERM and CONT to the pid and its process group, up to grace_s
    seconds to exit, then KILL; returns 0 once the process is gone (a zombie counts as gone)."""
    ticks = max(1, round(grace_s / 0.2))
    wait = ('i=0; while alive "$1" && [ "$i" -lt {n} ]; do sleep 0.2 2>/dev/null || sleep 1; i=$((i+1)); '
            "done")
    return "\n".join([
        "alive() {",
        '  kill -0 "$1" 2>/dev/null || return 1',
        '  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0',
        '  case "${s##*) }" in Z*) return 1;; esac',
        "}",
        "stop() {",
        '  case "$1" in ""|*[!0-9]*) return 0;; esac',
        '  [ "$1" -gt 1 ] || return 0',
        '  alive "$1" || return 0',
        '  kill -s TERM -- "-$1" 2>/dev/null; kill -s TERM "$1" 2>/dev/null',
        '  kill -s CONT -- "-$1" 2>/dev/null; kill -s CONT "$1" 2>/dev/null',
        "  " + wait.format(n=ticks),
        '  kill -s KILL -- "-$1" 2>/dev/null; kill -s KILL "$1" 2>/dev/null',
        "  " + wait.format(n=25),
        '  ! alive "$1"',
        "}",
    ])


@dataclass
class RemoteSettings:
    # The runner times the artifacts interleaved in blocks, as the host does (ProfileSettings, timed_rounds
    # with per_job_seconds): the rounds stop once each artifact has min_runs and `seconds` of timed runs,
    # or max_runs.
    seconds: float = 3.0  # timed seconds per artifact, at least
    min_runs: int = 50
    max_runs: int = 2000
    warmup_runs: int = 10
    block: int = 25  # runs counted per block (ProfileSettings.block)
    block_skip: int = 3  # runs discarded at the start of each block
    threads: int | None = None  # None: every core the device lets the runner use
    timeout: float | None = None  # the measuring step; None: estimated from the above and the artifacts
    connect_timeout: float = CONNECT_TIMEOUT_S

    def run_timeout(self, artifacts: int, engine_builds: int = 0) -> float:
        if self.timeout:
            return self.timeout
        # Loading (an OpenVINO compile) and slow devices: generous, but bounded; a TensorRT engine the
        # device must build gets ENGINE_BUILD_S more (minutes on a Jetson Nano).
        return 60 + artifacts * (120 + 3 * self.seconds) + engine_builds * ENGINE_BUILD_S


def profile_path(device: Device, model_sha256: str, backend: str, precision: str) -> Path:
    """The profiles/ store's record of one artifact measured on the device."""
    return store.record_path(device.name, device.target, model_sha256, backend, precision)


def load_package(package_dir: str | Path) -> dict[str, Any]:
    """The package's manifest, complete (every field the schema requires: the runner reads them), through
    the one loader; no path, and no link, may lead out of the package: only its own files travel."""
    from edgekit.packaging.model import load_package as load

    return load(package_dir, complete=True).manifest


def select_artifacts(manifest: dict[str, Any], keys: list[str] | None) -> list[dict[str, Any]]:
    by_key = {a["key"]: a for a in manifest["artifacts"]}
    wanted = [k.strip() for item in keys or [] for k in item.split(",") if k.strip()] or list(by_key)
    unknown = [k for k in wanted if k not in by_key]
    if unknown:
        raise BadInput(f"no artifact {', '.join(unknown)} in the package; it has {', '.join(by_key) or 'none'}")
    return [by_key[k] for k in dict.fromkeys(wanted)]


@dataclass
class DeviceMeasurement:
    """One package's artifacts measured on one device: what the runner reported, before anything is written.
    `started`/`finished` are the runner's own wall clock around the measurement (the device's clock)."""

    device: Device
    keys: list[str]
    latencies: dict[str, dict[str, Any]]
    out: dict[str, Any]  # the runner's JSON
    facts: dict[str, Any]  # the probe's
    started: float | None = None
    finished: float | None = None

    @property
    def errors(self) -> dict[str, str]:
        return dict(self.out.get("errors") or {})


def measure_on_device(package_dir: str | Path, device: Device, settings: RemoteSettings | None = None,
                      keys: list[str] | None = None) -> DeviceMeasurement:
    """Measure the package's artifacts (all, or `keys`) on the device; writes nothing here (record() does).
    Runs wherever the device is reachable from: this process, or a cluster node (edgekit.cluster.devices)."""
    settings = settings or RemoteSettings()
    package = Path(package_dir).resolve()
    manifest = load_package(package)
    arts = select_artifacts(manifest, keys)
    with device_lock(device.name, f"measuring {package.name}"):
        facts = probe(device, connect_timeout=settings.connect_timeout)
        for backend in dict.fromkeys(a["backend"] for a in arts):
            missing = missing_runtime(device, facts, backend)
            if missing:
                raise BackendUnavailable(missing)
        out = run_remote(package, device, arts, settings, engines_to_build(arts, facts))
    return DeviceMeasurement(device, [a["key"] for a in arts], _latencies(device, out, arts), out, facts,
                             out.get("started"), out.get("finished"))


def profile_package(package_dir: str | Path, device: Device, settings: RemoteSettings | None = None,
                    keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Measure the package's artifacts (all, or `keys`) on the device; write profiles/ records and the
    manifest's `device_latency_ms`. Returns {artifact key: latency dict with `where` and `conditions`}."""
    settings = settings or RemoteSettings()
    package = Path(package_dir).resolve()
    manifest = load_package(package)
    if manifest["target"] != device.target:
        note(f"package built for {manifest['target']}, device {device.name} is a {device.target}")
    m = measure_on_device(package, device, settings, keys)
    record(package, manifest, device, select_artifacts(manifest, m.keys), m.latencies, m.out, m.facts, settings)
    raise_failures(m)
    return m.latencies


def raise_failures(m: DeviceMeasurement) -> None:
    failed = m.errors
    if failed:
        k, why = next(iter(failed.items()))
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise EdgekitError(f"could not measure {k} on device {m.device.name}: {why}{more}")


def engines_to_build(arts: list[dict[str, Any]], facts: dict[str, Any]) -> int:
    """TensorRT artifacts whose engine the device's engine cache (as the probe listed it) does not hold:
    the measuring step may have to build them first."""
    cached = set((facts.get("engine_cache") or {}).get("entries") or [])
    count = 0
    for a in arts:
        backend = _backend(a["backend"])
        if backend is None or not backend.needs_engine_build_on_device:
            continue
        sha = next((f["sha256"] for f in a["files"] if f["path"] == a.get("entry")), None)
        count += f"{sha}-{a['precision']}" not in cached
    return count


def run_remote(package: Path, device: Device, arts: list[dict[str, Any]], settings: RemoteSettings,
               engine_builds: int = 0) -> dict[str, Any]:
    """Copy, run, and always clean up. Returns the runner's JSON."""
    ct = settings.connect_timeout
    # The runner arrives on stdin with the mkdir: one connection, nothing staged on this machine.
    r = ssh(device, "d=$(mktemp -d -t edgekit-XXXXXX) && cat > \"$d/" + REMOTE_NAME + "\" && echo \"$d\"",
            "creating a temporary folder", 30 + ct, stdin=RUNNER.read_bytes(), connect_timeout=ct)
    remote_dir = r.stdout.decode(errors="replace").strip()
    if not _REMOTE_DIR.match(remote_dir):
        _cleanup(device, remote_dir, ct)
        raise EdgekitError(f"device {device.name}: mktemp gave an unexpected folder name '{remote_dir}'")
    cleaned = False
    try:
        folders = sorted({(package / a["entry"]).parent for a in arts})
        wanted = (f for a in arts if (b := _backend(a["backend"])) for f in b.device_package_files)
        extra = [package / f for f in dict.fromkeys(wanted) if (package / f).is_file()]
        sources = [package / "manifest.json", *folders, *extra]
        size = sum(f.stat().st_size for s in sources for f in ([s] if s.is_file() else s.rglob("*")) if f.is_file())
        note(f"copy {size / 1e6:.1f} MB to {device.name}:{remote_dir}")
        protocol = scp_to(device, sources, remote_dir, timeout=60 + size / 250e3, connect_timeout=ct)  # >= 250 kB/s
        if protocol == LEGACY_SCP:
            note(f"{device.name}'s sshd has no SFTP subsystem: copied with the legacy SCP protocol (scp -O)")
        timeout = settings.run_timeout(len(arts), engine_builds)
        builds = f", with {engine_builds} TensorRT engine build(s)" if engine_builds and not settings.timeout else ""
        note(f"measure {', '.join(a['key'] for a in arts)} on {device.name} (at most {timeout:g} s{builds})")
        try:
            res = ssh(device, _wrapper(device, remote_dir, arts, settings, timeout), "measuring", timeout,
                      connect_timeout=ct, check=False)
        except StepTimedOut:
            cleaned = True  # stop the runner first, so the message can say what became of it
            done = _cleanup(device, remote_dir, ct)
            raise EdgekitError(
                f"measuring on device {device.name} timed out after {timeout:g} s"
                + ("; the runner was stopped and its temporary folder removed" if done else "")
                + ": raise --timeout (edgekit profile) or lower --seconds/--min-runs, and check the device's load "
                "(uptime, top: another process, thermal throttling or a stopped runner)") from None
        return _runner_result(device, res, timeout)
    finally:
        if not cleaned:
            _cleanup(device, remote_dir, ct)


def _wrapper(device: Device, remote_dir: str, arts: list[dict[str, Any]], settings: RemoteSettings,
             timeout: float) -> str:
    """A POSIX sh script: run the runner in the folder, remove the folder on any exit or signal."""
    # The folder's absolute path: the runner and build_engine.sh change directories.
    args = ["--package", remote_dir, "--seconds", f"{settings.seconds:g}", "--min-runs", str(settings.min_runs),
            "--max-runs", str(settings.max_runs), "--warmup", str(settings.warmup_runs),
            "--block", str(settings.block), "--block-skip", str(settings.block_skip),
            "--deadline", f"{timeout + 10:g}"]  # a backstop for a lost connection; this side's timeout comes first
    if settings.threads:
        args += ["--threads", str(settings.threads)]
    for a in arts:
        args += ["--artifact", a["key"]]
    q = shlex.quote
    script = "\n".join([
        f"d={q(remote_dir)}",
        _stop_function(),
        "p=",
        "trap 'rm -rf \"$d\"' EXIT",
        "trap 'stop \"$p\"; exit 143' HUP INT TERM",
        'cd "$d" || exit 97',
        f"{python_command(device)} {REMOTE_NAME} {' '.join(q(a) for a in args)} </dev/null &",
        "p=$!",
        'echo "$p" > .pid',
        'wait "$p"',
    ])
    return f"sh -c {q(script)}"


def _cleanup(device: Device, remote_dir: str, connect_timeout: float) -> bool:
    """Stop the runner if it still runs (the pid in the folder's .pid: TERM, then KILL after
    STOP_GRACE_S) and remove the folder. True when both are done; never raises: it runs in a finally."""
    if not _REMOTE_DIR.match(remote_dir):
        return False
    script = "\n".join([
        f"d={shlex.quote(remote_dir)}",
        _stop_function(),
        'if [ -f "$d/.pid" ]; then',
        '  p=$(cat "$d/.pid" 2>/dev/null)',
        '  stop "$p" || echo "the runner (pid $p) is still running"',
        "fi",
        # The wrapper's own EXIT trap may be removing the folder at the same moment: retry briefly.
        'i=0; while [ -e "$d" ] && [ "$i" -lt 10 ]; do rm -rf "$d" 2>/dev/null; [ -e "$d" ] || break; '
        'sleep 0.2 2>/dev/null || sleep 1; i=$((i+1)); done',
        '[ ! -e "$d" ] || echo "the folder is still there"',
    ])
    problem = ""
    for _attempt in range(2):  # one retry: on a loaded device the first connection can fail or time out
        try:
            r = ssh(device, f"sh -c {shlex.quote(script)}", "removing the temporary folder",
                    20 + 2 * STOP_GRACE_S + connect_timeout, connect_timeout=connect_timeout, check=False)
            problem = r.stdout.decode(errors="replace").strip().replace("\n", "; ") \
                or (_last_line(r.stderr.decode(errors="replace")) if r.returncode else "")
        except EdgekitError as e:
            problem = str(e)
        if not problem:
            break
    if problem:
        err.print(f"[yellow]warning:[/yellow] could not clean up {escape(remote_dir)} on device {device.name}: "
                  f"{escape(problem)}", soft_wrap=True)
        return False
    return True


def _runner_result(device: Device, res: subprocess.CompletedProcess[bytes], timeout: float) -> dict[str, Any]:
    stdout, stderr = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    try:
        out = json.loads(_last_json_line(stdout))
    except ValueError:
        out = None
    if out is not None and "error" not in out:
        return out
    if out is not None and out["error"] == "timeout":
        raise EdgekitError(f"measuring on device {device.name} timed out after {timeout:g} s (the runner's own "
                           "deadline); its temporary folder was removed: raise --timeout (edgekit profile) or lower "
                           "--seconds/--min-runs, and check the device's load (uptime, top)")
    if out is not None and out.get("missing"):
        raise BackendUnavailable(f"device {device.name} has {out['error']}")
    if out is not None:
        raise EdgekitError(f"the runner failed on device {device.name}: {out['error']}")
    code = res.returncode
    if code in (127, 126):
        raise BackendUnavailable(f"device {device.name} cannot run '{device.python}' ({_last_line(stderr)}): "
                                 "install Python 3.6+ there or re-add the device with --python PATH")
    killed = {137: "SIGKILL (out of memory?)", 143: "SIGTERM", 139: "SIGSEGV", 134: "SIGABRT"}.get(code)
    if killed:
        raise EdgekitError(f"the runner on device {device.name} was killed by {killed} before it reported; "
                           "its temporary folder was removed")
    raise EdgekitError(f"the runner on device {device.name} exited with status {code} without a result: "
                       f"{_last_line(stderr) or 'no message'}")


def _backend(name: str) -> Backend | None:
    return backends.get(name) if name in backends.names() else None


def _latencies(device: Device, out: dict[str, Any], arts: list[dict[str, Any]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """The runner's results as latency records; the artifact's backend may replace or add figures its
    runtime's own tool reported (TensorRT: trtexec's GPU compute time). Without `arts`, each key names
    its backend (BACKEND-PRECISION)."""
    cond = out.get("conditions") or {}
    fields = ("p50", "p90", "p99", "mean", "min", "runs", "threads")
    backend_of = {a["key"]: a["backend"] for a in arts or []}
    latencies = {}
    for k, r in (out.get("results") or {}).items():
        rec = {**{f: r[f] for f in fields}, "where": device.where, "conditions": cond}
        backend = _backend(backend_of.get(k) or k.rpartition("-")[0])
        if backend is not None:
            rec.update(backend.device_latency(r, device.where))
        latencies[k] = rec
    return latencies


def record(package: Path, manifest: dict[str, Any], device: Device, arts: list[dict[str, Any]],
           latencies: dict[str, dict[str, Any]], out: dict[str, Any], facts: dict[str, Any],
           settings: RemoteSettings) -> list[Path]:
    """profiles/DEVICE/TARGET-SHA12-BACKEND-PRECISION.json per measured artifact, then the manifest."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    written = []
    for a in arts:
        lat = latencies.get(a["key"])
        if lat is None:
            continue
        path = profile_path(device, manifest["source"]["sha256"], a["backend"], a["precision"])
        entry = next((f["sha256"] for f in a["files"] if f["path"] == a.get("entry")), None)
        store.write_record(path, {
            "schema": store.SCHEMA,
            "device": device.name,
            "where": device.where,
            "target": device.target,
            "package_target": manifest["target"],
            "model_sha256": manifest["source"]["sha256"],
            "canonical_sha256": manifest["source"].get("canonical_sha256"),
            "backend": a["backend"],
            "precision": a["precision"],
            "key": a["key"],
            "artifact_sha256": entry,
            "measured": now,
            "edgekit": __version__,
            "package": str(package),
            "latency_ms": lat,
            "host_latency_ms": a.get("latency_ms"),
            "load_s": (out.get("results") or {}).get(a["key"], {}).get("load_s"),
            "engine": (out.get("results") or {}).get(a["key"], {}).get("engine"),  # TensorRT: reused/cached/built
            "runtime": {"python": out.get("python"), **(out.get("runtimes") or {})},
            "device_facts": {"cpu": facts.get("cpu"), "gpu": facts.get("gpu"), "platform": facts.get("platform")},
            # What the cost model needs to fit this target to the measurement (edgekit/profiling/costmodel.py).
            "cost_features": store.cost_features(manifest["layers"]) if manifest.get("layers") else None,
            "settings": {"seconds": settings.seconds, "min_runs": settings.min_runs,
                         "warmup_runs": settings.warmup_runs, "threads": settings.threads},
        })
        written.append(path)
    if latencies:
        update_manifest(package, latencies, device, now)
    return written


def update_manifest(package: Path, latencies: dict[str, dict[str, Any]], device: Device | None = None,
                    measured_at: str | None = None) -> dict[str, Any]:
    """Record the device measurements: `latency_ms` becomes the device's (where: ssh://...), the host's
    or the estimate moves to `host_latency_ms`, and `device_latency_ms` holds it too. Speedup fields stay
    the host's interleaved ratios. Re-validated, then replaced atomically."""
    from edgekit.packaging.model import load_package as load

    manifest = load(package, complete=True).with_device_latencies(
        latencies, device.name if device else None, device.target if device else None, measured_at).to_dict()
    return replace_manifest(package, manifest)


def replace_manifest(package: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """manifest.json (and report.md, where there is one) replaced by these figures, once they validate."""
    path = package / "manifest.json"
    try:
        validate_manifest(manifest)
    except Exception as e:
        raise EdgekitError(f"the updated manifest does not validate ({getattr(e, 'message', e)}); "
                           f"{path} was left as it was") from None
    tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
    write_json(tmp, manifest)
    os.replace(tmp, path)
    report = package / "report.md"
    if report.exists():
        report.write_text(render_report(manifest) + device_report(manifest))
    return manifest


def device_report(manifest: dict[str, Any]) -> str:
    """The report's section on device measurements (the rest of report.md is package.render_report)."""
    measured = [a for a in manifest["artifacts"] if a.get("device_latency_ms")]
    if not measured:
        return ""
    lines = ["", "## Measured on the device", "", "| artifact | where | p50 ms | p90 ms | p99 ms | runs | threads | "
             "conditions |", "|---|---|---|---|---|---|---|---|"]
    for a in measured:
        d = a["device_latency_ms"]
        lines.append(f"| {a['key']} | {d['where']} | {d['p50']:.3f} | {d['p90']:.3f} | {d['p99']:.3f} | {d['runs']} | "
                     f"{d['threads']} | {fmt_conditions(d.get('conditions') or {})} |")
    spread = [a for a in measured if a.get("device_spread")]
    if spread:
        lines += ["", "### Across the boards of one target", "",
                  "| artifact | target | boards | fastest | p50 ms | slowest | p50 ms | spread |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in spread:
            s = a["device_spread"]
            lines.append(f"| {a['key']} | {s['target']} | {s['devices']} | {s['fastest']} | {s['p50_min']:.3f} | "
                         f"{s['slowest']} | {s['p50_max']:.3f} | {s['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def fmt_conditions(cond: dict[str, Any]) -> str:
    temps = cond.get("temperature_c") or {}
    hottest = f"{max(temps.values()):.1f} °C" if temps else "–"
    locked = {True: "locked", False: "not locked", None: "–"}[cond.get("clocks_locked")]
    return (f"power mode {cond.get('power_mode') or '–'}, clocks {locked}, governor {cond.get('cpu_governor') or '–'}, "
            f"hottest zone {hottest}")
