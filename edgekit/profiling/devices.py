"""Devices reached over SSH: the user's device list, and the ssh/scp calls edgekit makes to them.

The list lives in `$EDGEKIT_HOME/devices.yaml` (default `~/.config/edgekit/devices.yaml`). It holds
addresses and file paths, never secrets. Every call is the system `ssh`/`scp` with `BatchMode=yes`
(no password or passphrase prompt, ever), host keys checked against known_hosts
(`StrictHostKeyChecking=yes`, or `accept-new` = trust on first use when the device was added with
`--accept-new`), a connect timeout, and an overall timeout on the step.

Copies use scp, which since OpenSSH 9 speaks SFTP by default; a device whose sshd has no SFTP
subsystem (minimal images without openssh-sftp-server) is copied to with the legacy SCP protocol
(`scp -O`) instead, and remembered for the rest of the process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from edgekit.errors import BadInput, DeviceUnreachable, EdgekitError

CONNECT_TIMEOUT_S = 10
PROBE_TIMEOUT_S = 90  # imports every runtime on the device (TensorRT can take a while on a Jetson)
RUNNER = Path(__file__).resolve().parent / "runner.py"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_HOST = re.compile(r"^[A-Za-z0-9._:%-]+$")  # names, IPv4, IPv6 (brackets stripped), scoped IPv6
# What `mktemp -d -t edgekit-XXXXXX` gives on the device: the only folders edgekit ever removes there.
REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/-]*/edgekit-[A-Za-z0-9]{6,}$")


def edgekit_home() -> Path:
    return Path(os.environ.get("EDGEKIT_HOME") or Path.home() / ".config" / "edgekit")


def devices_file() -> Path:
    return edgekit_home() / "devices.yaml"


@dataclass
class Device:
    name: str
    user: str
    host: str
    port: int
    target: str
    identity: str | None = None  # private key file (ssh -i); None: the user's keys and agent
    known_hosts: str | None = None  # known_hosts file to use instead of ~/.ssh/known_hosts
    accept_new: bool = False  # trust the host key on first connection (StrictHostKeyChecking=accept-new)
    python: str = "python3"  # the device's Python that runs edgekit's runner

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}"

    @property
    def where(self) -> str:
        """What measurements record as the place they were taken."""
        return self.url

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["name"], d["user"], d["host"], d["port"]
        return {"url": self.url, **d}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Device:
        from edgekit.untrusted import check_type

        known = {"url": str, "target": str, "identity": str | None, "known_hosts": str | None,
                 "accept_new": bool, "python": str | None}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise BadInput(f"unknown key '{unknown[0]}' (known: {', '.join(known)})")
        for key, hint in known.items():
            check_type(d.get(key), hint | None, "the entry", key)
        user, host, port = parse_url(str(d.get("url", "")))
        return cls(name, user, host, port, str(d.get("target", "")), d.get("identity"), d.get("known_hosts"),
                   bool(d.get("accept_new", False)), str(d.get("python") or "python3"))


def parse_url(url: str) -> tuple[str, str, int]:
    """ssh://user@host[:port] -> (user, host, port)."""
    try:
        u = urlsplit(url)
        port = u.port or 22
    except ValueError as e:
        raise BadInput(f"bad device address '{url}': {e}; use ssh://user@host[:port]") from None
    if u.scheme != "ssh" or not u.hostname or not u.username or u.password is not None \
            or u.path not in ("", "/") or u.query or u.fragment:
        why = "passwords are never stored; use keys" if u.password is not None else "use ssh://user@host[:port]"
        raise BadInput(f"bad device address '{url}': {why}")
    if not _USER.match(u.username) or not _HOST.match(u.hostname):
        raise BadInput(f"bad device address '{url}': unexpected characters in the user or host name")
    return u.username, u.hostname, port


# ---------------------------------------------------------------- the device list


def load_devices() -> dict[str, Device]:
    path = devices_file()
    if not path.exists():
        return {}
    from edgekit.untrusted import load_yaml

    raw = load_yaml(path, "device list") or {}
    entries = raw.get("devices") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise BadInput(f"{path}: expected a mapping 'devices: {{NAME: {{url: ..., target: ...}}}}'")
    devices = {}
    for name, d in entries.items():
        if not isinstance(d, dict):
            raise BadInput(f"{path}: device '{name}' must be a mapping")
        try:
            devices[str(name)] = Device.from_dict(str(name), d)
        except BadInput as e:
            raise BadInput(f"{path}: device '{name}': {e}") from None
    return devices


def save_devices(devices: dict[str, Device]) -> Path:
    path = devices_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# edgekit devices: `edgekit devices add/remove` edit this file. Addresses and key file paths only;\n"
            "# edgekit never stores or asks for a password.\n"
            + yaml.safe_dump({"devices": {n: d.to_dict() for n, d in sorted(devices.items())}}, sort_keys=False))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def get_device(name: str) -> Device:
    devices = load_devices()
    if name not in devices:
        known = ", ".join(sorted(devices)) or "none yet"
        raise BadInput(f"unknown device '{name}' (known: {known}); add it with "
                       f"edgekit devices add {name} ssh://user@host --target TARGET")
    return devices[name]


def add_device(name: str, url: str, target: str, identity: str | None = None, known_hosts: str | None = None,
               accept_new: bool = False, python: str = "python3", force: bool = False) -> Device:
    from edgekit.targets import load_target

    if not _NAME.match(name):
        raise BadInput(f"bad device name '{name}': use letters, digits, '.', '_' and '-'")
    user, host, port = parse_url(url)
    target_name = load_target(target).name
    if identity is not None:
        if not Path(identity).is_file():
            raise BadInput(f"--identity {identity}: no such file (a private key, as for ssh -i)")
        identity = str(Path(identity).resolve())
    if known_hosts is not None:
        kh = Path(known_hosts).resolve()
        if not kh.parent.is_dir():
            raise BadInput(f"--known-hosts {known_hosts}: folder {kh.parent} does not exist")
        known_hosts = str(kh)
    if not python.strip() or any(c in python for c in "\n\r'\"`$;&|<>"):
        raise BadInput(f"--python '{python}': give a command or an absolute path, e.g. python3 or /usr/bin/python3")
    devices = load_devices()
    if name in devices and not force:
        raise BadInput(f"device '{name}' exists ({devices[name].url}); remove it first or pass --force")
    device = Device(name, user, host, port, target_name, identity, known_hosts, accept_new, python)
    devices[name] = device
    save_devices(devices)
    return device


def remove_device(name: str) -> Device:
    devices = load_devices()
    device = get_device(name)
    del devices[name]
    save_devices(devices)
    return device


# ---------------------------------------------------------------- ssh and scp


def _options(device: Device, connect_timeout: float) -> list[str]:
    opts = [
        "-o", "BatchMode=yes",  # never a password or passphrase prompt
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", f"StrictHostKeyChecking={'accept-new' if device.accept_new else 'yes'}",
        "-o", f"ConnectTimeout={max(1, round(connect_timeout))}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
    ]
    if device.known_hosts:
        opts += ["-o", f"UserKnownHostsFile={device.known_hosts}"]
    if device.identity:
        opts += ["-i", device.identity, "-o", "IdentitiesOnly=yes"]
    return opts


def ssh_command(device: Device, remote: str, connect_timeout: float = CONNECT_TIMEOUT_S) -> list[str]:
    return ["ssh", *_options(device, connect_timeout), "-p", str(device.port), device.destination, remote]


class StepTimedOut(EdgekitError):
    """An ssh step that ran past its timeout (the ssh client was killed; the device may still be busy)."""


def ssh(device: Device, remote: str, step: str, timeout: float, stdin: bytes | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S, check: bool = True,
        hint: str = "check the device's load (uptime) and its network, then try again",
        ) -> subprocess.CompletedProcess[bytes]:
    """Run a shell command on the device. ssh's own failures (exit 255) become DeviceUnreachable with
    one line saying what to do; a step over `timeout` seconds becomes StepTimedOut, with `hint`.
    `step` says what was done ("checking the device"), without the device: the message names it."""
    try:
        r = subprocess.run(ssh_command(device, remote, connect_timeout), input=stdin if stdin is not None else b"",
                           capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise BadInput("no `ssh` command on this machine: install the OpenSSH client (openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise StepTimedOut(f"{step} on device {device.name} ({device.url}) timed out after {timeout:g} s: "
                           f"{hint}") from None
    if r.returncode == 255:
        raise ssh_failure(device, r.stderr.decode(errors="replace"))
    if check and r.returncode != 0:
        tail = _last_line(r.stderr.decode(errors="replace")) or f"exit status {r.returncode}"
        raise EdgekitError(f"{step} failed on device {device.name}: {tail}")
    return r


# (user, host, port) of devices found to have no SFTP subsystem: copied to with `scp -O` from then on.
_LEGACY_SCP: set[tuple[str, str, int]] = set()
# What scp_to returns, the protocol the copy used: SFTP (OpenSSH 9+'s default), LEGACY_SCP (`scp -O`, the
# device has no SFTP subsystem), SCP (the legacy protocol because it is this machine's scp's default, < 9).
SFTP, LEGACY_SCP, SCP = "sftp", "scp -O", "scp"
_scp_speaks_sftp: bool | None = None


def scp_speaks_sftp() -> bool:
    """Whether this machine's scp uses SFTP by default (OpenSSH 9.0 and newer); True when unknown."""
    global _scp_speaks_sftp
    if _scp_speaks_sftp is None:
        try:
            text = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10).stderr
        except (OSError, subprocess.SubprocessError):
            text = ""
        m = re.search(r"OpenSSH_(\d+)", text)
        _scp_speaks_sftp = not m or int(m.group(1)) >= 9
    return _scp_speaks_sftp


def scp_to(device: Device, sources: list[Path], remote_dir: str, timeout: float,
           connect_timeout: float = CONNECT_TIMEOUT_S, what: str = "copying the package") -> str:
    """Copy files and folders into `remote_dir` on the device; returns the protocol used (SFTP or
    LEGACY_SCP). scp speaks SFTP first (OpenSSH 9's default); when the device's sshd has no SFTP
    subsystem it is retried, once, with the legacy SCP protocol (`scp -O`)."""
    host = f"[{device.host}]" if ":" in device.host else device.host
    key = (device.user, device.host, device.port)
    deadline = time.monotonic() + timeout

    def copy(legacy: bool) -> subprocess.CompletedProcess[bytes]:
        # No -q: it would hide ssh's own diagnostics (refused, host key, no subsystem), which say what to fix.
        cmd = ["scp", *(["-O"] if legacy else []), "-r", *_options(device, connect_timeout), "-P", str(device.port),
               *[str(s) for s in sources], f"{device.user}@{host}:{remote_dir}/"]
        try:
            return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except FileNotFoundError:
            raise BadInput("no `scp` command on this machine: install the OpenSSH client (openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise EdgekitError(f"{what} to device {device.name} timed out after {timeout:g} s: check the "
                               "network to the device and the free space in its /tmp") from None

    legacy = key in _LEGACY_SCP
    r = copy(legacy)
    text = r.stderr.decode(errors="replace")
    if r.returncode != 0 and not legacy and scp_speaks_sftp() and _sftp_unavailable(device, text):
        legacy = True
        r = copy(legacy)
        if r.returncode == 0:
            _LEGACY_SCP.add(key)
            return LEGACY_SCP
        text = r.stderr.decode(errors="replace")
        failure = ssh_failure(device, text)
        if not failure.generic and failure.kind != "closed":
            raise failure
        raise EdgekitError(f"{what} to device {device.name} failed: its sshd has no SFTP subsystem and legacy scp "
                           f"(scp -O) failed too ({_scp_reason(text) or r.returncode}): install openssh-sftp-server "
                           "(or scp) on the device")
    if r.returncode != 0:
        failure = ssh_failure(device, text)
        if not failure.generic:
            raise failure
        raise EdgekitError(f"{what} to device {device.name} failed: {_scp_reason(text) or r.returncode}")
    return LEGACY_SCP if legacy else SFTP if scp_speaks_sftp() else SCP


def _sftp_unavailable(device: Device, stderr: str) -> bool:
    """scp's SFTP attempt failed because the device has no SFTP server: the subsystem is not configured
    ("subsystem request failed"), or its sftp-server binary is missing (the channel closes at once: only
    "Connection closed", which ssh's own failures — refused, host key, login — never print alone)."""
    if "subsystem request failed" in stderr or "sftp-server" in stderr:
        return True
    failure = ssh_failure(device, stderr)
    return failure.kind == "closed" or (failure.generic and "Connection closed" in stderr)


def _scp_reason(stderr: str) -> str:
    """scp's most telling line: its last one, unless that is only "lost connection" / "Connection closed"."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    generic = ("lost connection", "scp: connection closed", "connection closed")
    telling = [ln for ln in lines if ln.lower() not in generic]
    return (telling or lines or [""])[-1]


def check_copy(device: Device, connect_timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Copy a small file into a fresh `mktemp -d -t edgekit-XXXXXX` folder on the device, read it back,
    and remove the folder (only that one). Returns the protocol the copy used; raises when it fails."""
    ct = connect_timeout
    r = ssh(device, "mktemp -d -t edgekit-XXXXXX", "creating a temporary folder", 30 + ct, connect_timeout=ct)
    remote_dir = r.stdout.decode(errors="replace").strip()
    if not REMOTE_DIR.match(remote_dir):
        raise EdgekitError(f"device {device.name}: mktemp gave an unexpected folder name '{remote_dir}'")
    name, token = "edgekit-copy-check.txt", f"edgekit copy check {os.getpid()} {time.time()}\n".encode()
    q = shlex.quote(remote_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="edgekit-copy-check-") as tmp:
            local = Path(tmp) / name
            local.write_bytes(token)
            protocol = scp_to(device, [local], remote_dir, timeout=30 + ct, connect_timeout=ct,
                              what="copying a test file")
        got = ssh(device, f"cat {q}/{name}", "reading the copied test file", 30 + ct, connect_timeout=ct).stdout
        if got != token:
            raise EdgekitError(f"copying a test file to device {device.name}: it arrived changed "
                               f"({len(got)} bytes instead of {len(token)})")
    finally:
        try:
            gone = ssh(device, f"rm -rf {q}; [ ! -e {q} ]", "removing the temporary folder", 20 + ct,
                       connect_timeout=ct, check=False).returncode == 0
        except EdgekitError:
            gone = False
        if not gone:
            from edgekit.console import err

            err.print(f"[yellow]warning:[/yellow] could not remove {remote_dir} on device {device.name}",
                      soft_wrap=True)
    return protocol


class _SshFailure(DeviceUnreachable):
    generic = False
    kind = ""


def ssh_failure(device: Device, stderr: str) -> _SshFailure:
    """ssh's error output -> one line naming the cause and the fix."""
    at = f"device {device.name} ({device.url})"
    kh = device.known_hosts or "~/.ssh/known_hosts"
    bracketed = device.host if device.port == 22 else f"[{device.host}]:{device.port}"
    text = stderr
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or ("Host key for" in text and "has changed" in text):
        msg = (f"{at}: host key does not match the one in {kh} — if the device was reinstalled, check its new "
               f"fingerprint and remove the old key with: ssh-keygen -R '{bracketed}' -f {kh}")
    elif ("No " in text and "host key is known" in text) or "Host key verification failed" in text:
        msg = (f"{at}: host key is not in {kh} and StrictHostKeyChecking is on: connect once with ssh and check the "
               "fingerprint, or re-add the device with --accept-new to trust the first key it presents")
    elif "Connection refused" in text:
        msg = f"{at}: connection refused — is sshd running on the device and is port {device.port} right?"
    elif "timed out" in text or "Operation timed out" in text:
        msg = f"{at}: no answer (connection timed out) — is the device on and on this network?"
    elif "Could not resolve hostname" in text or "Name or service not known" in text:
        msg = f"{at}: host name {device.host} does not resolve"
    elif "No route to host" in text or "Network is unreachable" in text:
        msg = f"{at}: no route to host {device.host}"
    elif "Permission denied" in text or "Too many authentication failures" in text:
        key = f"--identity {device.identity}" if device.identity else "your keys/agent"
        msg = (f"{at}: SSH key authentication failed with {key} (edgekit never uses passwords): install the public "
               f"key in {device.user}'s ~/.ssh/authorized_keys on the device (ssh-copy-id) or set --identity")
    elif any(w in text for w in ("Connection closed", "closed by remote host", "Connection reset",
                                 "kex_exchange_identification")):
        failure = _SshFailure(f"{at}: the connection was closed by the device ({_last_line(text)})")
        failure.kind = "closed"
        return failure
    else:
        failure = _SshFailure(f"{at}: ssh failed: {_last_line(text) or 'no message'}")
        failure.generic = True
        return failure
    return _SshFailure(msg)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------- facts


def python_command(device: Device) -> str:
    return " ".join(shlex.quote(p) for p in shlex.split(device.python))


def probe(device: Device, timeout: float = PROBE_TIMEOUT_S,
          connect_timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """The device's Python, runtimes, CPU, GPU and measuring conditions, by edgekit's runner sent on
    stdin (nothing is written on the device). {"python": None, ...} when the device has no such Python."""
    r = ssh(device, f"{python_command(device)} - --probe", "checking the device", timeout,
            stdin=RUNNER.read_bytes(), connect_timeout=connect_timeout, check=False)
    if r.returncode == 127 or (r.returncode != 0 and b"not found" in r.stderr):
        return {"python": None, "python_error": _last_line(r.stderr.decode(errors="replace"))}
    try:
        facts = json.loads(_last_json_line(r.stdout.decode(errors="replace")))
    except ValueError:
        tail = _last_line(r.stderr.decode(errors="replace")) or f"exit status {r.returncode}"
        raise EdgekitError(f"edgekit's probe failed on device {device.name} with {device.python}: {tail} "
                           "(the runner needs Python 3.6 or newer)") from None
    return facts


def _last_json_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return line
    raise ValueError("no JSON line")


def missing_runtime(device: Device, facts: dict[str, Any], backend: str) -> str | None:
    """None when the device can run this backend's artifacts, else one line naming what to install."""
    py = facts.get("python")
    if not py:
        why = facts.get("python_error") or "not found"
        return (f"device {device.name} has no Python at '{device.python}' ({why}): install Python 3.6+ there or "
                "re-add the device with --python PATH")
    short = ".".join(str(py).split(".")[:2])
    runtimes = facts.get("runtimes") or {}
    from edgekit import backends

    # The backend says what the runner needs on the device (the runner's BACKEND_NEEDS agrees: a test checks).
    owner = backends.get(backend) if backend in backends.names() else None
    if owner is None or owner.device_modules is None:
        return f"edgekit's device runner cannot run {backend} artifacts yet"
    blocker = owner.device_blocker(facts)
    if blocker:
        return f"device {device.name} {blocker}"
    for m in owner.device_modules:
        info = runtimes.get(m) or {}
        if not info.get("version"):
            broken = f" (installed but import fails: {info['error']})" if info.get("error") else ""
            return f"device {device.name} has no {m} for Python {short}{broken}: pip install {m}"
    return None
