"""An artifact as a Session whose numbers come from the emulated board: `edgekit debug --emulate` localises the
ARM run's intermediate blobs against the FP32 reference exactly as it does the host's."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.backends.base import Artifact
from edgekit.emulate.compute import compute_outputs
from edgekit.emulate.environment import Emulator
from edgekit.errors import EdgekitError


class EmulatedSession:
    """run / run_intermediates through the device runner under qemu; `host` (the same artifact loaded here) turns
    the blobs the runtime holds into the floats the next layer consumes (Session.as_floats, where it has one)."""

    def __init__(self, emulator: Emulator, cpu: str, artifact: Artifact, inputs: list[dict[str, Any]],
                 dists: list[str], host: Any) -> None:
        self.emulator, self.cpu, self.inputs, self.dists, self.host = emulator, cpu, inputs, dists, host
        self.threads = 1
        self.request = {"key": artifact.key, "backend": artifact.backend, "precision": artifact.precision,
                        "root": artifact.root, "entry": artifact.entry, "details": artifact.details}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = compute_outputs(self.emulator, self.cpu, [self.request], self.inputs, [feeds], self.dists)
        self._raise(got.errors)
        return got.outputs[self.request["key"]]

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        got = compute_outputs(self.emulator, self.cpu, [self.request], self.inputs, [feeds], self.dists,
                              intermediates=True)
        self._raise(got.errors)
        blobs = [([name], arr) for name, arr in got.blobs.get(self.request["key"], [])]
        if not blobs:
            raise EdgekitError(f"the emulated {self.request['backend']} run exposed no intermediate blobs")
        return self.host.as_floats(blobs) if hasattr(self.host, "as_floats") else blobs

    def _raise(self, errors: dict[str, str]) -> None:
        if errors:
            raise EdgekitError(f"under qemu ({self.cpu}): {errors[self.request['key']]}")
