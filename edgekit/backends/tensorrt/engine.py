"""TensorRT engine settings from the target, the build commands for the device (trtexec, build_engine.sh,
engine.json), what an engine built here would be tied to, and trtexec's performance summary."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from edgekit.backends.tensorrt import build_engine as trt_build
from edgekit.errors import BadInput, EdgekitError

if TYPE_CHECKING:
    from pathlib import Path

    from edgekit.targets import Target

STRONGLY_TYPED_FROM = (10, 0)
LAYER_PRECISIONS_FROM = (8, 4)  # trtexec --layerPrecisions / --precisionConstraints
INT8_MIN_COMPUTE_CAPABILITY = (6, 1)  # no fast INT8 on Maxwell (sm_53, Jetson Nano)


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


def no_int8_reason(settings: EngineSettings) -> str:
    return (f"no INT8 for TensorRT on {settings.gpu or 'this GPU'} (sm {settings.compute_capability}): "
            "TensorRT has none below sm 6.1, so FP16 is the fastest there (--precision fp16)")


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


def engine_json(settings: EngineSettings, precision: str, keep: list[str], details: dict[str, Any],
                onnx_file: Path) -> str:
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


# ---------------------------------------------------------------- where an engine can be built and timed


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
                   engine_session: bool = False) -> str | None:
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


def local_facts() -> tuple[str | None, dict[str, Any] | None]:
    trt = trt_build.tensorrt_version()
    return trt, (trt_build.gpu_facts() if trt else None)  # no nvidia-smi call where TensorRT is absent
