"""What a build is asked for (BuildOptions, made from the CLI or the Python API) and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.compress.stage import CompressOptions
from edgekit.profiling.timing import ProfileSettings
from edgekit.tasks.evaluator import TaskSettings
from edgekit.verify.verifier import Thresholds

RECOVER_MODES = ("auto", "none")


@dataclass
class BuildOptions:
    model: str
    target: str
    out: str | None = None
    backend: str | None = None  # a name, a comma list, or "all"; None: the target's first usable
    precisions: list[str] | None = None  # None: the lowest precision the target supports
    calib: str | None = None
    val: str | None = None
    preprocess: str | None = None
    input_shapes: list[str] = field(default_factory=list)
    weights: str | None = None
    calib_method: str = "minmax"
    calib_samples: int = 300
    val_samples: int = 500
    exclude_nodes: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    threads: int | None = None
    memory: bool = True
    force: bool = False
    dla_core: int | None = None  # TensorRT: build for this DLA core (GPU fallback on)
    compress: CompressOptions | None = None  # pruning / distillation before quantization
    plan: str | None = None  # plan.yaml from `edgekit plan`: applied exactly instead of the default rules
    # Without a plan and with no precision asked for (auto), the planner chooses backend and precision
    # first (`edgekit plan`); False keeps the target's default rules (the lowest precision it runs).
    auto_plan: bool = True
    train: str | None = None  # training data for a plan that prunes and distills (overrides the plan's)
    device: str | None = None  # the planner measures its candidates on this device (`edgekit devices`)
    cache: bool = True  # reuse finished stages whose inputs are unchanged (edgekit/cache.py)
    remeasure: bool = False  # time again even when the cache holds a measurement of the same artifacts here
    # All-or-nothing even for --backend all / --precision all (each failed artifact then rejects the build).
    strict: bool = False
    recover: str = "auto"  # INT8 that misses the thresholds: auto = the retries below before rejecting; none
    detector_head: bool = True  # INT8 of a detector keeps its head in float (quantize.detection_head)
    task_settings: TaskSettings = field(default_factory=TaskSettings)  # --task, --decoder, --max-metric-drop ...
    recover_budget: float = 900.0  # seconds the recovery ladder may spend per artifact
    qat_epochs: int = 3  # the ladder's quantization-aware training rung
    # ARM targets: verify again in the target's runtime under qemu with its CPU model (pipeline/isa_check.py):
    # auto = where the emulator runs here (else a warning), require = reject what cannot be checked, off.
    emulate: str = "auto"
    emulate_samples: int = 16  # validation samples the emulated run computes (qemu: 0.1-1.3 s per inference)
    # Candidates evaluated as tasks on a Ray cluster at this address ("local": a Ray of this process's own); None:
    # here, one after another. Timing stays on one measurer either way.
    cluster: str | None = None


@dataclass
class BuildResult:
    manifest: dict[str, Any]
    path: Path
    exit_code: int


def default_out(model: str, target: str) -> str:
    return f"build/{Path(model.split(':')[-1]).stem}-{target}"
