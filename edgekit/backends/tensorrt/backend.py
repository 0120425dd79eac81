"""TensorRT backend (Jetson and NVIDIA GPUs).

An engine is tied to one GPU architecture and TensorRT version, so the portable artifact is the ONNX
TensorRT will compile plus the exact command that compiles it on the device:
- fp32 / fp16: the canonical ONNX; FP16 is a builder setting, with layers outside the FP16 range (or
  named by the plan) held in FP32 by precision constraints.
- int8: explicit quantization, never the implicit calibrators (deprecated since TensorRT 10.1): a Q/DQ
  ONNX following TensorRT's rules (symmetric INT8, per-output-channel weight scales, per-tensor
  activation scales, Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul and on both inputs of
  residual Adds, opset >= 13) produced by ONNX Runtime's quantizer from the user's calibration data.
  TensorRT 8.x builds it weakly typed with --int8 --fp16 (layers outside Q/DQ in FP16); TensorRT 10
  builds it --stronglyTyped, so the graph itself carries FP16 outside the Q/DQ regions.
The package carries model.onnx, build_engine.sh (trtexec, or build_engine.py with TensorRT's Python API
when it imports), and engine.json (what the engine will be tied to). Where tensorrt imports and this
machine's GPU is the target's, the engine is built here too. Verification runs the same ONNX in ONNX
Runtime (FP16 simulated by casting the float graph), and latency off the device is a cost-model
estimate, marked as one.
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.backends.onnxruntime import OnnxRuntimeBackend, OrtSession, _Reader, kl_calibration_ranges
from edgekit.backends.tensorrt import build_engine as trt_build
from edgekit.console import note
from edgekit.errors import BadInput, EdgekitError
from edgekit.quantize.fp16_range import fp16_unsafe_nodes
from edgekit.quantize.ops import WEIGHTED_OPS as QDQ_OPS

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan
    from edgekit.targets import Target

STRONGLY_TYPED_FROM = (10, 0)
LAYER_PRECISIONS_FROM = (8, 4)  # trtexec --layerPrecisions / --precisionConstraints
INT8_MIN_COMPUTE_CAPABILITY = (6, 1)  # no fast INT8 on Maxwell (sm_53, Jetson Nano)

# TensorRT's ONNX parser (onnx-tensorrt operators.md): what it imports, in the default domain.
TENSORRT_ONNX_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Identity", "If", "InstanceNormalization", "IsInf",
    "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization",
    "LpPool", "LRN", "LSTM", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu",
    "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign",
    "Round", "ScaledTanh", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign",
    "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample",
    "Where", "Xor",
})


# ---------------------------------------------------------------- engine settings from the target


class TrtexecCannot(EdgekitError):
    pass


@dataclass
class EngineSettings:
    """What the engine build needs to know about the device, chosen from the target description."""

    tensorrt: str  # TensorRT version on the device, e.g. "10.3" (JetPack's)
    compute_capability: str | None
    workspace_mb: int
    dla_core: int | None = None
    jetpack: str | None = None
    gpu: str | None = None

    @property
    def major_minor(self) -> tuple[int, int]:
        parts = [int(p) for p in re.findall(r"\d+", self.tensorrt)[:2]] + [0, 0]
        return parts[0], parts[1]

    @property
    def strongly_typed(self) -> bool:
        return self.major_minor >= STRONGLY_TYPED_FROM

    @classmethod
    def for_target(cls, target: Target, dla_core: int | None = None) -> EngineSettings:
        runtimes = target.runtimes or {}
        gpu = target.gpu or {}
        memory_gb = float(target.memory.get("size_gb", 4))
        # A quarter of the device's memory (shared CPU/GPU on Jetson), at most 4 GiB: the build must
        # leave room for the OS and the app (ultralytics#19614: an uncapped workspace fails on Nano).
        workspace = int(min(4096, memory_gb * 1024 / 4))
        dla = target.dla_cores
        if dla_core is not None and not 0 <= dla_core < dla:
            raise BadInput(f"target {target.name} has {dla} DLA cores; --dla-core {dla_core} does not exist")
        return cls(str(runtimes.get("tensorrt", "10.3")), gpu.get("compute_capability"), workspace, dla_core,
                   runtimes.get("jetpack"), gpu.get("name"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def int8_supported(settings: EngineSettings) -> bool:
    cc = settings.compute_capability
    if not cc:
        return True
    major, minor = (int(x) for x in cc.split(".")[:2])
    return (major, minor) >= INT8_MIN_COMPUTE_CAPABILITY


def trtexec_command(settings: EngineSettings, precision: str, keep_fp32: list[str] | None = None,
                    onnx_file: str = "model.onnx", engine_file: str = "model.engine",
                    timing_cache: str = "timing.cache") -> list[str]:
    """The exact trtexec call for this TensorRT version and precision."""
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}", f"--timingCacheFile={timing_cache}"]
    major = settings.major_minor[0]
    cmd.append(f"--memPoolSize=workspace:{settings.workspace_mb}" if settings.major_minor >= (8, 4)
               else f"--workspace={settings.workspace_mb}")
    if precision == "int8":
        if not int8_supported(settings):
            raise BadInput(no_int8_reason(settings))
        # TensorRT 10: the Q/DQ graph carries FP16 outside the quantized regions; 8.x: FP16 fallback flag.
        cmd += ["--stronglyTyped"] if major >= 10 else ["--int8", "--fp16"]
    elif precision == "fp16":
        cmd.append("--fp16")
        if keep_fp32:
            if settings.major_minor < LAYER_PRECISIONS_FROM:
                raise TrtexecCannot(f"trtexec {settings.tensorrt} cannot keep layers in FP32 (--layerPrecisions "
                                    "needs TensorRT 8.4); build_engine.py does it with the Python API")
            cmd += ["--precisionConstraints=obey",
                    "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in keep_fp32)]
    if settings.dla_core is not None:
        cmd += [f"--useDLACore={settings.dla_core}", "--allowGPUFallback"]
    return cmd


def build_script(settings: EngineSettings, precision: str, keep_fp32: list[str]) -> str:
    """build_engine.sh: builds model.engine on the device (Python API when tensorrt imports, else trtexec).
    An engine already there, or in the engine cache given with --cache DIR, is reused only when its
    model.engine.json matches engine.json and the device's actual TensorRT version and GPU
    (build_engine.py --decide); a device whose TensorRT takes other build flags is refused (exit 4)."""
    try:
        trtexec = " ".join(shlex.quote(c) for c in trtexec_command(settings, precision, keep_fp32))
        fallback = f'"$TRTEXEC" {trtexec.replace("trtexec ", "", 1)}'
    except TrtexecCannot as e:
        fallback = f"echo {shlex.quote(str(e))} >&2; exit 3"
    py_args = ["--onnx", "model.onnx", "--engine", "model.engine", "--precision", precision,
               "--workspace-mb", str(settings.workspace_mb), "--timing-cache", "timing.cache"]
    if precision == "int8" and settings.strongly_typed:
        py_args.append("--strongly-typed")
    if precision == "fp16" and keep_fp32:
        py_args += ["--keep-fp32", *keep_fp32]
    if settings.dla_core is not None:
        py_args += ["--dla-core", str(settings.dla_core)]
    py = " ".join(shlex.quote(a) for a in py_args)
    return f"""#!/bin/sh
# Builds the TensorRT engine for this package on the device (edgekit, {precision}).
# Engines are tied to the GPU and the TensorRT version: expected TensorRT {settings.tensorrt}
# (JetPack {settings.jetpack or '-'}), GPU {settings.gpu or '-'} (sm {settings.compute_capability or '-'}).
# model.engine (or the engine in --cache DIR) is reused only when its model.engine.json matches
# engine.json and this device's TensorRT and GPU; otherwise it is rebuilt, and stored in DIR.
#   sh build_engine.sh [--force] [--cache DIR]      (PYTHON, TRTEXEC: the interpreter and trtexec to use)
set -eu
cd "$(dirname "$0")"
FORCE=
CACHE=
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --cache) [ $# -ge 2 ] || {{ echo "build_engine.sh: --cache needs a folder" >&2; exit 2; }}; CACHE=$2; shift ;;
    *) echo "usage: sh build_engine.sh [--force] [--cache DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${{PYTHON:-python3}}
command -v "$PY" >/dev/null 2>&1 || PY=
TRTEXEC=${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}
[ -x "$TRTEXEC" ] || TRTEXEC=
set -- --want engine.json --onnx model.onnx --engine model.engine
[ -z "$TRTEXEC" ] || set -- "$@" --trtexec "$TRTEXEC"
ACTION=build
if [ -n "$PY" ]; then
  if [ -n "$CACHE" ] && [ -z "$FORCE" ]; then
    ACTION=$("$PY" build_engine.py --decide "$@" --cache "$CACHE")  # exit 4: this device cannot build it
  else
    ACTION=$("$PY" build_engine.py --decide "$@" ${{FORCE:+--force}})
  fi
elif [ -f model.engine ]; then
  echo "no python3 to compare model.engine.json with this device: rebuilding" >&2
fi
case "$ACTION" in
  reuse) echo "edgekit-engine: reused model.engine"; exit 0 ;;
  cached) echo "edgekit-engine: reused the engine cached in $CACHE"; exit 0 ;;
esac
rm -f model.engine model.engine.json
if [ -n "$PY" ] && "$PY" -c "import tensorrt" 2>/dev/null; then
  "$PY" build_engine.py {py}
else
  if [ -z "$TRTEXEC" ]; then
    echo "neither python3 'import tensorrt' nor trtexec found: install TensorRT (JetPack on Jetson)" >&2; exit 3
  fi
  {fallback}
  if [ -n "$PY" ]; then
    "$PY" build_engine.py --write-meta "$@"
  else
    echo '{{"built_by": "trtexec", "precision": "{precision}"}}' > model.engine.json
  fi
fi
if [ -n "$CACHE" ] && [ -n "$PY" ]; then
  "$PY" build_engine.py --store "$CACHE" --engine model.engine --onnx model.onnx
fi
echo "edgekit-engine: built model.engine"
"""


# ---------------------------------------------------------------- trtexec's performance summary


@dataclass
class TrtexecSummary:
    """The numbers of trtexec's "=== Performance summary ===" block, in ms (throughput in qps)."""

    throughput_qps: float | None = None
    latency: dict[str, float] = field(default_factory=dict)  # min max mean median p90 p95 p99
    gpu_compute: dict[str, float] = field(default_factory=dict)
    enqueue: dict[str, float] = field(default_factory=dict)
    queries: int | None = None

    def to_latency_record(self, where: str) -> dict[str, Any]:
        """As the other backends' measurements; GPU Compute Time is the model's own cost."""
        src = self.gpu_compute or self.latency
        if "median" not in src:
            raise EdgekitError("trtexec output has no latency figures (did the run finish?)")
        return {"p50": src["median"], "p90": src.get("p90", src["median"]), "p99": src.get("p99", src["max"]),
                "mean": src["mean"], "min": src["min"], "runs": self.queries or 0, "threads": 0, "where": where,
                "source": "trtexec GPU Compute Time" if self.gpu_compute else "trtexec Latency"}


_STAT = re.compile(r"(min|max|mean|median) = ([\d.eE+-]+) ms")
_PCT = re.compile(r"percentile\((\d+(?:\.\d+)?)%\) = ([\d.eE+-]+) ms")
_PCT_OLD = re.compile(r"percentile: ([\d.eE+-]+) ms at (\d+)%")  # TensorRT <= 8.0


def parse_trtexec(text: str) -> TrtexecSummary:
    s = TrtexecSummary()
    sections = {"Latency": s.latency, "GPU Compute Time": s.gpu_compute, "Enqueue Time": s.enqueue}
    for line in text.splitlines():
        body = re.sub(r"^\s*(\[[^\]]*\]\s*)+", "", line)  # drop "[11/23/2026-10:00:00] [I] "
        m = re.match(r"Throughput: ([\d.eE+-]+) qps", body)
        if m:
            s.throughput_qps = float(m.group(1))
            continue
        m = re.search(r"Timing trace has (\d+) queries", body) or re.search(r"(\d+) iterations", body)
        if m and s.queries is None:
            s.queries = int(m.group(1))
        name, _, rest = body.partition(":")
        if name.strip() in sections and "=" in rest:
            d = sections[name.strip()]
            d.update({k: float(v) for k, v in _STAT.findall(rest)})
            d.update({f"p{int(float(p))}": float(v) for p, v in _PCT.findall(rest)})
            d.update({f"p{int(p)}": float(v) for v, p in _PCT_OLD.findall(rest)})
    return s


# ---------------------------------------------------------------- the backend


# load() gives ONNX Runtime on the CPU (the Q/DQ or FP16-simulated ONNX, for verification); edgekit has
# no in-process TensorRT engine session, so nothing timed through load() is a TensorRT latency.
ENGINE_SESSION = False


def local_engine_blocker(local_trt: str | None, local_gpu: dict[str, Any] | None,
                         settings: EngineSettings) -> str | None:
    """None when an engine built on this machine runs on the target: this GPU's compute capability and
    this TensorRT's major.minor are the target's. Else why not (the device then builds its own)."""
    if local_trt is None:
        return "no TensorRT here: " + trt_build.GPU_REQUIRED
    if local_gpu is None:
        return "no NVIDIA GPU here: " + trt_build.GPU_REQUIRED
    name, have = local_gpu.get("name") or "this GPU", local_gpu.get("compute_capability")
    if not settings.compute_capability:
        return "the target names no GPU compute capability to compare this GPU with"
    if not have:
        return f"cannot tell the compute capability of {name} here"
    if trt_build.version_tuple(have)[:2] != trt_build.version_tuple(settings.compute_capability)[:2]:
        return (f"{name} here is sm {have}, the target's GPU is sm {settings.compute_capability}: "
                "an engine built here would not run there")
    if trt_build.version_tuple(local_trt)[:2] != settings.major_minor:
        return (f"TensorRT here is {local_trt}, the target has TensorRT {settings.tensorrt}: "
                "an engine built here would not load there")
    return None


def timing_blocker(local_trt: str | None, local_gpu: dict[str, Any] | None,
                   engine_session: bool = ENGINE_SESSION) -> str | None:
    """None only when this process can time a TensorRT engine with TensorRT itself; else why the
    latency is the cost model's estimate (never ONNX Runtime's CPU time labelled as TensorRT)."""
    if local_trt is None:
        return "no TensorRT here: " + trt_build.GPU_REQUIRED
    if local_gpu is None:
        return "no NVIDIA GPU here: " + trt_build.GPU_REQUIRED
    if not engine_session:
        return ("edgekit times TensorRT engines with trtexec on the device, not in the build's timing process "
                "(which runs ONNX Runtime on the CPU)")
    return None


def _local_facts() -> tuple[str | None, dict[str, Any] | None]:
    trt = trt_build.tensorrt_version()
    return trt, (trt_build.gpu_facts() if trt else None)  # no nvidia-smi call where TensorRT is absent


@register
class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    int8_symmetric_only = True  # TensorRT takes symmetric INT8 only
    requires = ("onnxruntime",)  # to write and verify the ONNX; the engine needs TensorRT + a GPU
    install_hint = "TensorRT: JetPack on Jetson; `pip install tensorrt` with CUDA on x86"

    def versions(self) -> dict[str, str]:
        v = {"onnxruntime": OnnxRuntimeBackend().versions()["onnxruntime"]}
        trt = trt_build.tensorrt_version()
        v["tensorrt"] = trt or "absent here (engine built on the device)"
        return v

    def measure_here(self) -> str | None:
        return timing_blocker(*_local_facts())

    def plan_options(self, target: Target, requests: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"engine": EngineSettings.for_target(target, (requests or {}).get("dla_core")).to_dict()}

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        return [OpIssue(self.name, n.op_type, n.name, "not in TensorRT's ONNX parser op set (needs a plugin)")
                for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in TENSORRT_ONNX_OPS]

    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path) -> Artifact:
        raw = plan.options.get("engine")
        if not raw:
            raise BadInput("a TensorRT artifact needs the target's engine settings (plan option 'engine')")
        settings = EngineSettings(**raw)
        if settings.dla_core is not None and plan.precision == "fp32":
            settings.dla_core = None  # the DLA runs FP16/INT8 only
        details: dict[str, Any] = {"engine": settings.to_dict(), "builder": "trtexec or TensorRT Python API"}
        notes: list[str] = []
        keep: list[str] = []
        out = root / "model.onnx"
        if plan.precision == "fp32":
            shutil.copyfile(spec.onnx_path, out)
        elif plan.precision == "fp16":
            shutil.copyfile(spec.onnx_path, out)  # TensorRT lowers to FP16 itself
            risks = fp16_unsafe_nodes(spec.load())
            keep = sorted(set(plan.keep_fp32) | {r.node for r in risks})
            notes += [f"{r.node} ({r.op_type}) kept in FP32 by precision constraints: {r.reason}" for r in risks]
            details["keep_fp32"] = keep
            if not int8_supported(settings):  # the plan's reason is in the manifest; say it where it is seen too
                why = no_int8_reason(settings)
                note(why)
                notes.append(why)
        elif plan.precision == "int8":
            if not int8_supported(settings):
                raise BadInput(no_int8_reason(settings))
            if calibration is None or len(calibration) == 0:
                raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
            details.update(_qdq_for_tensorrt(spec, plan, calibration, out, fp16_outside=settings.strongly_typed))
            notes.append("explicit quantization (Q/DQ); " + ("strongly typed: FP16 outside the Q/DQ regions"
                                                             if settings.strongly_typed
                                                             else "--int8 --fp16: FP16 outside the Q/DQ regions"))
            used, wanted = details["calibration_samples"], details["calibration_samples_requested"]
            if used < wanted:
                notes.append(f"INT8 calibrated on the {used} samples available ({wanted} requested)")
            if details["stripped_opsets"]:
                notes.append(f"unused opset imports removed: {', '.join(details['stripped_opsets'])}")
        else:
            raise BadInput(f"{self.name} cannot build precision {plan.precision}")
        (root / "build_engine.sh").write_text(build_script(settings, plan.precision, keep))
        (root / "build_engine.sh").chmod(0o755)
        shutil.copyfile(trt_build.__file__, root / "build_engine.py")
        try:
            details["trtexec"] = " ".join(trtexec_command(settings, plan.precision, keep))
        except TrtexecCannot as e:
            details["trtexec"] = None
            notes.append(str(e))
        reason = local_engine_blocker(*_local_facts(), settings)
        if reason is None:
            meta = trt_build.build_engine(out, root / "model.engine", plan.precision, settings.workspace_mb,
                                          plan.precision == "int8" and settings.strongly_typed, keep,
                                          settings.dla_core, str(root / "timing.cache"))
            details["engine_built"] = meta
        else:
            details["engine_built"] = None
            details["engine_not_built"] = reason
            notes.append(f"engine not built here ({reason.split(': ')[0]}): build_engine.sh builds it on the "
                         f"device (TensorRT {settings.tensorrt}, sm {settings.compute_capability or '?'}) on first "
                         "use")
        (root / "engine.json").write_text(_engine_json(settings, plan.precision, keep, details, out))
        files = sorted(p.name for p in root.iterdir() if p.is_file())
        return Artifact(self.name, plan.precision, str(root), files, "model.onnx", details, notes)

    def load(self, artifact: Artifact, threads: int) -> OrtSession:
        """The artifact's ONNX in ONNX Runtime: Q/DQ as TensorRT will run it; FP16 simulated by the
        float graph cast to FP16 (the layers kept FP32 stay FP32), as TensorRT's FP16 mode computes.
        ONNX Runtime's own rewrite that quantizes biases to int32 is off: TensorRT keeps biases in float,
        and in an FP16 graph that rewrite's scale (input scale x weight scale) falls below FP16's normal
        range and wrecks the result (DefectNet on unnormalised images: cosine -0.82 with it, 0.999 without)."""
        if artifact.precision != "fp16":
            return OrtSession(artifact.entry_path, threads, ORT_ONLY_REWRITES)
        from onnxruntime.transformers.float16 import convert_float_to_float16

        keep = artifact.details.get("keep_fp32") or None
        fp16 = convert_float_to_float16(onnx.load(artifact.entry_path), keep_io_types=True, node_block_list=keep)
        tmp = Path(tempfile.mkdtemp(prefix="edgekit-trt-fp16-"))
        onnx.save(fp16, str(tmp / "fp16.onnx"))
        session = OrtSession(tmp / "fp16.onnx", threads, ORT_ONLY_REWRITES)
        shutil.rmtree(tmp, ignore_errors=True)  # the session holds the model in memory
        return session


def _engine_json(settings: EngineSettings, precision: str, keep: list[str], details: dict[str, Any],
                 onnx_file: Path) -> str:
    import json

    return json.dumps({
        "tied_to": {"tensorrt": settings.tensorrt, "compute_capability": settings.compute_capability,
                    "gpu": settings.gpu, "jetpack": settings.jetpack},
        "note": "a TensorRT engine runs only with this TensorRT version on this GPU architecture; "
                "build_engine.sh builds it on the device, or reuses one whose model.engine.json matches 'build' "
                "and the device's TensorRT and GPU",
        # What an engine must have been built with to be reused (build_engine.py --decide compares these).
        "build": {"precision": precision, "keep_fp32": sorted(keep), "dla_core": settings.dla_core,
                  "strongly_typed": precision == "int8" and settings.strongly_typed,
                  "onnx_sha256": trt_build.file_sha256(onnx_file)},
        "precision": precision, "keep_fp32": keep, "trtexec": details["trtexec"],
        "built_here": details.get("engine_built"), "not_built_here": details.get("engine_not_built"),
    }, indent=1) + "\n"


def no_int8_reason(settings: EngineSettings) -> str:
    return (f"no INT8 for TensorRT on {settings.gpu or 'this GPU'} (sm {settings.compute_capability}): "
            "TensorRT has none below sm 6.1, so FP16 is the fastest there (--precision fp16)")


def strip_unused_opsets(model: onnx.ModelProto) -> list[str]:
    """Drop opset imports no node uses (converters leave e.g. org.pytorch.aten, ai.onnx.training, and the
    quantizer com.microsoft): TensorRT's parser has no business with them. Returns the removed domains."""
    used: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for n in graph.node:
            used.add(n.domain or "")
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g)

    walk(model.graph)
    for f in model.functions:
        used.add(f.domain)
        used |= {n.domain or "" for n in f.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    removed = [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx") and o.domain not in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return removed


def tensorrt_qdq_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes TensorRT wants quantized: Conv/ConvTranspose/Gemm/MatMul, and Adds of two activations
    (residual joins: TensorRT fuses the Add into the conv only when both inputs are quantized)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in QDQ_OPS or (n.op_type == "Add" and not set(n.input) & constants)]


ORT_ONLY_REWRITES = ("WeightBiasQuantization",)  # ONNX Runtime transforms TensorRT does not do


def _float_outputs(model: onnx.ModelProto) -> list[str]:
    """Drop a Q/DQ pair that only re-encodes a model output (optionally through a Cast): TensorRT needs
    none there, and the calibrated range would clip a logit or box coordinate the app reads directly."""
    outputs = {o.name for o in model.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    removed = []
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        after = users.get(dq.output[0], [])
        to_output = dq.output[0] in outputs or (len(after) == 1 and after[0].op_type == "Cast"
                                                and after[0].output[0] in outputs)
        q = producer.get(dq.input[0])
        if not to_output or q is None or q.op_type != "QuantizeLinear" or len(users.get(q.output[0], [])) != 1:
            continue
        if dq.output[0] in outputs:  # the output keeps its name: the quantized tensor's producer writes it
            producer[q.input[0]].output[list(producer[q.input[0]].output).index(q.input[0])] = dq.output[0]
            for u in users.get(q.input[0], []):
                if u is not q:
                    u.input[list(u.input).index(q.input[0])] = dq.output[0]
        else:
            after[0].input[0] = q.input[0]
        model.graph.node.remove(dq)
        model.graph.node.remove(q)
        removed.append(q.input[0])
    if removed:  # their scales and zero points
        used = {i for n in model.graph.node for i in n.input}
        for init in [i for i in model.graph.initializer if i.name not in used]:
            model.graph.initializer.remove(init)
    return removed


def _qdq_for_tensorrt(spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset, out: Path,
                      fp16_outside: bool) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgekit.backends.onnxruntime import per_tensor_weights

    q = plan.quantization
    assert q is not None, "an int8 artifact plan carries quantization settings"
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    batches = calibration.batches(spec)[: max(1, q.samples // max(1, spec.inputs[0].shape[0]))]
    with tempfile.TemporaryDirectory(prefix="edgekit-trt-q-") as tmp:
        src = Path(tmp) / "pre.onnx"
        OnnxRuntimeBackend._pre_process(spec.onnx_path, src)
        model = onnx.load(str(src))
        for i, node in enumerate(model.graph.node):  # nodes_to_quantize works by name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(model, str(src))
        wanted = [n for n in tensorrt_qdq_nodes(model) if n not in set(q.exclude_nodes)]
        qdq = Path(tmp) / "qdq.onnx"
        ranges = kl_calibration_ranges(src, batches, True, Path(tmp)) if q.method == "entropy" else None
        flat = per_tensor_weights(model, {*QDQ_OPS, "Add"})  # 1-D weights per-tensor up front, without ORT's warnings
        try:
            quantize_static(
                str(src), str(qdq), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                **({"calibration_cache_path": str(ranges)} if ranges else {}),
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=[*QDQ_OPS, "Add"], nodes_to_quantize=wanted,
                calibrate_method=methods[q.method],
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "CalibPercentile": q.percentile,
                               **({"TensorQuantOverrides": flat} if flat else {})},
            )
        except Exception as e:
            raise EdgekitError(f"onnxruntime quantize_static (TensorRT Q/DQ) failed: {type(e).__name__}: {e}") from None
        result = onnx.load(str(qdq))
    float_outputs = _float_outputs(result)
    if fp16_outside:
        result = _float_regions_to_fp16(result)
    stripped = strip_unused_opsets(result)
    onnx.save(result, str(out))
    used = sum(int(next(iter(b.values())).shape[0]) for b in batches)  # what calibrated, not what was asked
    return {"quantizer": "onnxruntime.quantization.quantize_static (TensorRT rules)", "format": "QDQ",
            "calibration": q.method, "calibration_samples": used, "calibration_samples_requested": q.samples,
            "stripped_opsets": stripped, "float_outputs": float_outputs,
            "per_channel": True, "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel",
            "quantized_nodes": len(wanted), "excluded_nodes": list(q.exclude_nodes),
            "float_regions": "fp16" if fp16_outside else "fp32 (builder --fp16 lowers them)"}


def _float_regions_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """For a strongly typed build the graph states every precision: float tensors become FP16 (inputs
    and outputs stay FP32 for the app). Q/DQ with FP16 scales needs opset 19."""
    from onnx import version_converter
    from onnxruntime.transformers.float16 import convert_float_to_float16

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 19:
        model = version_converter.convert_version(model, 19)
    return convert_float_to_float16(model, keep_io_types=True)
