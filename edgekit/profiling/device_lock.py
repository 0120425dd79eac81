"""One measurement per device at a time, whoever asks: an exclusive fcntl lock on
`$EDGEKIT_HOME/locks/device-NAME.lock`, held for the whole measurement (probe, copy, run, clean-up). Two
`edgekit profile` runs, a pool's threads and a cluster task on the node that reaches the device all take it; the
pid and the holder's purpose are written into the file so a waiter can say who holds it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from edgekit.console import note
from edgekit.errors import EdgekitError
from edgekit.profiling.devices import edgekit_home

LOCK_WAIT_S = 3600.0  # a measurement takes minutes at most (a TensorRT engine build: ENGINE_BUILD_S)
POLL_S = 0.25


def lock_path(device: str) -> Path:
    return edgekit_home() / "locks" / f"device-{device}.lock"


@contextlib.contextmanager
def device_lock(device: str, purpose: str = "measuring", wait_s: float = LOCK_WAIT_S) -> Iterator[float]:
    """Hold the device's lock; yields the seconds spent waiting for it. EdgekitError after wait_s."""
    path = lock_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(path, "a+") as f:
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    note(f"device {device} is busy ({holder}); waiting for it")
                    told = True
                if time.monotonic() - start > wait_s:
                    raise EdgekitError(f"device {device} stayed busy for {wait_s:g} s ({path} is locked); "
                                       "try again when the other measurement is done") from None
                time.sleep(POLL_S)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} {purpose}")
            f.flush()
            yield time.monotonic() - start
        finally:
            with contextlib.suppress(OSError):
                f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
