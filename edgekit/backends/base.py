"""The backend protocol: what every runtime (ONNX Runtime, OpenVINO, NCNN, TensorRT, ...) provides.

A backend knows which precisions and ops it supports, exports an Artifact (doing its own
quantization through the library made for it), and loads an Artifact into a Session that runs it.
What the rest of edgekit needs to know about a backend is a capability declared here with its
default (the cost model's accelerator, the device runner's modules, ...), never the backend's name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import onnx

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan, QuantizationSettings


@dataclass
class OpIssue:
    """A node the backend cannot run."""

    backend: str
    op_type: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"op {self.op_type} (node '{self.node}') is not supported by {self.backend}: {self.reason}"


@dataclass
class Artifact:
    """What an exporter wrote: files under `root`, the one to load (`entry`), and how it was made."""

    backend: str
    precision: str
    root: str  # folder holding the files (inside the package being written)
    files: list[str]  # relative to root
    entry: str  # relative to root
    details: dict[str, Any] = field(default_factory=dict)  # settings used, nodes kept in float, ...
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}"

    @property
    def entry_path(self) -> Path:
        return Path(self.root) / self.entry

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Session(Protocol):
    """A loaded artifact. `run` returns the outputs in the order of ModelSpec.outputs."""

    threads: int

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        """Every intermediate float tensor the runtime can expose, as (its names, float32 values), in the
        backend's execution order (`edgekit debug`, the localisation of a rejected artifact): the values the
        next layer consumes (dequantized where the runtime holds int8 codes). A session that cannot expose
        them raises EdgekitError saying what to run instead."""
        ...


class Backend(ABC):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    requires: ClassVar[tuple[str, ...]]  # importable modules the backend needs
    install_hint: ClassVar[str]
    # Can re-quantize keeping the most harmful layers in float until an accuracy budget holds
    # (QuantizationSettings.accuracy_control; needs labelled calibration data).
    accuracy_control: ClassVar[bool] = False
    # INT8 kernels multiply u8 activations by s8 weights with 16-bit intermediates (x86 without VNNI):
    # 7-bit weights avoid the saturation (ONNX Runtime reduce_range, NNCF overflow_fix).
    int8_reduce_range: ClassVar[bool] = False
    int8_symmetric_only: ClassVar[bool] = False  # symmetric INT8 activations only (TensorRT)
    # INT8 quantizes weighted layers only (the rest runs in float anyway): nodes to keep in float are
    # narrowed to the weighted ones (ncnn).
    int8_weighted_layers_only: ClassVar[bool] = False
    # Takes a prequantized Q/DQ ONNX (QuantizationSettings.qdq_model: quantization-aware training's result) as
    # its INT8 artifact; the recovery ladder's QAT rung is tried only where it does.
    # The calibration methods (QuantizationSettings.method) that give this backend different ranges; the
    # recovery ladder tries no other (NNCF has one way to calibrate: an "entropy" build is the minmax file).
    calibration_methods: ClassVar[tuple[str, ...]] = ("minmax", "entropy", "percentile")
    takes_qdq_onnx: ClassVar[bool] = False
    # The precision of the backend's own reference build (the speedup base): fp32, or fp16 where the device has
    # no fp32 (an NPU).
    reference_precision: ClassVar[str] = "fp32"
    # export() takes the validation Dataset too and runs it in the process that built the artifact (a simulator
    # that runs only models built in its own session: RKNN); its Session then has run_batches.
    simulates_at_export: ClassVar[bool] = False
    # Runs on a GPU/NPU target's accelerator (the cost model's accelerator figures); else on its CPU.
    runs_on_accelerator: ClassVar[bool] = False
    # pip distributions of the runtime, whose installed versions a detected (host) target reports.
    runtime_distributions: ClassVar[tuple[str, ...]] = ()
    # Targets that run this backend besides those whose YAML lists it: how a backend from outside
    # edgekit's tree joins a target (targets.load_target appends it) without editing the target's file.
    extra_targets: ClassVar[tuple[str, ...]] = ()
    report_color: ClassVar[str | None] = None  # the backend's colour in report charts; None: one of the spares
    # Its artifacts run in the device runner's loaders on the aarch64 wheels of runtime_distributions under
    # qemu-user (edgekit.emulate): an ARM target's artifacts are verified there too, on the board's CPU model.
    verifies_under_emulation: ClassVar[bool] = False
    # Releases of runtime_distributions to try there, newest first, where the host's aarch64 wheel does not run
    # under qemu: {distribution: (version, ...)}.
    emulation_fallbacks: ClassVar[dict[str, tuple[str, ...]]] = {}
    # ---- what the device runner (profiling/runner.py, standard library only) needs
    # Python modules the runner imports on the device to run the artifacts (its BACKEND_NEEDS table must
    # agree); None: the runner cannot run them.
    device_modules: ClassVar[tuple[str, ...] | None] = None
    # The artifact is compiled on the device before it runs (an engine tied to the device's GPU and
    # runtime version): the device keeps an engine cache, and measuring may include the build.
    needs_engine_build_on_device: ClassVar[bool] = False
    # Files at the package's top level the device needs beside the artifact folders (a build script).
    device_package_files: ClassVar[tuple[str, ...]] = ()

    def missing(self) -> str | None:
        """None when usable here, else what to install."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"{', '.join(absent)} not installed ({self.install_hint})" if absent else None

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the runtime and converters this backend uses (recorded in the manifest)."""

    @abstractmethod
    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        """Nodes of the canonical model the backend cannot run; empty when all can."""

    @abstractmethod
    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path) -> Artifact:
        """Write the artifact's files under root (created by the caller)."""

    @abstractmethod
    def load(self, artifact: Artifact, threads: int) -> Session:
        """Load the artifact into this machine's runtime."""

    def measure_here(self) -> str | None:
        """None when artifacts can be timed on this machine; else why not (latency is then estimated)."""
        return None

    def default_options(self) -> dict[str, Any]:
        """The backend's own build requests (e.g. TensorRT's dla_core) with their defaults: the shared code
        passes the user's requests through to plan_options untouched."""
        return {}

    def plan_options(self, target: Any, requests: dict[str, Any] | None = None) -> dict[str, Any]:
        """Backend settings that follow from the target and the user's requests (e.g. dla_core),
        recorded in the plan and passed to export. Backends ignore requests that are not theirs."""
        return {}

    def check_plan(self, plan: ArtifactPlan, where: str) -> None:  # noqa: B027 - optional hook
        """Raise BadInput naming `where` when a plan's settings that only this backend uses are out of
        range (a plan file may come from someone else)."""

    def device_blocker(self, facts: dict[str, Any]) -> str | None:
        """Why a device whose probe gave `facts` cannot run this backend's artifacts, beyond the Python
        modules of device_modules (a tool missing there), as a phrase after "device NAME"; else None."""
        return None

    def device_latency(self, result: dict[str, Any], where: str) -> dict[str, Any]:
        """Fields that replace or add to the device runner's timing of one artifact (`result`, as the runner
        wrote it): figures the runtime's own tool reported (TensorRT: trtexec's GPU compute time). None here."""
        return {}

    def emulation_variants(self, artifact: Artifact, cpu_features: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """Runtime option sets to verify under emulation on a CPU with these features, the fastest first, as
        (what it is, options merged into details["runtime_options"]); the first that verifies is kept. By
        default the artifact as built."""
        return [("as built", {})]

    def arithmetic_precision(self, precision: str, details: dict[str, Any]) -> str:
        """The precision the target's kernels compute this artifact in (the cost model's peak), where it can differ
        from the precision it stores (details: the artifact's, runtime_options included). By default the same."""
        return precision

    def int8_retries(self, q: QuantizationSettings) -> list[tuple[str, QuantizationSettings]]:
        """What the build tries, in order, when an INT8 artifact is rejected (each kept only if it passes);
        by default 7-bit weights where the backend has them."""
        if self.int8_reduce_range and not q.reduce_range:
            return [("7-bit weights", dataclasses.replace(q, reduce_range=True))]
        return []

    def prepare_timing_process(self, threads: int) -> None:  # noqa: B027 - optional hook
        """Called once in the dedicated timing process, before any load (e.g. shared thread pools)."""
