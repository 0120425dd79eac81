"""Where a run writes, and how it stops: staged outputs, a private temp folder, signals, stale leftovers.

- An output folder (a package, an extracted archive) is written into a hidden staging folder beside it
  and moved into place only when complete. The move is decided at commit time and is atomic
  (renameat2 RENAME_NOREPLACE): a folder that appeared at the destination while edgekit worked is
  never replaced, and --force replaces only what edgekit made (a package) or an empty folder.
- Each CLI run gets a private temp folder, `$TMPDIR/edgekit-run-PID-XXXX`, that every library writes
  into (TMPDIR points there), so ONNX Runtime's and converters' own temp files go with it.
- SIGTERM (what `timeout`, CI and process managers send) and SIGHUP unwind like Ctrl-C: every staging
  and temp folder is removed on the way out, and child processes are stopped.
- Leftovers of runs that were killed outright (SIGKILL, power loss) are swept when the next run starts:
  a staging or temp folder whose PID is not alive, or is alive but started after the folder was made.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from edgekit.errors import BadInput

RUN_PREFIX = "edgekit-run-"
# .NAME.partial-PID-HEX (a package or DEST being written), .NAME.old-PID-HEX (one being replaced)
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_RUN_DIR = re.compile(rf"^{RUN_PREFIX}(?P<pid>\d+)-")
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised where the main thread is, so cleanup runs exactly as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------- atomic moves


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def move_noreplace(src: Path, dest: Path) -> None:
    """rename(src, dest) that fails with FileExistsError when dest exists, atomically (Linux renameat2);
    where the kernel or filesystem lacks it, a check right before the rename (a short window)."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE)
        if rc == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EEXIST or e == errno.ENOTEMPTY:
            raise FileExistsError(e, os.strerror(e), str(dest))
        if e not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            raise OSError(e, os.strerror(e), str(dest))
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest))
    os.rename(src, dest)


def is_replaceable(folder: Path) -> bool:
    """What --force may replace: a folder edgekit wrote (an edgekit manifest at its top) or an empty one."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    manifest = folder / "manifest.json"
    if manifest.is_file() and not manifest.is_symlink():
        try:
            with manifest.open("rb") as f:
                return b'"edgekit-manifest/' in f.read(4096)
        except OSError:
            return False
    return not any(folder.iterdir())


def check_writable_destination(dest: str | Path, flag: str) -> None:
    """Refuse, before any work, a destination folder (--out, DEST) that cannot be created: its nearest
    existing parent is a file, or a folder this process cannot write. Really tried (a probe folder made and
    removed at once), not read from permission bits, which root ignores but a read-only mount does not."""
    parent = Path(dest).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"{flag} {dest}: {parent} is a file, not a writable folder; choose another {flag}")
    try:
        probe = tempfile.mkdtemp(prefix=".edgekit-write-probe-", dir=parent)
    except OSError as e:
        raise BadInput(f"{flag} {dest}: folder {parent} is not writable ({e.strerror or e}); choose another "
                       f"{flag}") from None
    os.rmdir(probe)


class Staging:
    """A staging folder for DIR that becomes DIR on commit() and vanishes otherwise."""

    def __init__(self, out: str | Path, force: bool = False, flag: str = "--out") -> None:
        self.given, self.flag = str(out), flag
        self.out = Path(out).absolute()
        self.force = force
        if self.out.exists() or self.out.is_symlink():
            if not self.out.is_dir() or self.out.is_symlink():
                raise BadInput(f"{flag} {out} exists and is not a folder; choose another {flag}")
            if not force:
                raise BadInput(f"output folder {out} exists; choose another {flag} or pass --force to replace it")
            if not is_replaceable(self.out):
                raise BadInput(f"--force replaces only a folder edgekit wrote (or an empty one); {out} holds other "
                               f"files: choose another {flag} or remove it yourself")
        check_writable_destination(out, flag)  # before any work, not when the result is ready
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def __enter__(self) -> Staging:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(self.out.parent, self.out.name)
            self.path.mkdir()
        except OSError as e:
            raise BadInput(f"cannot write the output folder {self.given}: {e.strerror or e} "
                           f"({e.filename or self.out.parent}); choose a writable {self.flag}") from None
        return self

    def commit(self, dest: Path | None = None) -> Path:
        """Move the finished folder to dest (default DIR). Decided now, atomically: an existing dest is
        replaced only with --force (or, for DIR.rejected, always) and only if edgekit wrote it."""
        dest = Path(dest).absolute() if dest is not None else self.out
        may_replace = self.force or dest != self.out  # DIR.rejected: edgekit's own diagnosis, replaced
        old = None
        try:
            if os.path.lexists(dest):
                if not may_replace:
                    raise BadInput(self._appeared(dest))
                if not is_replaceable(dest):
                    raise BadInput(f"{dest} was not written by edgekit (or holds other files now); it was left as "
                                   "it is and this build's result discarded: choose another --out")
                old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(dest, old)
            move_noreplace(self.path, dest)
        except FileExistsError:  # someone made dest between our check and the move: theirs stays
            raise BadInput(self._appeared(dest)) from None
        except OSError as e:
            raise BadInput(f"cannot move the finished folder to {dest}: {e.strerror or e}") from None
        finally:
            if old is not None:  # the package --force asked to replace (or DIR.rejected): ours to remove
                shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return dest

    @staticmethod
    def _appeared(dest: Path) -> str:
        return (f"{dest} was created by someone else while edgekit worked (another build, or a user); it was left "
                "as it is and this result discarded: choose another --out, or pass --force to replace a package")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- stale leftovers


def _owner_alive(pid: int, made: float) -> bool:
    """The process that made a folder at time `made` still runs (same PID, started before the folder)."""
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.Process(pid).create_time() <= made + 1.0
    except Exception:  # NoSuchProcess, AccessDenied (another user's live process: keep its folder)
        return pid_exists(pid)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove staging folders (`.NAME.partial-PID-*`, `.NAME.old-PID-*`) in `parent` whose run is gone;
    only NAME's when given. Only names edgekit itself gives are ever touched, and only folders we own."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STAGED.match(p.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        removed += _remove_if_stale(p, int(m.group("pid")))
    return removed


def sweep_stale_runs(tmp: Path | None = None) -> list[Path]:
    """Remove `$TMPDIR/edgekit-run-PID-*` folders of runs that are gone."""
    root = Path(tmp or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _RUN_DIR.match(p.name)
        if m:
            removed += _remove_if_stale(p, int(m.group("pid")))
    return removed


def _remove_if_stale(p: Path, pid: int) -> list[Path]:
    try:
        st = p.lstat()
    except OSError:
        return []
    if p.is_symlink() or not p.is_dir() or st.st_uid != os.getuid() or _owner_alive(pid, st.st_mtime):
        return []
    shutil.rmtree(p, ignore_errors=True)
    return [p]


# ---------------------------------------------------------------- one CLI run


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Once: a second signal during cleanup must not cut the cleanup short.
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def stop_children(grace_s: float = 3.0) -> None:
    """Stop every child process still running (a timing pool, a converter): TERM, then KILL after grace."""
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    for c in children:
        with contextlib.suppress(psutil.Error):
            c.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for c in alive:
        with contextlib.suppress(psutil.Error):
            c.kill()


@contextlib.contextmanager
def cli_run() -> Iterator[Path]:
    """The CLI's frame for one run: signals unwind, a private temp folder (TMPDIR) removed at the end,
    stale leftovers of killed runs swept first. Yields the temp folder."""
    sweep_stale_runs()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s in previous:
        signal.signal(s, _raise_terminated)
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-"))
    os.environ["TMPDIR"] = str(run_dir)  # child processes and libraries that read it
    tempfile.tempdir = str(run_dir)
    try:
        yield run_dir
    finally:
        with contextlib.suppress(Exception):
            stop_children()
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(run_dir, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
