"""A complete minimal backend from outside edgekit's tree, as a third party would write one: "toy".

FP32 only: the artifact is the canonical ONNX, copied; its own Session class runs it in ONNX Runtime (a
real runtime, real numbers). It joins the host-cpu target through Backend.extra_targets, without editing
targets/host-cpu.yaml, and registers itself with edgekit.backends.register when imported (edgekit's timing
processes import this module again through $EDGEKIT_BACKENDS, which register sets).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekit.backends import Artifact, Backend, OpIssue, register
from edgekit.errors import BadInput

PROVIDERS = ["CPUExecutionProvider"]


class ToySession:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        self.threads = threads
        self.path = Path(path)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # ONNX Runtime prints its provider retry
                self.session = ort.InferenceSession(str(path), opts, providers=PROVIDERS)
        except RuntimeError as e:
            # In edgekit's timing process the onnxruntime backend (the reference, timed beside every
            # artifact) has set ONNX Runtime's process-wide thread pool: every session must join it.
            if "global thread pool" not in str(e):
                raise
            opts.use_per_session_threads = False
            self.session = ort.InferenceSession(str(path), opts, providers=PROVIDERS)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, feeds)

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        """Every float node output, exposed as an extra graph output, in graph order."""
        import onnxruntime as ort

        model = onnx.shape_inference.infer_shapes(onnx.load(str(self.path)))
        typed = {v.name: v for v in [*model.graph.value_info, *model.graph.output]
                 if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
        names = [o for n in model.graph.node for o in n.output if o in typed]
        existing = {o.name for o in model.graph.output}
        model.graph.output.extend(typed[n] for n in names if n not in existing)
        session = ort.InferenceSession(model.SerializeToString(), providers=PROVIDERS)
        return [([n], np.asarray(v, np.float32)) for n, v in zip(names, session.run(names, feeds))]


@register
class ToyBackend(Backend):
    name = "toy"
    precisions = ("fp32",)
    requires = ("onnxruntime",)
    install_hint = "pip install onnxruntime"
    runtime_distributions = ("onnxruntime",)
    extra_targets = ("host-cpu",)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": metadata.version("onnxruntime")}

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        return [OpIssue(self.name, n.op_type, n.name, "the toy runs the default ONNX domain only")
                for n in model.graph.node if n.domain not in ("", "ai.onnx")]

    def export(self, spec: Any, plan: Any, calibration: Any, root: Path) -> Artifact:
        if plan.precision not in self.precisions:
            raise BadInput(f"{self.name} cannot build precision {plan.precision}")
        shutil.copyfile(spec.onnx_path, root / "model.onnx")
        return Artifact(self.name, plan.precision, str(root), ["model.onnx"], "model.onnx",
                        {"runtime": "onnxruntime, through the toy's own session"})

    def load(self, artifact: Artifact, threads: int) -> ToySession:
        return ToySession(artifact.entry_path, threads)
