"""ARM numerics on this host: the target's own runtimes (aarch64 wheels) under qemu-user with the board's CPU
model, so an artifact for a Raspberry Pi or an RK3588 is verified on the kernels that board runs (ncnn's fp16
arithmetic, int8 dot product), not only on x86's. Numerics only: qemu says nothing about latency.

environment.py sets the emulator up (an arm64 Debian userland, the host's runtime versions as aarch64 wheels)
and runs Python in it; compute.py runs artifacts there through the device runner's --compute mode."""

from edgekit.emulate.compute import EmulatedRun, compute_outputs
from edgekit.emulate.environment import Emulator, EmulatorUnavailable, emulator_status, ensure_emulator, qemu_cpu

__all__ = ["EmulatedRun", "Emulator", "EmulatorUnavailable", "compute_outputs", "emulator_status",
           "ensure_emulator", "qemu_cpu"]
