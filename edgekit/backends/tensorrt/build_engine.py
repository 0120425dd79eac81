"""Build a TensorRT engine from an edgekit package's ONNX with TensorRT's Python API.

One file, two uses: edgekit imports it to build where `tensorrt` imports and a GPU is present, and
copies it into every TensorRT package as `build_engine.py`, which `build_engine.sh` runs on the
device (JetPack's python3 has tensorrt). So it needs only the standard library and tensorrt, and
stays valid Python 3.6 (JetPack 4.6 on the Jetson Nano): no dataclasses, no annotations import.

    python3 build_engine.py --onnx model.onnx --engine model.engine --precision int8 \
        --workspace-mb 1024 [--strongly-typed] [--keep-fp32 NODE ...] [--dla-core 0] [--timing-cache F]

build_engine.sh also uses it to decide whether an engine may be reused (--decide: model.engine.json,
what the engine was built with, against engine.json, what the package needs, and this device's actual
TensorRT version and GPU), to describe an engine trtexec built (--write-meta), and to keep an engine in
the device's engine cache (--store DIR).
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

GPU_REQUIRED = ("building a TensorRT engine needs an NVIDIA GPU with TensorRT (JetPack on Jetson, "
                "`pip install tensorrt` on x86 with CUDA); run build_engine.sh on the device")


# Jetson SoCs (the /proc/device-tree/compatible entry) -> GPU compute capability; Jetsons before
# JetPack 6 have no nvidia-smi to ask.
JETSON_SOC_COMPUTE_CAPABILITY = {"tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2", "tegra210": "5.3"}
REFUSED = 4  # --decide: this device's TensorRT cannot build this package's engine


def jetson_compute_capability(compatible):
    """The compute capability named by a device-tree `compatible` list (NUL- or comma-separated)."""
    for entry in re.split(r"[\x00\s]+", compatible or ""):
        soc = entry.split(",")[-1].strip()
        if soc in JETSON_SOC_COMPUTE_CAPABILITY:
            return JETSON_SOC_COMPUTE_CAPABILITY[soc]
    return None


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def gpu_facts():
    """Name and compute capability of the first GPU, or None when there is none."""
    facts = None
    try:
        out = subprocess.check_output(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                      stderr=subprocess.DEVNULL, timeout=20).decode().strip().splitlines()
        if out:
            name, cap = [s.strip() for s in out[0].split(",")[:2]]
            facts = {"name": name, "compute_capability": cap if re.match(r"^\d+\.\d+$", cap) else None}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    # Jetson: integrated GPU; no nvidia-smi on older JetPacks, and no compute_cap from newer ones' nvidia-smi
    if os.path.exists("/etc/nv_tegra_release") and (facts is None or not facts["compute_capability"]):
        model = (_read("/proc/device-tree/model") or "").strip("\x00 \n")
        cap = jetson_compute_capability(_read("/proc/device-tree/compatible"))
        facts = {"name": (facts or {}).get("name") or model or None, "compute_capability": cap}
    return facts


def tensorrt_version():
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)  # None: a stray module of that name, not TensorRT


def parse_trtexec_version(text):
    """TensorRT's version from trtexec's output: "TensorRT version: 10.3.0", or the banner every run
    prints, "&&&& RUNNING TensorRT.trtexec [TensorRT v100300]" (v8201 = 8.2.1 before TensorRT 10)."""
    m = re.search(r"TensorRT version: (\d+(?:\.\d+)+)", text or "")
    if m:
        return m.group(1)
    m = re.search(r"\[TensorRT v(\d+(?:\.\d+)*)\]", text or "")
    if not m:
        return None
    v = m.group(1)
    if "." in v:
        return v
    code = int(v)
    if code >= 10000:  # TensorRT 10+: major * 10000 + minor * 100 + patch
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def trtexec_version(trtexec):
    try:  # run() kills it on timeout; text=/capture_output= are Python 3.7+
        p = subprocess.run([trtexec, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_trtexec_version(p.stdout.decode("utf-8", "replace"))


def device_tensorrt_version(trtexec=None):
    """This machine's TensorRT: the Python module's version, else what its trtexec says."""
    return tensorrt_version() or (trtexec_version(trtexec) if trtexec else None)


def version_tuple(version):
    return tuple(int(x) for x in re.findall(r"\d+", str(version or ""))[:3])


def same_tensorrt(a, b):
    """Engines load only in the TensorRT they were built with: compare as many parts as both give (>= 2)."""
    ta, tb = version_tuple(a), version_tuple(b)
    n = min(len(ta), len(tb))
    return n >= 2 and ta[:n] == tb[:n]


def trtexec_flag_family(version):
    """trtexec's options change at 8.4 (--memPoolSize, --layerPrecisions) and 10.0 (--stronglyTyped,
    no --workspace): a package's build line works only within one of these."""
    v = version_tuple(version)[:2]
    return "10+" if v >= (10, 0) else "8.4-9" if v >= (8, 4) else "before 8.4"


def file_sha256(path):
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wanted_build(want):
    """What engine.json says the engine must be built with (older packages: the top-level fields)."""
    b = want.get("build") or {}
    tied = want.get("tied_to") or {}
    return {"precision": b.get("precision", want.get("precision")),
            "keep_fp32": sorted(b.get("keep_fp32", want.get("keep_fp32")) or []),
            "dla_core": b.get("dla_core"), "strongly_typed": bool(b.get("strongly_typed", False)),
            "tensorrt": tied.get("tensorrt"), "compute_capability": tied.get("compute_capability")}


def refusal(want, device_trt, device_gpu):
    """Why this device cannot build the package's engine at all, or None."""
    spec = wanted_build(want)
    pkg_trt = spec["tensorrt"]
    if device_trt and pkg_trt and trtexec_flag_family(device_trt) != trtexec_flag_family(pkg_trt):
        return ("this package was made for TensorRT {} and this device has TensorRT {}: its engine settings "
                "(precision flags, Q/DQ typing) do not carry over; rebuild the package for this device (a target "
                "with runtimes.tensorrt: \"{}\")".format(pkg_trt, device_trt,
                                                         ".".join(str(x) for x in version_tuple(device_trt)[:2])))
    cap = (device_gpu or {}).get("compute_capability")
    if spec["precision"] == "int8" and cap and version_tuple(cap)[:2] < (6, 1):
        return f"this device's GPU (sm {cap}) has no INT8 in TensorRT: build the package with --precision fp16"
    return None


def engine_mismatches(built, want, device_trt, device_gpu, onnx_sha256):
    """Why an engine described by `built` (its model.engine.json) must not be reused for this package
    (engine.json: `want`) on this device; empty when it may be."""
    spec = wanted_build(want)
    why = []
    if built.get("onnx_sha256") != onnx_sha256:
        why.append("built from another model.onnx")
    for k in ("precision", "strongly_typed", "dla_core"):
        if built.get(k) != spec[k]:
            why.append(f"built with {k} {built.get(k)}, the package needs {spec[k]}")
    if sorted(built.get("keep_fp32") or []) != spec["keep_fp32"]:
        why.append("built with other layers kept in FP32")
    if not device_trt:
        why.append("cannot tell this device's TensorRT version")
    elif not same_tensorrt(built.get("tensorrt"), device_trt):
        why.append("built with TensorRT {}, this device has {}".format(built.get("tensorrt") or "?", device_trt))
    gpu = device_gpu or {}
    built_gpu = built.get("gpu") if isinstance(built.get("gpu"), dict) else {}
    built_cap = built.get("compute_capability") or built_gpu.get("compute_capability")
    built_name = built_gpu.get("name") or (built.get("gpu") if isinstance(built.get("gpu"), str) else None)
    if gpu.get("compute_capability") and built_cap:
        if gpu["compute_capability"] != built_cap:
            why.append("built for sm {}, this device's GPU is sm {}".format(built_cap, gpu["compute_capability"]))
    elif not (gpu.get("name") and gpu.get("name") == built_name):
        why.append("cannot tell whether it was built for this device's GPU")
    return why


def _load_json(path):
    try:
        with open(str(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _copy_atomic(src, dst):
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(str(src), tmp)
    os.replace(tmp, str(dst))


def decide(want_path, onnx_path, engine_path, cache=None, trtexec=None, force=False, log=sys.stderr):
    """(action, exit status): "reuse" model.engine, "cached" (the cache's engine copied to model.engine),
    or "build"; status REFUSED when this device cannot build the package's engine. Reasons go to `log`."""
    want = _load_json(want_path)
    if want is None:
        log.write(f"{want_path} is missing or not JSON: rebuilding\n")
        return "build", 0
    device_trt, device_gpu = device_tensorrt_version(trtexec), gpu_facts()
    why_not = refusal(want, device_trt, device_gpu)
    if why_not:
        log.write(why_not + "\n")
        return "refused", REFUSED
    pkg_trt = wanted_build(want)["tensorrt"]
    if device_trt and pkg_trt and not same_tensorrt(pkg_trt, device_trt):
        log.write(f"note: the package names TensorRT {pkg_trt}, this device has {device_trt}: "
                  "the engine is built for the device's\n")
    if force:
        return "build", 0
    sha = file_sha256(onnx_path)
    candidates = [(str(engine_path), "reuse")]
    if cache:
        candidates.append((os.path.join(cache, "model.engine"), "cached"))
    for path, action in candidates:
        if not os.path.exists(path):
            continue
        built = _load_json(path + ".json")
        why = engine_mismatches(built, want, device_trt, device_gpu, sha) if built is not None \
            else [f"no {os.path.basename(path)}.json says what it was built with"]
        if why:
            log.write("not reusing {}: {}\n".format(path, "; ".join(why)))
            continue
        if action == "cached":
            _copy_atomic(path, engine_path)
            _copy_atomic(path + ".json", str(engine_path) + ".json")
        return action, 0
    return "build", 0


def trtexec_meta(want_path, onnx_path, trtexec):
    """model.engine.json for an engine trtexec just built on this device."""
    spec = wanted_build(_load_json(want_path) or {})
    gpu = gpu_facts()
    return {"built_by": "trtexec", "tensorrt": device_tensorrt_version(trtexec), "gpu": gpu,
            "compute_capability": (gpu or {}).get("compute_capability"), "precision": spec["precision"],
            "strongly_typed": spec["strongly_typed"], "dla_core": spec["dla_core"], "keep_fp32": spec["keep_fp32"],
            "onnx_sha256": file_sha256(onnx_path), "onnx": os.path.basename(str(onnx_path)),
            "host": platform.node(), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def store(engine_path, cache):
    """Keep the engine and its model.engine.json in the device's engine cache (atomic per file; the
    json last, so a half-written cache entry is never taken for a complete one)."""
    if not os.path.isdir(cache):
        os.makedirs(cache)
    if os.path.exists(os.path.join(cache, "model.engine.json")):
        os.remove(os.path.join(cache, "model.engine.json"))
    _copy_atomic(engine_path, os.path.join(cache, "model.engine"))
    _copy_atomic(str(engine_path) + ".json", os.path.join(cache, "model.engine.json"))


def build_engine(onnx_path, engine_path, precision, workspace_mb, strongly_typed=False, keep_fp32=(),
                 dla_core=None, timing_cache=None):
    """Parse the ONNX, configure the builder for the precision, build, and write the engine plus a
    sidecar JSON naming the TensorRT version and GPU it is tied to. Returns that metadata."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError("tensorrt is not importable: " + GPU_REQUIRED) from None
    if gpu_facts() is None:
        raise RuntimeError(GPU_REQUIRED)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:  # precision comes from the graph (Q/DQ and FP16 tensors), not builder flags
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser rejected {}: {}".format(onnx_path, errors[0] if errors else "?"))
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    else:
        config.max_workspace_size = int(workspace_mb) << 20
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # with INT8: layers outside Q/DQ fall back to FP16
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        keep = set(keep_fp32)
        if keep:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.name in keep:
                    layer.precision = trt.float32
                    for j in range(layer.num_outputs):
                        layer.set_output_type(j, trt.float32)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers the DLA lacks run on the GPU
    cache_bytes = b""
    if timing_cache and os.path.exists(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    start = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine for {onnx_path} ({precision})")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    if timing_cache:
        with open(timing_cache, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    gpu = gpu_facts()
    meta = {"built_by": "tensorrt python", "tensorrt": trt.__version__, "gpu": gpu,
            "compute_capability": (gpu or {}).get("compute_capability"), "precision": precision,
            "strongly_typed": bool(strongly_typed), "dla_core": dla_core, "keep_fp32": sorted(keep_fp32),
            "workspace_mb": int(workspace_mb), "build_seconds": round(time.time() - start, 1),
            "host": platform.node(), "onnx": os.path.basename(str(onnx_path)),
            "onnx_sha256": file_sha256(onnx_path)}
    # Metadata beside the engine, never prepended to it: a header breaks trtexec and DeepStream.
    with open(str(engine_path) + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build a TensorRT engine from an edgekit package's ONNX.")
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--workspace-mb", type=int, default=1024)
    ap.add_argument("--strongly-typed", action="store_true")
    ap.add_argument("--keep-fp32", nargs="*", default=[])
    ap.add_argument("--dla-core", type=int, default=None)
    ap.add_argument("--timing-cache", default=None)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--decide", action="store_true",
                      help="print reuse, cached or build (exit 4: this device cannot build the package's engine)")
    mode.add_argument("--write-meta", action="store_true", help="write ENGINE.json for an engine trtexec built")
    mode.add_argument("--store", metavar="CACHE_DIR", help="copy ENGINE and ENGINE.json into CACHE_DIR")
    ap.add_argument("--want", default="engine.json", help="the package's engine.json")
    ap.add_argument("--cache", default=None, help="--decide: an engine cache folder to reuse from")
    ap.add_argument("--trtexec", default=None, help="trtexec, to ask for the TensorRT version")
    ap.add_argument("--force", action="store_true", help="--decide: always build")
    args = ap.parse_args(argv)
    if args.decide:
        action, status = decide(args.want, args.onnx, args.engine, args.cache, args.trtexec, args.force)
        print(action)
        return status
    if args.write_meta:
        with open(args.engine + ".json", "w") as f:
            json.dump(trtexec_meta(args.want, args.onnx, args.trtexec), f, indent=1)
        return 0
    if args.store:
        store(args.engine, args.store)
        return 0
    if not args.precision:
        ap.error("--precision is required to build")
    if tensorrt_version() is None:
        sys.stderr.write("tensorrt is not importable: " + GPU_REQUIRED + "\n")
        return 3
    try:
        meta = build_engine(args.onnx, args.engine, args.precision, args.workspace_mb, args.strongly_typed,
                            args.keep_fp32, args.dla_core, args.timing_cache)
    except RuntimeError as e:
        sys.stderr.write(f"build_engine: {e}\n")
        return 3
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
