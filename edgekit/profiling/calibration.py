"""What the cost model is fitted to: calibration points of a target, each a measured latency with what
the model cost. From the target's published benchmarks (whole models), the profiles/ store (device
measurements with per-layer features), this very host (ONNX Runtime FP32 on five small conv nets, timed
by the interleaved timing loop, cached per CPU, threads and runtime version) and a build's FP32
references. costmodel.py fits its parameters to them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.backends import REFERENCE_BACKEND
from edgekit.home import cache_dir
from edgekit.ingest import ModelSpec
from edgekit.profiling.store import cost_features, target_records
from edgekit.targets import Target

HOST_CALIBRATION = "edgekit-host-calibration/1"  # the record's schema; a change of the nets is a new one


def host_isa_class(isa: list[str] | set[str]) -> str:
    """The class of the host's SIMD that decides what each precision gains (flags from /proc/cpuinfo)."""
    f = set(isa)
    if "amx_int8" in f:
        return "amx"
    if {"avx512_vnni", "avx_vnni"} & f:
        return "vnni"
    if "avx512f" in f:
        return "avx512"
    if "avx2" in f:
        return "avx2"
    if {"asimdhp", "fphp", "asimddp"} & f:
        return "armv8.2"
    if "asimd" in f:
        return "armv8.0"
    return "generic"


@dataclass
class LayerFeatures:
    """What the cost of one layer depends on, independent of precision and device."""

    op_type: str
    macs: int
    params: int
    out_elems: int

    @classmethod
    def of_spec(cls, spec: ModelSpec) -> list[LayerFeatures]:
        return [cls(la.op_type, la.macs, la.params, math.prod(max(int(d), 1) for d in la.output_shape))
                for la in spec.layers]

    def to_list(self) -> list[Any]:
        return [self.op_type, self.macs, self.params, self.out_elems]


@dataclass
class CalibrationPoint:
    """One measured latency of the target, with what the model cost."""

    backend: str
    precision: str
    measured_ms: float
    source: str
    layers: list[LayerFeatures] | None = None  # per-layer features (profiles/)
    macs: int = 0  # whole-model figures (published benchmarks)
    kernels: int = 0


def benchmark_points(target: Target) -> list[CalibrationPoint]:
    return [CalibrationPoint(b["backend"], b["precision"], float(b["ms"]), f"benchmark: {b['source']}",
                             macs=int(b["macs"]), kernels=int(b.get("layers", 0)))
            for b in target.benchmarks]


def device_record_points(target: Target, root: Path | None = None) -> list[CalibrationPoint]:
    """Device measurements of this target in the profiles/ store that carry per-layer cost features."""
    points = []
    for path, rec in target_records(target.name, root):
        try:
            feats = rec.get("cost_features")
            p50 = float(rec["latency_ms"]["p50"])
        except (ValueError, KeyError, TypeError):
            continue  # a foreign or truncated file is not a measurement
        if not feats or p50 <= 0:
            continue
        cpu = (rec.get("device_facts") or {}).get("cpu") or {}
        if target.is_host and cpu.get("model") != target.cpu.get("model"):
            continue  # a host-cpu record of another machine says nothing about this one
        layers = [LayerFeatures(str(f[0]), int(f[1]), int(f[2]), int(f[3])) for f in feats]
        points.append(CalibrationPoint(rec["backend"], rec["precision"], p50,
                                       f"profile: {path.parent.name}/{path.name}", layers=layers))
    return points


# ---------------------------------------------------------------- the host, measured

_HOST_MEMO: dict[str, dict[str, Any] | None] = {}


def host_points(target: Target, threads: int | None = None, measure: bool = True) -> list[CalibrationPoint]:
    """ONNX Runtime FP32 on this machine, timed as builds time (exported by the backend, edgekit's
    interleaved timing process, the build's threads): five small conv nets of unlike character
    (compute-bound, large activations, many tiny kernels, depthwise, residual). Measured once per CPU,
    thread count and runtime version (about 3 s), then cached in $EDGEKIT_HOME/cache/costmodel (default
    ~/.cache/edgekit/costmodel). Empty when it cannot be measured (ONNX Runtime missing, a process that
    may not spawn one): the priors stand."""
    threads = threads or int(target.cpu.get("cores", 1))
    rec = _host_record(target, threads, measure)
    return [CalibrationPoint(REFERENCE_BACKEND, "fp32", float(n["p50"]), f"measured here: {REFERENCE_BACKEND} fp32, "
                             f"calibration net '{name}'", layers=[LayerFeatures(*f) for f in n["layers"]])
            for name, n in (rec or {}).get("nets", {}).items()]


def _host_record(target: Target, threads: int, measure: bool) -> dict[str, Any] | None:
    """The cached calibration run here, measured now if there is none (and `measure`)."""
    from edgekit import backends

    try:
        runtime = backends.get_installed(REFERENCE_BACKEND)
        versions = runtime.versions()
    except Exception:
        return None
    key = hashlib.sha256(json.dumps([HOST_CALIBRATION, target.cpu, threads, versions], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    if key in _HOST_MEMO:
        return _HOST_MEMO[key]
    path = cache_dir("costmodel") / f"host-{key}.json"
    try:
        rec = json.loads(path.read_text())
        assert rec["schema"] == HOST_CALIBRATION and rec["key"] == key
    except (OSError, ValueError, KeyError, AssertionError):
        if not measure:
            return None
        rec = _measure_host(target, threads, key)
        if rec is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(rec, indent=1))
                tmp.replace(path)
            except OSError:
                pass  # an unwritable cache: measured again by the next process
    _HOST_MEMO[key] = rec
    return rec


def _measure_host(target: Target, threads: int, key: str) -> dict[str, Any] | None:
    import tempfile
    import time

    import numpy as np
    import onnx

    from edgekit import backends
    from edgekit.console import note
    from edgekit.ingest import ingest
    from edgekit.planning.types import ArtifactPlan
    from edgekit.profiling.timing import ProfileSettings, time_artifacts, where_local

    models = _calibration_nets()
    note(f"cost model: calibrating to this host ({target.cpu.get('model')}, "
         f"{host_isa_class(target.cpu.get('isa', []))}, {threads} threads): ONNX Runtime FP32 on {len(models)} "
         "small nets, once (cached)")
    started = time.perf_counter()
    features, arts = {}, {}
    try:
        runtime = backends.get_installed(REFERENCE_BACKEND)
        with tempfile.TemporaryDirectory(prefix="edgekit-host-cal-") as tmp:
            for name, model in models.items():
                folder = Path(tmp) / name
                (folder / "artifact").mkdir(parents=True)
                onnx.save(model, str(folder / "net.onnx"))
                spec = ingest(str(folder / "net.onnx"), folder / "spec", simplify=False)
                features[name] = [f.to_list() for f in LayerFeatures.of_spec(spec)]
                arts[name] = runtime.export(spec, ArtifactPlan(REFERENCE_BACKEND, "fp32"), None, folder / "artifact")
            feeds = {"x": np.random.default_rng(0).random(CALIBRATION_INPUT, np.float32)}
            lat = time_artifacts(arts, feeds, ProfileSettings(warmup_runs=5, min_runs=20, seconds=0.15), threads)
    except Exception as e:  # no process to spawn, a runtime failing: the estimates keep the priors
        note(f"cost model: could not time ONNX Runtime here ({type(e).__name__}: {e}); estimates use the priors")
        return None
    return {"schema": HOST_CALIBRATION, "key": key, "where": where_local(), "cpu": target.cpu, "threads": threads,
            "seconds": round(time.perf_counter() - started, 2),
            "nets": {name: {"p50": lat[name].p50, "runs": lat[name].runs, "layers": features[name]}
                     for name in models}}


CALIBRATION_INPUT = (1, 3, 128, 128)


def _calibration_nets() -> dict[str, Any]:
    """Conv nets on one 1x3x128x128 input, of unlike cost: what splits compute, bandwidth and overhead."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def net(*layers: tuple[Any, ...]) -> Any:
        """Each layer (out channels, kernel, stride, groups) -> Conv + Relu; ("res", C): two 3x3 convs + Add."""
        nodes, inits, state = [], [], {"x": "x", "c": CALIBRATION_INPUT[1]}

        def conv(co: int, k: int, stride: int = 1, group: int = 1, relu: bool = True) -> None:
            i, ci = len(nodes), state["c"] // group
            w = rng.standard_normal((co, ci, k, k)).astype(np.float32) * math.sqrt(2 / (ci * k * k))
            inits.extend([numpy_helper.from_array(w, f"w{i}"),
                          numpy_helper.from_array(np.zeros(co, np.float32), f"b{i}")])
            pad = 0 if k == stride else (k - 1) // 2
            nodes.append(helper.make_node("Conv", [state["x"], f"w{i}", f"b{i}"], [f"t{i}"], pads=[pad] * 4,
                                          strides=[stride, stride], group=group))
            state.update(x=f"t{i}", c=co)
            if relu:
                nodes.append(helper.make_node("Relu", [state["x"]], [f"t{i}r"]))
                state["x"] = f"t{i}r"

        for layer in layers:
            if layer[0] == "res":
                skip = state["x"]
                conv(layer[1], 3)
                conv(layer[1], 3, relu=False)
                nodes.append(helper.make_node("Add", [state["x"], skip], [f"t{len(nodes)}a"]))
                nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], [f"t{len(nodes)}r"]))
                state["x"] = nodes[-1].output[0]
            else:
                conv(*layer)
        graph = helper.make_graph(nodes, "calibration",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(CALIBRATION_INPUT))],
                                  [helper.make_tensor_value_info(state["x"], TensorProto.FLOAT, None)], inits)
        return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    return {
        "large-activations": net((16, 3), (16, 3), (32, 3, 2)),
        "compute-bound": net((64, 4, 4), *[(64, 3)] * 4),
        "many-small-kernels": net((16, 8, 8), *[(16, 1)] * 16),
        "depthwise": net((32, 3, 2), *[(32, 3, 1, 32), (32, 1)] * 4),
        "residual": net((24, 3, 2), (24, 3, 2), ("res", 24), (48, 3, 2), ("res", 48), (96, 3, 2), ("res", 96)),
    }


def manifest_points(manifest: dict[str, Any]) -> list[CalibrationPoint]:
    """A package's FP32 references measured on this machine (each artifact's `reference_latency_ms`: its
    backend's FP32 build, timed in the same rounds as the artifacts) with the model's layer features: what
    the host's model can be fitted to per backend (`add_points`) before its estimates of the other
    precisions are compared with their measurements."""
    layers = [LayerFeatures(*f) for f in cost_features(manifest.get("layers") or [])]
    found: dict[str, float] = {}
    for a in manifest.get("artifacts", []):
        ref = a.get("reference_latency_ms") or {}
        if layers and str(ref.get("where", "")).startswith("local:") and (ref.get("p50") or 0) > 0:
            found.setdefault(a["backend"], float(ref["p50"]))
    return [CalibrationPoint(b, "fp32", ms, f"measured here: the model's {b} fp32 build", layers=layers)
            for b, ms in found.items()]
