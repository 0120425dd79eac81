"""RKNN backend: `.rknn` files for Rockchip NPUs (RK3588, RK3576, RK3568, RK3566) built by Rockchip's rknn-toolkit2
in an isolated environment (env.py: its numpy/onnx/torch pins clash with edgekit's), driven through worker.py with
JSON in and out. INT8 (normal | mmse | kl_divergence calibration, per-channel weights) and FP16; layers kept in
float16 by the toolkit's hybrid quantization (the plan's exclude_nodes, the recovery ladder's float rung).

The toolkit's simulator runs only a model built in the same process, and a rebuilt .rknn is not byte-identical
(the file carries heap addresses). So the export builds, exports and runs the simulator on the validation
samples in one worker process, and keeps those outputs by the .rknn file's sha256 (rknn-simulated cache):
verification reads the outputs of the very file that ships. Inputs that export did not see (another sample set)
are computed by a rebuild with the same settings, and the artifact's notes say so. Latency: the cost model (the
target's NPU figures) until measured on a board, where the device runner uses rknn-toolkit-lite2."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.backends.rknn import env as rknn_env
from edgekit.errors import BadInput, EdgekitError
from edgekit.home import cache_dir

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan, QuantizationSettings

WORKER = Path(__file__).resolve().parent / "worker.py"
# edgekit's calibration methods -> the toolkit's quantized_algorithm (mmse: the clipping search that stands in
# for a percentile; the toolkit has no percentile calibration).
ALGORITHMS = {"minmax": "normal", "entropy": "kl_divergence", "percentile": "mmse"}
MAX_OPSET = 19  # load_onnx refuses newer ("Unsupport onnx opset 21, need <= 19")
REBUILT_NOTE = ("simulator outputs of some samples (beyond the validation set the export ran) come from a rebuild "
                "with the same settings: the simulator runs only a model built in its own process")


def _digest(batches: list[dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for feed in batches:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def _stacked(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([np.asarray(b[name], np.float32) for b in batches]) for name in batches[0]}


def simulated_store(rknn_sha256: str, batches_digest: str, rebuilt: bool = False) -> Path:
    """Where the simulator's outputs of these inputs are kept: the shipped file's own (computed in the process that
    built it), or a rebuild's with the same settings (`.rebuilt`), never mistaken for each other."""
    return cache_dir("rknn-simulated") / rknn_sha256[:40] / f"{batches_digest[:40]}{'.rebuilt' if rebuilt else ''}.npz"


def _store(src: Path, dest: Path) -> None:
    """src moved into the cache atomically, across file systems too (the work folder may be on a tmpfs)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def run_worker(request: dict[str, Any], work: Path, timeout_s: float = 3600) -> dict[str, Any]:
    """One worker process in the isolated env: its reply, or EdgekitError with the toolkit's one-line reason."""
    python = rknn_env.ensure_env(say=_say)
    (work / "request.json").write_text(json.dumps(request))
    try:
        r = subprocess.run([str(python), "-I", str(WORKER), str(work / "request.json"), str(work / "reply.json")],
                           capture_output=True, text=True, timeout=timeout_s, cwd=work)
    except subprocess.TimeoutExpired as e:
        raise EdgekitError(f"rknn-toolkit2 took over {timeout_s:.0f} s") from e
    try:
        reply = json.loads((work / "reply.json").read_text())
    except (OSError, ValueError):
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise EdgekitError(f"the rknn-toolkit2 worker failed: {tail[0]}") from None
    if not reply.get("ok"):
        raise EdgekitError(f"rknn-toolkit2: {reply.get('error') or 'failed'}")
    return reply


def _say(message: str) -> None:
    from edgekit.console import note

    note(message)


class RknnSession:
    """The simulator's outputs of the shipped .rknn (computed in the process that built it), per sample set."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact, self.threads = artifact, 1
        self.outputs = artifact.details["output_names"]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run_batches([feeds])[0]

    def run_batches(self, batches: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Outputs per batch: the export's own simulator run where it ran these samples, else a rebuild's."""
        d = self.artifact.details
        digest = _digest(batches)
        store = simulated_store(d["rknn_sha256"], digest)
        if not store.exists():
            store = simulated_store(d["rknn_sha256"], digest, rebuilt=True)
            if not store.exists():
                self._rebuild(batches, store)
            if REBUILT_NOTE not in self.artifact.notes:  # every time such outputs are used, not only when made
                self.artifact.notes.append(REBUILT_NOTE)
        with np.load(store, allow_pickle=False) as z:
            stacked = [z[name] for name in self.outputs]
        return [[s[i:i + 1] for s in stacked] for i in range(len(batches))]

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        raise EdgekitError("the RKNN simulator exposes no intermediate tensors to edgekit: `edgekit debug --backend "
                           "rknn` shows rknn-toolkit2's own per-layer accuracy_analysis instead")

    def layer_report(self, feeds: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """rknn-toolkit2's accuracy_analysis on these inputs (simulator vs float, per layer), from a rebuild with the
        artifact's settings (the analysis runs only in the process that built the model)."""
        with tempfile.TemporaryDirectory(prefix="edgekit-rknn-") as tmp:
            work = Path(tmp)
            np.savez(work / "validation.npz", **_stacked([feeds]))
            reply = run_worker({**self.artifact.details["request"], "out": str(work / "model.rknn"),
                                "outputs": str(work / "outputs.npz"), "validation": str(work / "validation.npz"),
                                "accuracy_analysis": True}, work)
        return list(reply.get("accuracy_analysis") or [])

    def _rebuild(self, batches: list[dict[str, np.ndarray]], store: Path) -> None:
        d = self.artifact.details
        with tempfile.TemporaryDirectory(prefix="edgekit-rknn-") as tmp:
            work = Path(tmp)
            request = {**d["request"], "out": str(work / "model.rknn"), "outputs": str(work / "outputs.npz"),
                       "validation": str(work / "validation.npz")}
            np.savez(work / "validation.npz", **_stacked(batches))
            run_worker(request, work)
            _store(work / "outputs.npz", store)


@register
class RknnBackend(Backend):
    name = "rknn"
    precisions = ("fp16", "int8")  # the NPU computes in these; its "float" model is fp16
    reference_precision = "fp16"
    requires = ()  # rknn-toolkit2 lives in its own environment (env.py), made on first use
    install_hint = "edgekit creates rknn-toolkit2's environment itself (Python 3.11 and network access to PyPI)"
    runs_on_accelerator = True
    simulates_at_export = True
    runtime_distributions = ()
    calibration_methods = ("minmax", "entropy", "percentile")
    device_modules = ("rknnlite", "numpy")
    report_color = "#009E73"

    def missing(self) -> str | None:
        return rknn_env.unusable_here()

    def versions(self) -> dict[str, str]:
        """The toolkit and its isolated environment's pins (not the host's numpy/onnx: those are edgekit's)."""
        pinned = [p.replace("==", " ") for p in rknn_env.PINS if not p.startswith("rknn-toolkit2")]
        return {"rknn-toolkit2": rknn_env.TOOLKIT_VERSION, "rknn-toolkit2 environment": ", ".join(pinned)}

    def measure_here(self) -> str | None:
        return ("a Rockchip NPU runs .rknn files; this machine has none: latency is the cost model's estimate from "
                "the target's NPU figures until measured on the board (`edgekit profile PACKAGE --device NAME`, "
                "rknn-toolkit-lite2 there)")

    def default_options(self) -> dict[str, Any]:
        return {}

    def plan_options(self, target: Any, requests: dict[str, Any] | None = None) -> dict[str, Any]:
        npu = getattr(target, "npu", None) or {}
        return {"platform": npu["platform"]} if npu.get("platform") else {}

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        issues = [OpIssue(self.name, n.op_type, n.name, "custom-domain op: rknn-toolkit2 converts standard ONNX ops")
                  for n in model.graph.node if n.domain not in ("", "ai.onnx")]
        for i in model.graph.input:
            dims = i.type.tensor_type.shape.dim
            if dims and dims[0].dim_value > 1:
                issues.append(OpIssue(self.name, "Input", i.name, f"the RKNN build takes batch 1, input has batch "
                                                                  f"{dims[0].dim_value}"))
        return issues

    def int8_retries(self, q: QuantizationSettings) -> list[tuple[str, QuantizationSettings]]:
        """The toolkit's other calibrations: KL clips rare outliers that set a minmax scale; mmse searches the
        clipping per tensor (slow: ~45x normal)."""
        return [(f"{ALGORITHMS[m]} calibration", dataclasses.replace(q, method=m))
                for m in ("entropy", "percentile") if m != q.method]

    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path,
               validation: Dataset | None = None) -> Artifact:
        platform = plan.options.get("platform")
        if not platform:
            raise BadInput(f"{self.name}: the target names no Rockchip NPU (npu.platform in its target file): use "
                           "--target rk3588, rk3576, rk3568 or rk3566")
        if plan.precision not in self.precisions:
            raise BadInput(f"{self.name} builds {' or '.join(self.precisions)} (the NPU has no fp32), not "
                           f"{plan.precision}")
        opset = max((o.version for o in spec.load().opset_import if o.domain in ("", "ai.onnx")), default=0)
        if opset > MAX_OPSET:
            raise BadInput(f"{self.name}: rknn-toolkit2 2.5 reads ONNX opset <= {MAX_OPSET}, the model is opset "
                           f"{opset}")
        q = plan.quantization
        int8 = plan.precision == "int8"
        if int8 and (calibration is None or len(calibration) == 0):
            raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
        request: dict[str, Any] = {
            "onnx": str(spec.onnx_path), "platform": platform, "precision": plan.precision,
            "quantized_algorithm": ALGORITHMS[q.method] if int8 and q else "normal",
            "quantized_method": "channel" if not q or q.per_channel else "layer", "optimization_level": 3,
            "float_layers": list(q.exclude_nodes) if int8 and q else [], "accuracy_analysis": False}
        with tempfile.TemporaryDirectory(prefix="edgekit-rknn-") as tmp:
            work = Path(tmp)
            if int8 and calibration is not None:
                samples = min(len(calibration), q.samples if q else 300)
                np.savez(work / "calibration.npz", **{k: v[:samples] for k, v in calibration.inputs.items()})
                # The calibration set travels with the request a rebuild replays, kept beside the cache entry.
                request["calibration"] = str(_keep(work / "calibration.npz"))
            batches = validation.batches(spec) if validation is not None and len(validation) else []
            if batches:
                np.savez(work / "validation.npz", **_stacked(batches))
            reply = run_worker({**request, "out": str(root / "model.rknn"), "outputs": str(work / "outputs.npz"),
                                "validation": str(work / "validation.npz") if batches else None}, work)
            sha = hashlib.sha256((root / "model.rknn").read_bytes()).hexdigest()
            if batches:
                _store(work / "outputs.npz", simulated_store(sha, _digest(batches)))
        return self._artifact(plan, root, request, reply, sha)

    def _artifact(self, plan: ArtifactPlan, root: Path, request: dict[str, Any], reply: dict[str, Any],
                  sha: str) -> Artifact:
        floats = reply.get("float_layers") or []
        not_applied = [f["requested"] for f in floats if not f.get("applied")]
        if not_applied:
            raise EdgekitError(f"rknn-toolkit2 did not keep {', '.join(not_applied)} in float16 (hybrid quantization)")
        cpu_ops = sorted({la["op"] for la in reply.get("layers") or [] if la.get("target") == "CPU"})
        details: dict[str, Any] = {
            "converter": f"rknn-toolkit2 {rknn_env.TOOLKIT_VERSION}", "platform": request["platform"],
            "rknn_sha256": sha, "output_names": [o["name"] for o in reply.get("outputs") or []],
            "where": "rknn-simulator", "request": request, "toolkit_versions": reply.get("versions"),
            "seconds": reply.get("seconds")}
        if plan.precision == "int8":
            details.update(quantized_algorithm=request["quantized_algorithm"],
                           quantized_method=request["quantized_method"], quantized_dtype="w8a8")
        if floats:
            details["float_layers"] = floats
        notes = [f"the toolkit runs {', '.join(cpu_ops)} on the CPU, not the NPU"] if cpu_ops else []
        warnings = [w["text"] for w in reply.get("warnings") or [] if "dtype" in w["text"] or "outlier" in w["text"]]
        notes += warnings[:5]
        return Artifact(self.name, plan.precision, str(root), ["model.rknn"], "model.rknn", details, notes)

    def load(self, artifact: Artifact, threads: int) -> RknnSession:
        if not artifact.details.get("output_names"):
            raise EdgekitError(f"{artifact.key} records no outputs: rebuild it")
        return RknnSession(artifact)


def _keep(path: Path) -> Path:
    """A content-addressed copy of a calibration .npz under the cache (a later rebuild replays the same data)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    dest = cache_dir("rknn-simulated") / "calibration" / f"{digest[:40]}.npz"
    if not dest.exists():
        _store(path, dest)
    return dest
