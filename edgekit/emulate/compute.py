"""Run artifacts under the emulator: the device runner's --compute mode (profiling/runner.py, the same loaders
a board runs) in the emulated aarch64 Python, fed an .npz of inputs, read back as an .npz of outputs."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.emulate.environment import Emulator, EmulatorUnavailable
from edgekit.errors import EdgekitError
from edgekit.jsonable import jsonable

RUNNER = Path(__file__).resolve().parent.parent / "profiling" / "runner.py"


@dataclass
class EmulatedRun:
    """What one emulated process computed: per artifact key, each output concatenated over the samples."""

    cpu: str
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    blobs: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)  # sample 0, every layer
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    hwcaps: list[str] | None = None  # the feature flags the emulated CPU reported (/proc/self/auxv)
    runtimes: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


def compute_outputs(emulator: Emulator, cpu: str, artifacts: list[dict[str, Any]], inputs: list[dict[str, Any]],
                    batches: list[dict[str, np.ndarray]], dists: list[str], intermediates: bool = False,
                    timeout_s: float = 1800) -> EmulatedRun:
    """Each artifact ({key, backend, precision, root, entry, details}) run on every batch under qemu with `cpu`."""
    missing = [d for d in dists if d not in emulator.runtimes]
    if missing:
        raise EmulatorUnavailable("; ".join(emulator.broken.get(d, f"{d} is not set up in the emulator")
                                            for d in missing))
    with tempfile.TemporaryDirectory(prefix="edgekit-emulate-") as tmp:
        work = Path(tmp)
        feeds = {f"{s}|{j}": np.ascontiguousarray(feed[t["name"]], np.dtype(t.get("dtype") or "float32"))
                 for s, feed in enumerate(batches) for j, t in enumerate(inputs)}
        np.savez(work / "feeds.npz", **feeds)
        request = {"artifacts": artifacts, "inputs": inputs, "feeds": str(work / "feeds.npz"),
                   "out": str(work / "out.npz"), "samples": len(batches), "threads": 1,
                   "intermediates": intermediates}
        (work / "request.json").write_text(json.dumps(request, default=jsonable))
        argv, env = emulator.command(cpu, [str(RUNNER), "--compute", str(work / "request.json")], dists)
        start = time.monotonic()
        try:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=work)
        except subprocess.TimeoutExpired as e:
            raise EdgekitError(f"the emulated run on {cpu} took over {timeout_s:.0f} s") from e
        wall = time.monotonic() - start
        lines = [x for x in r.stdout.strip().splitlines() if x.startswith("{")]
        if not lines:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            raise EdgekitError(f"the emulated runner on {cpu} failed: {tail[0][:300]}")
        reply = json.loads(lines[-1])
        if reply.get("error"):
            raise EdgekitError(f"the emulated runner on {cpu} failed: {reply['error']}")
        run = EmulatedRun(cpu, errors=reply.get("errors") or {}, seconds=reply.get("seconds") or {},
                          hwcaps=reply.get("hwcaps"), runtimes=reply.get("runtimes") or {}, wall_s=round(wall, 2))
        with np.load(work / "out.npz", allow_pickle=False) as got:
            for art in artifacts:
                key = art["key"]
                if key in run.errors:
                    continue
                n_out = sum(1 for k in got.files if k.startswith(f"{key}|0|"))
                run.outputs[key] = [np.concatenate([got[f"{key}|{s}|{j}"] for s in range(len(batches))]
                                                   ).astype(np.float64) for j in range(n_out)]
                names = (reply.get("blobs") or {}).get(key)
                if names:
                    run.blobs[key] = [(name, got[f"{key}|blob|{i}"]) for i, name in enumerate(names)]
    return run
