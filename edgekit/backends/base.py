"""The backend protocol: what every runtime (ONNX Runtime, OpenVINO, NCNN, TensorRT, ...) provides.

A backend knows which precisions and ops it supports, exports an Artifact (doing its own
quantization through the library made for it), and loads an Artifact into a Session that runs it.
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

    def plan_options(self, target: Any, requests: dict[str, Any] | None = None) -> dict[str, Any]:
        """Backend settings that follow from the target and the user's requests (e.g. dla_core),
        recorded in the plan and passed to export. Backends ignore requests that are not theirs."""
        return {}

    def int8_retries(self, q: QuantizationSettings) -> list[tuple[str, QuantizationSettings]]:
        """What the build tries, in order, when an INT8 artifact is rejected (each kept only if it passes);
        by default 7-bit weights where the backend has them."""
        if self.int8_reduce_range and not q.reduce_range:
            return [("7-bit weights", dataclasses.replace(q, reduce_range=True))]
        return []

    def prepare_timing_process(self, threads: int) -> None:  # noqa: B027 - optional hook
        """Called once in the dedicated timing process, before any load (e.g. shared thread pools)."""
