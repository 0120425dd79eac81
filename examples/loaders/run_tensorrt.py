"""Classify images with a package's TensorRT artifact on an NVIDIA GPU (Jetson, or x86 with CUDA):
python run_tensorrt.py PACKAGE IMAGE... [--artifact KEY]

The package carries the ONNX and build_engine.sh, not an engine: engines are tied to one TensorRT
version and GPU, so run `sh PACKAGE/tensorrt-int8/build_engine.sh` on the device once first. Device
memory goes through the CUDA driver (libcuda, present wherever the NVIDIA driver is): no pycuda needed.
"""

import ctypes

import edgekit_package as ek
import numpy as np

try:
    import tensorrt as trt
except ImportError:
    raise SystemExit("tensorrt is not importable: run this on the device with TensorRT's Python bindings "
                     "(JetPack's python3, or `pip install tensorrt` on x86 with CUDA)") from None

args = ek.parse_args("tensorrt")
manifest = ek.load_manifest(args.package)
artifact = ek.pick_artifact(manifest, "tensorrt", args.artifact)
folder = ek.artifact_path(args.package, artifact).parent

# The TensorRT version first (that needs no GPU), then, once CUDA is up, the GPU's compute capability.
ek.check_runtime(manifest, artifact, "tensorrt", trt.__version__, package=args.package)
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError:
    raise SystemExit("no NVIDIA driver here (libcuda.so.1): TensorRT engines run on an NVIDIA GPU") from None


def check(status: int, what: str) -> None:
    if status != 0:
        raise SystemExit(f"CUDA {what} failed (CUresult {status})")


check(cuda.cuInit(0), "cuInit")
device, context = ctypes.c_int(), ctypes.c_void_p()
check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
cc = [ctypes.c_int(), ctypes.c_int()]
for value, attribute in zip(cc, (75, 76)):  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
    check(cuda.cuDeviceGetAttribute(ctypes.byref(value), attribute, device), "cuDeviceGetAttribute")
ek.check_runtime(manifest, artifact, "tensorrt", trt.__version__, package=args.package,
                 compute_capability=f"{cc[0].value}.{cc[1].value}")
# The primary context: the one TensorRT's CUDA runtime calls use too.
check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")

engine_file = folder / "model.engine"
if not engine_file.is_file():
    raise SystemExit(f"no {engine_file}: build it on this device first: sh {folder / 'build_engine.sh'}")
engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_file.read_bytes())
if engine is None:
    raise SystemExit(f"TensorRT could not load {engine_file}: rebuild it with sh {folder / 'build_engine.sh'} --force")
execution = engine.create_execution_context()

if hasattr(engine, "num_io_tensors"):  # TensorRT >= 8.5: named I/O tensors
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    is_input = [engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
    shapes = [tuple(engine.get_tensor_shape(n)) for n in names]
    dtypes = [trt.nptype(engine.get_tensor_dtype(n)) for n in names]
else:  # TensorRT 8.2 (JetPack 4.6): bindings
    names = [engine.get_binding_name(i) for i in range(engine.num_bindings)]
    is_input = [engine.binding_is_input(i) for i in range(engine.num_bindings)]
    shapes = [tuple(engine.get_binding_shape(i)) for i in range(engine.num_bindings)]
    dtypes = [trt.nptype(engine.get_binding_dtype(i)) for i in range(engine.num_bindings)]
host = [np.empty(s, dtype=d) for s, d in zip(shapes, dtypes)]
device_ptrs = []
for buffer in host:
    ptr = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(buffer.nbytes)), "cuMemAlloc")
    device_ptrs.append(ptr.value)

first_in, first_out = is_input.index(True), is_input.index(False)
for image in args.images:
    host[first_in][...] = ek.preprocess(image, manifest).astype(host[first_in].dtype).reshape(host[first_in].shape)
    check(cuda.cuMemcpyHtoD_v2(ctypes.c_uint64(device_ptrs[first_in]), host[first_in].ctypes.data_as(ctypes.c_void_p),
                               ctypes.c_size_t(host[first_in].nbytes)), "cuMemcpyHtoD")
    if hasattr(execution, "execute_async_v3"):
        for name, ptr in zip(names, device_ptrs):
            execution.set_tensor_address(name, ptr)
        ok = execution.execute_async_v3(0)  # the default stream; synchronised below
    else:
        ok = execution.execute_v2(device_ptrs)
    check(0 if ok else 1, "TensorRT inference")
    check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    out = host[first_out]
    check(cuda.cuMemcpyDtoH_v2(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(device_ptrs[first_out]),
                               ctypes.c_size_t(out.nbytes)), "cuMemcpyDtoH")
    ek.report(manifest, artifact, image, out.astype(np.float32))

for ptr in device_ptrs:
    cuda.cuMemFree_v2(ctypes.c_uint64(ptr))
