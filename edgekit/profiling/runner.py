# ruff: noqa: UP021  (subprocess text= is Python 3.7+; this file runs on 3.6)
"""edgekit's device runner: times a package's artifacts on the machine it runs on.

edgekit copies this one file to a device (with the package's manifest.json and artifact folders)
and runs it there with the device's Python. It must run on old device images as they ship
(JetPack 4.6 has Python 3.6), so: Python 3.6 syntax, the standard library, and the device's
runtimes (onnxruntime, ncnn, openvino, numpy; trtexec for TensorRT) imported only when needed.
tests/test_devices.py parses it with feature_version=(3, 6). It is one file, over the size of edgekit's
other modules, on purpose: one cohesive thing (facts, loaders, the timing loop, the TensorRT engine
cache), copied to the device as it is and run there alone.

The artifacts are timed as the host times them (edgekit.profiling.timing): loaded together in this one
process, then interleaved in rounds in which every artifact runs one block, with the same block, skip
and stop rule and the same summary figures, so latencies measured here keep the ratios the host's rule
promises. TensorRT artifacts are timed by trtexec, after the others.

TensorRT engines are kept in a per-device cache, $EDGEKIT_ENGINE_CACHE or ~/.cache/edgekit/engines
($XDG_CACHE_HOME honoured), one folder per ONNX sha256 and precision: the package's build_engine.sh
reuses one there when its model.engine.json matches the package and the device, else builds and stores it.

  python3 runner.py --probe                      facts about the device, as one JSON line
  python3 runner.py --compute REQUEST.json       outputs of given inputs (numerics), as an .npz
  python3 runner.py --package DIR [--artifact KEY ...] [--seconds S] [--min-runs N] [--threads T]
                    [--block B] [--block-skip K] measurements, as one JSON line on stdout

Exit status: 0 measured (per-artifact errors are in "errors"), 3 could not measure ("error"),
124 the --deadline passed.
"""

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

RUNNER_VERSION = 1
RUNTIMES = ("numpy", "onnxruntime", "openvino", "ncnn", "tensorrt", "rknnlite")
# Python modules each backend's artifacts need here (edgekit.profiling.devices.missing_runtime asks the same).
# TensorRT needs none: trtexec builds and times the engine, build_engine.py is standard library.
BACKEND_NEEDS = {"onnxruntime": ("onnxruntime", "numpy"), "ort-mobile": ("onnxruntime", "numpy"),
                 "ncnn": ("ncnn", "numpy"), "openvino": ("openvino", "numpy"), "tensorrt": (),
                 "rknn": ("rknnlite", "numpy")}
ENGINE_REFUSED = 4  # build_engine.sh: this device's TensorRT cannot build the package's engine
TRTEXEC_DIRS = ("/usr/src/tensorrt/bin", "/usr/local/tensorrt/bin", "/opt/tensorrt/bin")
# CPU flags that decide which kernels run (x86 SIMD, ARM fp16 arithmetic and dot product).
NOTABLE_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                 "neon", "asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16", "sve")


class RunnerError(Exception):
    def __init__(self, message, **extra):
        Exception.__init__(self, message)
        self.extra = extra


class DeadlineReached(Exception):
    pass


# ---------------------------------------------------------------- facts


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def _command(argv, timeout=15):
    """(exit status, stdout + stderr) of a command, or None when it is absent, not allowed or hangs."""
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           universal_newlines=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.returncode, p.stdout


def runtime_info(module):
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return {"version": None}
    except (ImportError, ValueError):
        return {"version": None}
    try:
        m = importlib.import_module(module)
        version = getattr(m, "__version__", None)
        if version is None and module == "openvino":
            from openvino.runtime import get_version  # older OpenVINO

            version = get_version()
        return {"version": str(version or "unknown")}
    except Exception as e:  # installed but broken (a numpy ABI mismatch, a missing shared library)
        return {"version": None, "error": type(e).__name__ + ": " + (str(e).splitlines() or [""])[0]}


def trtexec_path():
    found = shutil.which("trtexec")
    if found:
        return found
    for d in TRTEXEC_DIRS:
        p = os.path.join(d, "trtexec")
        if os.access(p, os.X_OK):
            return p
    return None


def engine_cache_root():
    """Where built TensorRT engines are kept between measurements (an engine build takes minutes on a
    Jetson Nano, and the measuring folder is removed after every run)."""
    if os.environ.get("EDGEKIT_ENGINE_CACHE"):
        return os.environ["EDGEKIT_ENGINE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgekit", "engines")


def engine_cache_listing(limit=500):
    """The cache's complete entries (ONNX-SHA256-PRECISION), for the host's timeout estimate."""
    root = engine_cache_root()
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    done = [n for n in names if os.path.isfile(os.path.join(root, n, "model.engine.json"))]
    return {"dir": root, "entries": done[:limit]}


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensorrt_version_from(text):
    """TensorRT's version in trtexec's output ("TensorRT version: 10.3.0", or the banner's v100300)."""
    m = re.search(r"TensorRT version: (\d+(?:\.\d+)+)", text)
    if m:
        return m.group(1)
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if not m:
        return None
    code = int(m.group(1))
    if code >= 10000:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_facts():
    info = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info.setdefault(k.strip().lower(), v.strip())
    model = (info.get("model name") or info.get("hardware") or info.get("model")
             or _read("/proc/device-tree/model") or platform.processor() or platform.machine())
    flags = (info.get("flags") or info.get("features") or "").split()
    return {"model": model, "cores": os.cpu_count(), "usable_cores": usable_cores(), "arch": platform.machine(),
            "flags": sorted(f for f in flags if f in NOTABLE_FLAGS), "flag_count": len(flags)}


def gpu_facts():
    gpu = {"nvidia_smi": None, "jetson_model": None, "l4t": None}
    r = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if r is not None and r[0] == 0:
        gpu["nvidia_smi"] = [ln.strip() for ln in r[1].splitlines() if ln.strip()]
    model = _read("/proc/device-tree/model")
    if model and ("jetson" in model.lower() or "nvidia" in model.lower()):
        gpu["jetson_model"] = model
    release = _read("/etc/nv_tegra_release")
    if release:
        gpu["l4t"] = release.splitlines()[0]
    return gpu


def temperatures():
    temps = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        raw = _read(os.path.join(zone, "temp"))
        try:
            value = int(raw) / 1000.0
        except (TypeError, ValueError):
            continue
        name = _read(os.path.join(zone, "type")) or os.path.basename(zone)
        temps[name if name not in temps else os.path.basename(zone)] = round(value, 1)
    return temps or None


def clocks_locked():
    """jetson_clocks --show: locked when every CPU and the GPU run with MinFreq == MaxFreq. None when absent."""
    exe = shutil.which("jetson_clocks") or ("/usr/bin/jetson_clocks" if os.path.exists("/usr/bin/jetson_clocks")
                                            else None)
    if not exe:
        return None
    r = _command([exe, "--show"])
    if r is None or r[0] != 0:
        return None
    pairs = []
    for line in r[1].splitlines():
        words = line.split()
        if not words or not (words[0].startswith("cpu") or words[0] == "GPU"):
            continue
        f = dict(w.split("=", 1) for w in words if "=" in w)
        if "MinFreq" in f and "MaxFreq" in f:
            pairs.append(f["MinFreq"] == f["MaxFreq"])
    return all(pairs) if pairs else None


def conditions():
    """What changes latency on the device at the time of measuring."""
    mode = None
    r = _command(["nvpmodel", "-q"])
    if r is not None and r[0] == 0:
        for line in r[1].splitlines():
            if "Power Mode" in line and ":" in line:
                mode = line.split(":", 1)[1].strip()
        mode = mode or (r[1].strip().splitlines() or [None])[0]
    return {
        "power_mode": mode,
        "clocks_locked": clocks_locked(),
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "temperature_c": temperatures(),
    }


def probe():
    return {
        "runner": RUNNER_VERSION,
        "python": platform.python_version(),
        "executable": sys.executable,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "runtimes": dict((m, runtime_info(m)) for m in RUNTIMES),
        "trtexec": trtexec_path(),
        "engine_cache": engine_cache_listing(),
        "cpu": cpu_facts(),
        "gpu": gpu_facts(),
        "conditions": conditions(),
    }


# ---------------------------------------------------------------- timing


def percentile(sorted_ms, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_ms) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summary(ms, threads):
    s = sorted(ms)
    return {"p50": round(percentile(s, 50), 4), "p90": round(percentile(s, 90), 4),
            "p99": round(percentile(s, 99), 4), "mean": round(sum(s) / len(s), 4), "min": round(s[0], 4),
            "runs": len(s), "threads": threads}


# The host's timing rule (edgekit.profiling.timing: block_rule and timed_rounds with per_job_seconds, as
# compare times; ProfileSettings' block and block_skip), copied because this file runs alone on the
# device; tests/test_profile.py holds the two to the same times on one synthetic sequence of run times.
BLOCK = 25  # runs counted per block
BLOCK_SKIP = 3  # runs discarded at the start of each block (the previous runtime's threads still spin)


def block_rule(min_runs, block=BLOCK, skip=BLOCK_SKIP):
    """(runs counted per block, runs discarded before them)."""
    block = max(1, min(block, min_runs // 4))
    return block, (skip if block > 1 else 0)


def _failure(e):
    return str(e) if isinstance(e, RunnerError) else f"{type(e).__name__}: {e}"


def interleaved(runs, args, clock=time.perf_counter):
    """Time the calls [(key, run), ...] as the host does: `args.warmup` runs of each, then rounds in which
    every call runs one block, the order rotated every round, until each has args.min_runs and its counted
    runs took args.seconds (--seconds: per artifact, at least), or each has args.max_runs. A call that
    raises is dropped from the rounds (its error returned), the others go on.
    Returns ({key: [ms, ...]}, {key: error})."""
    keys = [k for k, _ in runs]
    calls = dict(runs)
    errors = {}

    def failed(k, e):
        errors[k] = _failure(e)
        keys.remove(k)

    for _ in range(args.warmup):
        for k in list(keys):
            try:
                calls[k]()
            except DeadlineReached:
                raise
            except Exception as e:
                failed(k, e)
    block, skip = block_rule(args.min_runs, args.block, args.block_skip)
    times = dict((k, []) for k in keys)
    spent = dict((k, 0.0) for k in keys)
    rnd = 0
    while keys:
        shift = rnd % len(keys)
        for k in keys[shift:] + keys[:shift]:
            run, ms, took = calls[k], [], 0.0
            try:
                for i in range(skip + block):
                    t0 = clock()
                    run()
                    dt = clock() - t0
                    if i >= skip:
                        ms.append(dt * 1e3)
                        took += dt
            except DeadlineReached:
                raise
            except Exception as e:
                failed(k, e)
                continue
            times[k] += ms
            spent[k] += took
        rnd += 1
        if not keys:
            break
        done = min(len(times[k]) for k in keys)
        if (done >= args.min_runs and min(spent[k] for k in keys) >= args.seconds) or done >= args.max_runs:
            break
    return dict((k, times[k]) for k in keys), errors


def random_feeds(inputs):
    """Random inputs of the manifest's shapes and dtypes, in the manifest's order."""
    import numpy as np

    rng = np.random.RandomState(0)
    feeds = []
    for t in inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in t["shape"]]
        dtype = np.dtype(t.get("dtype") or "float32")
        if dtype.kind == "f":
            x = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            x = rng.randint(0, 2, size=shape).astype(dtype)
        else:
            x = np.zeros(shape, dtype)
        feeds.append((t["name"], x))
    return feeds


def load_onnxruntime(package, art, inputs, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # ORT-format files (ort-mobile) carry saved runtime optimizations the app replays via config entries.
    for key, value in sorted(((art.get("details") or {}).get("runtime_options") or {}).items()):
        if hasattr(so, "add_session_config_entry") and "." in key:
            so.add_session_config_entry(key, str(value))
    path = os.path.join(package, art["entry"])
    try:
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except TypeError:  # onnxruntime before providers=
        session = ort.InferenceSession(path, so)
    names = [i.name for i in session.get_inputs()]
    feeds = random_feeds(inputs)
    by_name = dict(feeds)
    feed = dict((n, by_name[n] if n in by_name else feeds[i][1]) for i, n in enumerate(names))
    outputs = [o.name for o in session.get_outputs()]

    def run(given=None):
        """The timed call (random feeds made once); with `given` (arrays in the manifest's input order),
        the outputs of those inputs (--compute)."""
        return session.run(outputs, feed if given is None else dict(zip(names, given)))

    return run


def load_ncnn(package, art, inputs, threads):
    """As edgekit's NCNN backend loads it: CPU only; FP32 with fp16/bf16 storage and arithmetic off
    (ncnn turns them on where the CPU has them), FP16 storage for fp16, int8 inference for int8,
    plus the artifact's runtime_options."""
    import ncnn
    import numpy as np

    details = art.get("details") or {}
    precision = art["precision"]
    net = ncnn.Net()
    o = net.opt
    o.num_threads = threads
    o.use_vulkan_compute = False
    o.use_bf16_storage = False
    o.use_fp16_storage = precision == "fp16"
    o.use_fp16_packed = precision == "fp16"
    o.use_fp16_arithmetic = False
    o.use_int8_inference = precision == "int8"
    for k, v in (details.get("runtime_options") or {}).items():
        setattr(o, k, v)
    param = os.path.join(package, art["entry"])
    bin_ = param[: -len(".param")] + ".bin" if param.endswith(".param") else param + ".bin"
    if net.load_param(param) != 0 or net.load_model(bin_) != 0:
        raise RunnerError("ncnn could not load " + art["entry"])
    in_blobs, out_blobs = details.get("input_blobs"), details.get("output_blobs")
    if not in_blobs or not out_blobs:
        raise RunnerError("the manifest gives no input_blobs/output_blobs for " + art["key"])
    # No batch axis. clone(): a Mat wrapped around a numpy array packs its channels back to back, where ncnn
    # aligns each to 16 bytes and layers such as Crop read it so (shifted, and past the end of the buffer).
    # Made once, outside the timed call.
    def mats_of(arrays):
        return [ncnn.Mat(np.ascontiguousarray(x[0], dtype=np.float32)).clone() for x in arrays]

    mats = mats_of([x for _, x in random_feeds(inputs)])
    shapes = details.get("output_shapes") or [None] * len(out_blobs)

    def run(given=None):
        """The timed call (random feeds made once, outside it); with `given` (arrays in the manifest's input
        order, batch axis first), the outputs of those inputs, shaped as the model's (--compute)."""
        ex = net.create_extractor()
        for blob, mat in zip(in_blobs, mats if given is None else mats_of(given)):
            ex.input(blob, mat)
        got = []
        for blob, shape in zip(out_blobs, shapes):
            ret, mat = ex.extract(blob)
            if ret != 0:
                raise RunnerError(f"ncnn could not compute blob {blob} (error {ret})")
            y = np.array(mat)
            got.append(y.reshape(shape) if shape else y)
        return got

    def intermediates(given):
        """Every layer's output blob (Input and Split left out), in layer order, as ncnn holds it."""
        ex = net.create_extractor()
        for blob, mat in zip(in_blobs, mats_of(given)):
            ex.input(blob, mat)
        names = [b.name for b in net.blobs()]
        got = []
        for layer in net.layers():
            if layer.type in ("Input", "Split"):
                continue
            for t in layer.tops:
                ret, mat = ex.extract(names[t])
                if ret != 0:
                    raise RunnerError(f"ncnn could not compute blob {names[t]} (error {ret})")
                got.append((names[t], np.array(mat).astype(np.float32)))
        return got

    run.intermediates = intermediates
    return run


def load_openvino(package, art, inputs, threads):
    try:
        from openvino import Core
    except ImportError:  # OpenVINO before 2023.1
        from openvino.runtime import Core

    core = Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
              "INFERENCE_PRECISION_HINT": (art.get("details") or {}).get("inference_precision_hint", "f32")}
    compiled = core.compile_model(core.read_model(os.path.join(package, art["entry"])), "CPU", config)
    request = compiled.create_infer_request()
    feed = dict(random_feeds(inputs))
    names = [t["name"] for t in inputs]

    def run(given=None):
        result = request.infer(feed if given is None else dict(zip(names, given)))
        return [result[o] for o in compiled.outputs]

    return run


def load_rknn(package, art, inputs, threads):
    """A .rknn on a Rockchip board's NPU through rknn-toolkit-lite2 (RKNNLite), all NPU cores (threads: unused)."""
    import numpy as np
    from rknnlite.api import RKNNLite

    lite = RKNNLite()
    if lite.load_rknn(os.path.join(package, art["entry"])) != 0:
        raise RunnerError("RKNNLite could not load " + art["entry"])
    core = getattr(RKNNLite, "NPU_CORE_AUTO", None)
    if (lite.init_runtime(core_mask=core) if core is not None else lite.init_runtime()) != 0:
        raise RunnerError("RKNNLite could not start the NPU runtime (is this a Rockchip board with its NPU driver?)")
    feeds = [np.ascontiguousarray(x, dtype=np.float32) for _, x in random_feeds(inputs)]

    def run(given=None):
        return lite.inference(inputs=feeds if given is None else [np.asarray(x, np.float32) for x in given],
                              data_format=["nchw"] * len(feeds))

    return run


# Every backend edgekit has (tests/test_architecture.py checks the registry against it): how its artifacts
# load here into a call to time, or None: trtexec builds and times them (time_tensorrt).
LOADERS = {"onnxruntime": load_onnxruntime, "ort-mobile": load_onnxruntime, "ncnn": load_ncnn,
           "openvino": load_openvino, "tensorrt": None, "rknn": load_rknn}


def time_tensorrt(package, art, args, deadline_at):
    """Get an engine (the package's, the device's engine cache, or built by the package's build_engine.sh,
    which decides), then time it with trtexec."""
    exe = trtexec_path()
    if not exe:
        raise RunnerError("trtexec not found (on PATH or in /usr/src/tensorrt/bin): install TensorRT (JetPack on "
                          "Jetson) and put trtexec on PATH", missing="trtexec")
    # Absolute paths throughout: build_engine.sh runs with its own folder as the working directory.
    folder = os.path.abspath(os.path.join(package, os.path.dirname(art["entry"])))
    onnx = os.path.abspath(os.path.join(package, art["entry"]))
    left = max(10, int(deadline_at - time.time())) if deadline_at else 3600

    def engines():
        main = os.path.join(folder, "model.engine")
        return [main] if os.path.exists(main) else sorted(glob.glob(os.path.join(folder, "*.engine"))
                                                          + glob.glob(os.path.join(folder, "*.plan")))

    cache = os.path.join(engine_cache_root(), file_sha256(onnx) + "-" + art["precision"]) \
        if os.path.exists(onnx) else None
    scripts = [p for p in (os.path.join(folder, "build_engine.sh"), os.path.join(os.path.abspath(package),
                                                                                 "build_engine.sh"))
               if os.path.exists(p)]
    env = dict(os.environ, TRTEXEC=exe, PYTHON=sys.executable,
               PATH=os.path.dirname(exe) + os.pathsep + os.environ.get("PATH", ""))
    engine = {"source": "package", "cache": cache}
    t0 = time.time()
    argv = None
    if scripts:  # it compares any engine there (or cached) with the package and this device, else builds
        argv = ["sh", scripts[0]] + (["--cache", cache] if cache else [])
    elif not engines():
        flag = {"fp16": ["--fp16"], "int8": ["--int8"]}.get(art["precision"], [])
        argv = [exe, "--onnx=" + onnx, "--saveEngine=" + os.path.join(folder, "model.engine"), *flag]
    if argv:
        try:
            p = subprocess.run(argv, cwd=os.path.dirname(argv[1]) if scripts else folder, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               universal_newlines=True, timeout=left)
        except subprocess.TimeoutExpired:
            raise RunnerError(f"building the TensorRT engine did not finish in {left} s") from None
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        if p.returncode == ENGINE_REFUSED:
            raise RunnerError("this device cannot build the package's TensorRT engine: "
                              + (lines[-1] if lines else "no output"))
        if p.returncode != 0 or not engines():
            raise RunnerError("building the TensorRT engine failed (exit {}): {}".format(
                p.returncode, lines[-1] if lines else "no output"))
        said = [ln for ln in lines if ln.startswith("edgekit-engine:")]
        if said:
            engine["source"] = "cache" if "cached" in said[-1] else "package" if "reused" in said[-1] else "built"
        else:  # trtexec run directly, or an older package's script that does not say
            engine["source"] = "unknown" if scripts else "built"
        engine["log"] = lines[-20:]
    engine["seconds"] = round(time.time() - t0, 3)
    left = max(10, int(deadline_at - time.time())) if deadline_at else 3600
    times_json = os.path.join(folder, "edgekit-times.json")
    argv = [exe, "--loadEngine=" + engines()[0], f"--warmUp={max(200, args.warmup * 20)}",
            f"--duration={max(1, math.ceil(args.seconds))}", f"--iterations={args.min_runs}",
            "--avgRuns=1", "--exportTimes=" + times_json]
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           universal_newlines=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise RunnerError(f"trtexec did not finish in {left} s") from None
    if p.returncode != 0 or not os.path.exists(times_json):
        tail = [ln for ln in p.stdout.splitlines() if ln.strip()][-1:] or ["no output"]
        raise RunnerError(f"trtexec failed (exit {p.returncode}): {tail[0]}")
    with open(times_json) as f:
        records = json.load(f)
    ms = [float(r.get("latencyMs", r.get("computeMs", 0.0))) for r in records]
    if not ms:
        raise RunnerError("trtexec reported no timings")
    result = summary(ms, 1)
    result["trtexec_output"] = p.stdout[-12000:]  # its performance summary, parsed on the host
    result["tensorrt"] = tensorrt_version_from(p.stdout)
    result["engine"] = engine
    return result


# ---------------------------------------------------------------- main


def release(version):
    """The leading numbers of a version string: '1.32.0' -> (1, 32, 0), '1.0.20261020' -> (1, 0, 20261020)."""
    out = []
    for part in str(version).replace("-", ".").split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def lock_problem(manifest, backend):
    """The runtime lock: a device runtime older (major.minor) than the one the package was verified with
    may lack an op, a kernel or the file format, so such an artifact is refused with what to install."""
    for module in BACKEND_NEEDS.get(backend, ()):
        if module == "numpy":
            continue
        built = (manifest.get("toolchain") or {}).get(module)
        have = runtime_info(module)["version"]
        if built and have and release(have)[:2] < release(built)[:2]:
            return (f"this device's {module} {have} is older than {built}, which the package was built and "
                    f"verified with: pip install '{module}>={built}' on the device, or rebuild the package with "
                    f"edgekit using {module} {have}")
    return None


def measure(args):
    # Wall-clock times of this device's clock around the whole measurement (loading, warm-up, timing): what a
    # device pool checks to prove two measurements never shared the device.
    started = time.time()
    deadline_at = started + args.deadline if args.deadline else None
    args.package = os.path.abspath(args.package)
    with open(os.path.join(args.package, "manifest.json")) as f:
        manifest = json.load(f)
    arts = manifest.get("artifacts") or []
    by_key = dict((a["key"], a) for a in arts)
    keys = []
    for k in args.artifact or [a["key"] for a in arts]:
        keys += [] if k in keys else [k]
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise RunnerError("no artifact " + ", ".join(unknown) + " in the package (it has " + ", ".join(by_key) + ")")
    python = "{}.{}".format(*sys.version_info[:2])
    needed = []
    for k in keys:
        needed += [m for m in BACKEND_NEEDS.get(by_key[k]["backend"], ()) if m not in needed]
    for m in needed:
        info = runtime_info(m)
        if not info["version"]:
            broken = " (installed but import fails: " + info["error"] + ")" if info.get("error") else ""
            raise RunnerError(f"no {m} for Python {python}{broken}: pip install {m}", missing=m, python=python)
    threads = args.threads or usable_cores()
    result = {"runner": RUNNER_VERSION, "python": platform.python_version(),
              "runtimes": dict((m, runtime_info(m)["version"]) for m in needed),
              "conditions": conditions(), "results": {}, "errors": {}}
    results, errors = result["results"], result["errors"]
    # Every artifact a runtime here loads is timed interleaved with the others, in one process, as on the
    # host; TensorRT's are timed by trtexec afterwards, one after another (trtexec owns its timing loop),
    # once the other sessions are released.
    by_trtexec = [k for k in keys if by_key[k]["backend"] in LOADERS and LOADERS[by_key[k]["backend"]] is None]
    loaded, load_s = [], {}
    for k in keys:
        art = by_key[k]
        if k in by_trtexec:
            continue
        try:
            if art["backend"] not in LOADERS:
                raise RunnerError("the runner cannot run " + art["backend"] + " artifacts")
            locked = lock_problem(manifest, art["backend"])
            if locked:
                raise RunnerError(locked)
            t0 = time.perf_counter()
            loaded.append((k, LOADERS[art["backend"]](args.package, art, manifest["inputs"], threads)))
            load_s[k] = round(time.perf_counter() - t0, 3)
        except DeadlineReached:
            raise
        except Exception as e:
            errors[k] = _failure(e)
    times, failed = interleaved(loaded, args)
    del loaded
    errors.update(failed)
    for k, ms in times.items():
        results[k] = summary(ms, threads)
        results[k]["load_s"] = load_s[k]
    for k in by_trtexec:
        try:
            results[k] = time_tensorrt(args.package, by_key[k], args, deadline_at)
            if results[k].get("tensorrt"):
                result["runtimes"]["tensorrt"] = results[k]["tensorrt"]
        except DeadlineReached:
            raise
        except Exception as e:
            errors[k] = _failure(e)
    result["results"] = dict((k, results[k]) for k in keys if k in results)
    result["errors"] = dict((k, errors[k]) for k in keys if k in errors)
    result["conditions"]["temperature_c_after"] = temperatures()
    result["started"], result["finished"] = round(started, 6), round(time.time(), 6)
    result["pid"] = os.getpid()
    return result


# AT_HWCAP / AT_HWCAP2 bits of aarch64 Linux (arch/arm64/include/uapi/asm/hwcap.h): what the kernel (or qemu-user,
# which emulates /proc/self/auxv for its guest) says this CPU computes, the flags ncnn picks its kernels by.
ARM_HWCAP = {"fp": 0, "asimd": 1, "aes": 3, "fphp": 9, "asimdhp": 10, "asimddp": 20, "sve": 22}
ARM_HWCAP2 = {"i8mm": 13, "bf16": 14}


def arm_hwcaps():
    """The aarch64 feature flags of this process's CPU from /proc/self/auxv, or None off aarch64."""
    if platform.machine() not in ("aarch64", "arm64"):
        return None
    try:
        with open("/proc/self/auxv", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw) - 15, 16)]
    values = [int.from_bytes(raw[i + 8:i + 16], "little") for i in range(0, len(raw) - 15, 16)]
    aux = dict(zip(words, values))
    hwcap, hwcap2 = aux.get(16, 0), aux.get(26, 0)
    return sorted([k for k, b in ARM_HWCAP.items() if hwcap >> b & 1] + [k for k, b in ARM_HWCAP2.items()
                                                                          if hwcap2 >> b & 1])


def compute(request_path):
    """--compute REQUEST.json: each artifact's outputs on given inputs (numerics, not timing: edgekit's ARM
    verification runs this under qemu-user). The request names the artifacts (backend, precision, root, entry,
    details), the model inputs, an .npz of feeds ("SAMPLE|INPUT" arrays, batch axis first) and where to write
    the outputs ("KEY|SAMPLE|OUTPUT"), and whether to keep every layer's output of sample 0 ("KEY|blob|I")."""
    import numpy as np

    with open(request_path) as f:
        req = json.load(f)
    feeds = np.load(req["feeds"], allow_pickle=False)
    inputs, samples = req["inputs"], int(req["samples"])
    threads = int(req.get("threads") or 1)
    result = {"runner": RUNNER_VERSION, "python": platform.python_version(), "machine": platform.machine(),
              "hwcaps": arm_hwcaps(), "runtimes": {}, "errors": {}, "seconds": {}, "blobs": {}}
    out = {}
    for art in req["artifacts"]:
        key = art["key"]
        t0 = time.perf_counter()
        try:
            loader = LOADERS.get(art["backend"])
            if loader is None:
                raise RunnerError("the runner cannot compute " + art["backend"] + " artifacts")
            for m in BACKEND_NEEDS.get(art["backend"], ()):
                result["runtimes"][m] = runtime_info(m)["version"]
            run = loader(art["root"], art, inputs, threads)
            for s in range(samples):
                given = [feeds[f"{s}|{j}"] for j in range(len(inputs))]
                for j, y in enumerate(run(given)):
                    out[f"{key}|{s}|{j}"] = np.asarray(y, dtype=np.float32)
            if req.get("intermediates"):
                if not hasattr(run, "intermediates"):
                    raise RunnerError(art["backend"] + " exposes no intermediate blobs here")
                given = [feeds[f"0|{j}"] for j in range(len(inputs))]
                names = []
                for i, (name, y) in enumerate(run.intermediates(given)):
                    out[f"{key}|blob|{i}"] = y
                    names.append(name)
                result["blobs"][key] = names
        except Exception as e:
            result["errors"][key] = _failure(e)
        result["seconds"][key] = round(time.perf_counter() - t0, 3)
    np.savez(req["out"], **out)
    return result


def _on_alarm(signum, frame):
    raise DeadlineReached()


def main(argv=None):
    p = argparse.ArgumentParser(prog="edgekit-runner")
    p.add_argument("--probe", action="store_true", help="print facts about this device and exit")
    p.add_argument("--package", default=".")
    p.add_argument("--artifact", action="append", default=[])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--min-runs", type=int, default=50)
    p.add_argument("--max-runs", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--block", type=int, default=BLOCK, help="runs counted per block of the interleaved rounds")
    p.add_argument("--block-skip", type=int, default=BLOCK_SKIP, help="runs discarded at the start of each block")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--deadline", type=float, default=0, help="give up after this many seconds")
    p.add_argument("--compute", metavar="REQUEST.json", help="outputs of given inputs, not timings (see compute)")
    args = p.parse_args(argv)
    if args.probe:
        sys.stdout.write(json.dumps(probe()) + "\n")
        return 0
    # A process group of its own: edgekit's cleanup stops the runner with what it starts (trtexec,
    # build_engine.sh) by signalling the group of the pid it recorded, and nothing else.
    if hasattr(os, "setpgid"):
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
    # Runtimes may print on stdout; the JSON line must be the only thing there.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    status = 0
    try:
        if args.deadline and hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.alarm(max(1, int(args.deadline)))
        result = compute(args.compute) if args.compute else measure(args)
    except DeadlineReached:
        result = {"runner": RUNNER_VERSION, "error": "timeout", "timeout_s": args.deadline}
        status = 124
    except RunnerError as e:
        result = {"runner": RUNNER_VERSION, "error": str(e)}
        result.update(e.extra)
        status = 3
    except Exception as e:
        result = {"runner": RUNNER_VERSION, "error": f"{type(e).__name__}: {e}"}
        status = 3
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    os.write(1, (json.dumps(result) + "\n").encode("utf-8"))
    return status


if __name__ == "__main__":
    sys.exit(main())
