"""Build a TensorRT engine from an edgekit package's ONNX with TensorRT's Python API.

One file, two uses: edgekit imports it to build where `tensorrt` imports and a GPU is present, and
copies it into every TensorRT package as `build_engine.py`, which `build_engine.sh` runs on the
device (JetPack's python3 has tensorrt). So it needs only the standard library and tensorrt, and
stays valid Python 3.6 (JetPack 4.6 on the Jetson Nano): no dataclasses, no annotations import.

    python3 build_engine.py --onnx model.onnx --engine model.engine --precision int8 \
        --workspace-mb 1024 [--strongly-typed] [--keep-fp32 NODE ...] [--dla-core 0] [--timing-cache F]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

GPU_REQUIRED = ("building a TensorRT engine needs an NVIDIA GPU with TensorRT (JetPack on Jetson, "
                "`pip install tensorrt` on x86 with CUDA); run build_engine.sh on the device")


def gpu_facts():
    """Name and compute capability of the first GPU, or None when there is none."""
    try:
        out = subprocess.check_output(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                      stderr=subprocess.DEVNULL, timeout=20).decode().strip().splitlines()
        if out:
            name, cap = [s.strip() for s in out[0].split(",")[:2]]
            return {"name": name, "compute_capability": cap}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    model = "/proc/device-tree/model"  # Jetson: integrated GPU, no nvidia-smi on older JetPacks
    if os.path.exists("/etc/nv_tegra_release") and os.path.exists(model):
        with open(model) as f:
            return {"name": f.read().strip("\x00 \n"), "compute_capability": None}
    return None


def tensorrt_version():
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)  # None: a stray module of that name, not TensorRT


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
    meta = {"tensorrt": trt.__version__, "gpu": gpu_facts(), "precision": precision,
            "strongly_typed": bool(strongly_typed), "dla_core": dla_core, "keep_fp32": sorted(keep_fp32),
            "workspace_mb": int(workspace_mb), "build_seconds": round(time.time() - start, 1),
            "host": platform.node(), "onnx": os.path.basename(str(onnx_path))}
    # Metadata beside the engine, never prepended to it: a header breaks trtexec and DeepStream.
    with open(str(engine_path) + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build a TensorRT engine from an edgekit package's ONNX.")
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--precision", choices=["fp32", "fp16", "int8"], required=True)
    ap.add_argument("--workspace-mb", type=int, default=1024)
    ap.add_argument("--strongly-typed", action="store_true")
    ap.add_argument("--keep-fp32", nargs="*", default=[])
    ap.add_argument("--dla-core", type=int, default=None)
    ap.add_argument("--timing-cache", default=None)
    args = ap.parse_args(argv)
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
