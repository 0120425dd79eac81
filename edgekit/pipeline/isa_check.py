"""Verification on the target's own arithmetic: an ARM target's artifacts, already verified on this host, are run
again in the target's aarch64 runtime under qemu-user with the board's CPU model (edgekit.emulate), on a bounded
sample of the validation data, and judged by the same thresholds and task metric. An artifact passes only if both
runs pass. Where the runtime has a faster mode only the board computes (ncnn's fp16 arithmetic on ARMv8.2), the
emulated run decides whether the artifact ships with it (Backend.emulation_variants)."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit import backends
from edgekit.backends.base import Artifact, Backend
from edgekit.console import note, progress
from edgekit.emulate import EmulatorUnavailable, compute_outputs, ensure_emulator, qemu_cpu
from edgekit.emulate.environment import Emulator
from edgekit.errors import EdgekitError
from edgekit.targets import Target, detect_host
from edgekit.verify.verifier import Verification

if TYPE_CHECKING:
    from edgekit.pipeline.candidates import Verifier

EMULATE_MODES = ("auto", "require", "off")


def emulation_fallbacks(chosen: list[Backend]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for b in chosen:
        for dist, versions in b.emulation_fallbacks.items():
            out[dist] = tuple(dict.fromkeys((*out.get(dist, ()), *versions)))
    return out


def emulated_backends() -> list[Backend]:
    """Every registered backend whose artifacts verify under emulation (edgekit emulator setup's default)."""
    return [b for b in backends.all_backends() if b.verifies_under_emulation]


def host_where() -> str:
    """What the host verification ran on, as the manifest's verification.where says it."""
    cpu = detect_host()["cpu"]
    flags = [f for f in cpu.get("isa", []) if f in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "asimdhp")]
    return f"host {platform.machine()} {cpu.get('model', '')} ({', '.join(flags) or 'baseline ISA'})".strip()


@dataclass
class IsaCheck:
    """The emulated verification of one build's target (None where the host computes as the target does)."""

    target: Target
    cpu: str  # the target's CPU (isa.cpu)
    qemu_cpu: str  # the qemu model run (the same, or a stand-in with the same features)
    samples: int
    require: bool  # --emulate require: an artifact that cannot be checked there is rejected
    emulator: Emulator | None = None
    unavailable: str | None = None  # why the emulator cannot run here
    stand_in: str | None = None
    setup: tuple[list[str], dict[str, tuple[str, ...]]] | None = None  # ensure_emulator's arguments

    @property
    def where(self) -> str:
        return f"qemu-{self.emulator_arch} {self.qemu_cpu}"

    @property
    def emulator_arch(self) -> str:
        return (self.target.isa or {}).get("arch", "aarch64")

    @classmethod
    def for_target(cls, target: Target, chosen: list[Backend], mode: str, samples: int) -> IsaCheck | None:
        cpu = target.emulated_cpu
        emulated = [b for b in chosen if b.verifies_under_emulation]
        if mode == "off" or cpu is None or not emulated:
            return None
        check = cls(target, cpu, cpu, max(1, samples), mode == "require")
        try:
            check.qemu_cpu, check.stand_in = qemu_cpu(cpu)
            check.setup = (sorted({d for b in emulated for d in b.runtime_distributions}),
                           emulation_fallbacks(emulated))
            check.emulator = ensure_emulator(*check.setup)
        except EmulatorUnavailable as e:
            check.unavailable = str(e)
            note(f"[yellow]warning[/yellow]: {target.name} artifacts are verified on this host only, not on "
                 f"{cpu} arithmetic: {e}" + ("" if check.require else " (--emulate require makes that a rejection)"))
        return check

    def on_this_machine(self) -> None:
        """A cluster task on another machine: the emulator the driver verified with, set up here too (a cluster
        plan must verify as the local one does); EdgekitError where this node cannot run it."""
        if self.emulator is None or self.setup is None or self.emulator.root.is_dir():
            return
        try:
            self.emulator = ensure_emulator(*self.setup)
        except EmulatorUnavailable as e:
            raise EdgekitError(f"cluster node {platform.node()} cannot run the {self.cpu} emulator the driver "
                               f"verifies {self.target.name} artifacts on ({e}): install qemu-user and mmdebstrap on "
                               "every node (scripts/system-deps.sh), or pass --emulate off") from None

    def check(self, verifier: Verifier, art: Artifact, host: Verification) -> Verification:
        """The host verdict `host`, joined with the emulated one (verification.isa); art.details["runtime_options"]
        takes the variant that verified there."""
        backend = backends.get(art.backend)
        if backend.runs_on_accelerator:  # an NPU's artifact: its own simulator is the target's arithmetic
            return host
        host.where = host_where()
        if not backend.verifies_under_emulation:
            return self._not_checked(host, f"no {art.backend} runtime runs under qemu here")
        if not host.passed:  # rejected already: the emulated run could not change that
            host.isa = {"where": self.where, "cpu": self.cpu, "passed": None, "skipped": "rejected on this host"}
            return host
        if self.unavailable or self.emulator is None:
            return self._not_checked(host, self.unavailable or "the emulator is not set up")
        dists = list(backend.runtime_distributions)
        broken = [self.emulator.broken[d] for d in ["numpy", *dists] if d in self.emulator.broken]
        if broken:
            return self._not_checked(host, "; ".join(broken))
        variants = backend.emulation_variants(art, list(self.target.cpu.get("isa", [])))
        sub = verifier.subset(self.samples)
        if host.tensor_passed:  # what the host met, the board must meet: its tensor figures bind there too
            sub.task_settings = dataclasses.replace(sub.task_settings, strict_tensors=True)
        base = dict(art.details.get("runtime_options") or {})
        runs = [{"key": f"{art.key}#{i}", "backend": art.backend, "precision": art.precision, "root": art.root,
                 "entry": art.entry, "files": art.files,
                 "details": {**art.details, "runtime_options": {**base, **opts}}}
                for i, (_, opts) in enumerate(variants)]
        start = time.monotonic()
        outputs, errors, meta = self._run(verifier, runs, sub.batches, dists)
        records, chosen = [], None
        last = runs[-1]["key"]  # the most conservative mode (the artifact as built, or fp16 storage only)
        for (label, opts), run in zip(variants, runs):
            if run["key"] in errors:
                records.append({"variant": label, "passed": False, "error": errors[run["key"]]})
                continue
            v = sub.judge(outputs[run["key"]], art.precision)
            record = {"variant": label, "runtime_options": opts, **_figures(v)}
            unexercised = self._unexercised(run["key"], last, outputs, meta, opts)
            if unexercised:  # a faster mode that computed exactly what the fallback did was never run: not chosen
                record.update(passed=False, error=unexercised)
            records.append(record)
            if chosen is None and record["passed"]:
                chosen = len(records) - 1
        kept = records[chosen if chosen is not None else -1]
        isa: dict[str, Any] = {"where": self.where, "cpu": self.cpu, "samples": len(sub.reference[0]),
                               **{k: v for k, v in kept.items() if k != "runtime_options"},
                               "passed": chosen is not None, "hwcaps": meta.get("hwcaps"),
                               "runtimes": {**meta.get("runtimes", {}),
                                            **{d: self.emulator.runtimes[d] for d in dists}},
                               "seconds": round(time.monotonic() - start, 2)}
        if self.stand_in:
            isa["note"] = self.stand_in
        notes = [self.emulator.notes[d] for d in dists if d in self.emulator.notes]
        if notes:
            isa["runtime_notes"] = notes
        if len(records) > 1:
            isa["variants"] = records
        host.isa = isa
        if chosen is not None:
            self._keep_variant(verifier, art, host, variants, chosen, records, base)
        else:
            host.passed = False
            why = kept.get("error") or "; ".join(kept.get("failures") or []) or "missed the thresholds"
            host.failures.append(f"on {self.where} ({isa['samples']} samples): {why}")
        note(f"verify {art.key} on {self.where} ({isa['samples']} samples): " + ", ".join(
            f"{r['variant']} " + (f"ok (cosine {r['cosine_min']:.5f})" if r.get("passed") else
                                  f"REJECTED ({r.get('error') or '; '.join(r.get('failures') or [])})")
            for r in records))
        return host

    @staticmethod
    def _unexercised(key: str, fallback: str, outputs: dict[str, list[np.ndarray]], meta: dict[str, Any],
                     opts: dict[str, Any]) -> str | None:
        """Why a variant's mode cannot have run: fp16 arithmetic on a CPU that did not report asimdhp, or outputs
        bit-identical to the fallback mode's (the runtime quietly fell back)."""
        if key == fallback:
            return None
        if opts.get("use_fp16_arithmetic") and "asimdhp" not in (meta.get("hwcaps") or []):
            return "the emulated CPU reported no fp16 arithmetic (asimdhp): the mode was never exercised"
        if fallback in outputs and key in outputs and all(
                np.array_equal(a, b) for a, b in zip(outputs[key], outputs[fallback])):
            return "its outputs are bit-identical to the fallback mode's: the runtime did not use it"
        return None

    def _keep_variant(self, verifier: Verifier, art: Artifact, host: Verification, variants: list[Any],
                      chosen: int, records: list[dict[str, Any]], base: dict[str, Any]) -> None:
        label, opts = variants[chosen]
        if len(variants) > 1:
            art.details["emulated_variant"] = label
            rejected = [f"{r['variant']}: " + (r.get("error") or "; ".join(r.get("failures") or []))
                        for r in records[:chosen]]
            if rejected:
                art.notes.append(f"built for {label}: on {self.where} " + "; ".join(rejected))
        if {**base, **opts} != base:
            art.details["runtime_options"] = {**base, **opts}
            # The host computes with the options the package ships with, too (x86 ignores what it has no kernel
            # for): its verdict is taken again with them, so the manifest's figures are those of what ships.
            again = verifier.judge(verifier.stages.outputs(art, verifier.batches, verifier.threads), art.precision)
            if not again.passed:
                host.passed = False
                host.failures += [f"with {label}: {f}" for f in again.failures]

    def _not_checked(self, host: Verification, why: str) -> Verification:
        host.isa = {"where": self.where, "cpu": self.cpu, "passed": None, "skipped": why}
        if self.require:
            host.passed = False
            host.failures.append(f"not verified on {self.where} (--emulate require): {why}")
        else:
            host.notes.append(f"verified on this host only, not on {self.cpu} arithmetic: {why}")
        return host

    def _run(self, verifier: Verifier, runs: list[dict[str, Any]], batches: list[dict[str, np.ndarray]],
             dists: list[str]) -> tuple[dict[str, list[np.ndarray]], dict[str, str], dict[str, Any]]:
        """Every variant's outputs in one emulated process, through the build cache (same files, options, data,
        emulated CPU and runtime versions: the same numbers)."""
        from edgekit.cache import digest, files_digest

        assert self.emulator is not None
        cache = verifier.stages.cache
        inputs = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in verifier.spec.inputs]
        versions = {d: self.emulator.runtimes.get(d) for d in ["numpy", *dists]}
        qemu = self.emulator.to_dict()["qemu_version"]  # qemu's own fp16/int emulation is part of the result
        keys = {r["key"]: digest("emulated", self.qemu_cpu, qemu, versions, r["backend"], r["precision"],
                                 files_digest(Path(r["root"]), r["files"]),
                                 r["details"]["runtime_options"], batches) for r in runs}
        outputs: dict[str, list[np.ndarray]] = {}
        meta = cache.get_json("emulated", digest(*keys.values()), "emulated run") or {}
        for r in runs:
            got = cache.get_arrays("emulated", keys[r["key"]], f"emulated {r['key']}") if meta else None
            if got is not None:
                outputs[r["key"]] = got
        todo = [r for r in runs if r["key"] not in outputs]
        errors: dict[str, str] = {}
        if todo:
            with progress() as bar:
                bar.add_task(f"verifying {todo[0]['key'].split('#')[0]} on {self.where} ({len(batches)} samples, "
                             f"{len(todo)} variant(s))", total=None)
                run = compute_outputs(self.emulator, self.qemu_cpu, todo, inputs, batches, dists)
            errors = run.errors
            for r in todo:
                if r["key"] in run.outputs:
                    outputs[r["key"]] = run.outputs[r["key"]]
                    cache.put_arrays("emulated", keys[r["key"]], run.outputs[r["key"]])
            meta = {"hwcaps": run.hwcaps, "runtimes": run.runtimes}
            if not errors:
                cache.put_json("emulated", digest(*keys.values()), meta)
        return outputs, errors, meta


def _figures(v: Verification) -> dict[str, Any]:
    fig: dict[str, Any] = {"passed": v.passed, "cosine_min": v.cosine_min, "snr_db_min": v.snr_db_min}
    if v.centred_cosine_min is not None:
        fig["centred_cosine_min"] = v.centred_cosine_min
    if v.task is not None:
        fig["task"] = {k: x for k, x in v.task.to_dict().items() if k != "examples"}  # the report draws host's
    if v.failures:
        fig["failures"] = list(v.failures)
    return fig
