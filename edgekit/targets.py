"""Targets: one YAML file per device in targets/, schema-checked on load.

`host-cpu` is special: its YAML says `detect: host`, and the CPU, memory and peak figures are read
from the machine edgekit runs on before the schema check.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from edgekit.errors import BadInput

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
REPO_TARGETS = Path(__file__).resolve().parent.parent / "targets"

_per_precision_number = {
    "type": "object",
    "propertyNames": {"enum": list(PRECISIONS)},
    "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
    "minProperties": 1,
}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "name", "description", "kind", "backends", "precisions", "peak_tops", "memory",
        "channel_multiple", "runtimes", "cpu",
    ],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
        "description": {"type": "string"},
        "vendor": {"type": "string"},
        "kind": {"enum": ["cpu", "gpu", "npu"]},
        "detect": {"enum": ["host"]},
        "backends": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "precisions": {"type": "array", "items": {"enum": list(PRECISIONS)}, "minItems": 1},
        # Dense peak throughput in tera-ops/s per precision (one MAC = 2 ops).
        "peak_tops": _per_precision_number,
        "memory": {
            "type": "object",
            "additionalProperties": False,
            "required": ["size_gb", "bandwidth_gbps"],
            "properties": {
                "size_gb": {"type": "number", "exclusiveMinimum": 0},
                "bandwidth_gbps": {"type": "number", "exclusiveMinimum": 0},
                "type": {"type": "string"},
            },
        },
        # Channel count the kernels like per precision (SIMD width, tensor-core tile).
        "channel_multiple": {
            "type": "object",
            "propertyNames": {"enum": list(PRECISIONS)},
            "additionalProperties": {"type": "integer", "minimum": 1},
            "minProperties": 1,
        },
        "runtimes": {"type": "object", "additionalProperties": {"type": "string"}},
        "cpu": {
            "type": "object",
            "additionalProperties": False,
            "required": ["arch", "cores", "isa"],
            "properties": {
                "arch": {"enum": ["x86_64", "aarch64", "armv7l"]},
                "model": {"type": "string"},
                "cores": {"type": "integer", "minimum": 1},
                "freq_ghz": {"type": "number", "exclusiveMinimum": 0},
                "isa": {"type": "array", "items": {"type": "string"}},
            },
        },
        "gpu": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "compute_capability": {"type": "string"},
                "cuda_cores": {"type": "integer", "minimum": 0},
                "tensor_cores": {"type": "integer", "minimum": 0},
            },
        },
        "dla_cores": {"type": "integer", "minimum": 0},
        # An NPU beside the CPU (Rockchip): the toolkit's platform name and its peaks, for backends that run on it.
        "npu": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "platform", "peak_tops"],
            "properties": {"name": {"type": "string"}, "platform": {"type": "string"},
                           "cores": {"type": "integer", "minimum": 1}, "peak_tops": _per_precision_number},
        },
        # The CPU whose arithmetic the target's artifacts are verified on (ARM boards: under qemu-user with this
        # CPU model, edgekit.emulate), where it differs from the build host's.
        "isa": {
            "type": "object",
            "additionalProperties": False,
            "required": ["arch", "cpu"],
            "properties": {"arch": {"enum": ["x86_64", "aarch64"]}, "cpu": {"type": "string"}},
        },
        # Published whole-model latencies on this device (e.g. benchncnn): the cost model fits its
        # per-precision efficiency to them (edgekit/profiling/costmodel.py).
        "benchmarks": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["model", "backend", "precision", "ms", "macs", "source"],
                "properties": {
                    "model": {"type": "string"},
                    "backend": {"type": "string"},
                    "precision": {"enum": list(PRECISIONS)},
                    "ms": {"type": "number", "exclusiveMinimum": 0},
                    "macs": {"type": "integer", "minimum": 1},
                    "layers": {"type": "integer", "minimum": 0},
                    "threads": {"type": "integer", "minimum": 1},
                    "source": {"type": "string"},
                },
            },
        },
        "notes": {"type": "array", "items": {"type": "string"}},
        "sources": {"type": "array", "items": {"type": "string"}},
    },
}


@dataclass
class Target:
    """A device: what it can run and how fast, as the planner and exporters need it."""

    name: str
    description: str
    kind: str
    backends: list[str]
    precisions: list[str]
    peak_tops: dict[str, float]
    memory: dict[str, Any]
    channel_multiple: dict[str, int]
    runtimes: dict[str, str]
    cpu: dict[str, Any]
    vendor: str = ""
    gpu: dict[str, Any] | None = None
    dla_cores: int = 0
    isa: dict[str, str] | None = None  # {arch, cpu}: the CPU the artifacts' numerics are checked on
    npu: dict[str, Any] | None = None  # {name, platform, cores, peak_tops}: a Rockchip NPU (the rknn backend)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    detect: str | None = None
    path: str = ""

    @property
    def is_host(self) -> bool:
        return self.detect == "host"

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    @property
    def emulated_cpu(self) -> str | None:
        """The CPU model to verify on under emulation: the target's own CPU when its architecture is not this
        machine's (an aarch64 board built on x86); None when the host computes as the target does."""
        if self.is_host or not self.isa or self.isa.get("arch") == platform.machine():
            return None
        return self.isa.get("cpu")

    def has_isa(self, flag: str) -> bool:
        return flag in self.cpu.get("isa", [])

    @property
    def int8_dot_saturates(self) -> bool:
        """An x86 CPU without VNNI/AMX: its u8*s8 dot product (vpmaddubsw) saturates at int16, so 8-bit
        weights times large activations overflow; 7-bit weights (ORT reduce_range, NNCF overflow_fix) do not."""
        vnni = any(self.has_isa(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
        return self.kind == "cpu" and self.cpu.get("arch") == "x86_64" and not vnni

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, [], "") or k in ("backends", "precisions")}


def search_path() -> list[Path]:
    """Where target files are looked up: $EDGEKIT_TARGETS (os.pathsep-separated), ./targets, the repo's."""
    dirs = [Path(p) for p in os.environ.get("EDGEKIT_TARGETS", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "targets", REPO_TARGETS]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.append(d.resolve())
    return seen


def known_targets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in search_path():
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def load_target(name_or_path: str) -> Target:
    """Load a target by name (targets/NAME.yaml) or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return _load_file(p)
    known = known_targets()
    if name_or_path not in known:
        names = ", ".join(sorted(known)) or "(none found)"
        raise BadInput(f"unknown target '{name_or_path}'; known targets: {names}")
    return _load_file(known[name_or_path])


def load_all() -> list[Target]:
    return [_load_file(p) for p in known_targets().values()]


def _load_file(path: Path) -> Target:
    from edgekit.untrusted import load_yaml

    raw = load_yaml(path, "target file")
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: a target file must be a mapping of keys to values")
    if raw.get("detect") == "host":
        raw = {**detect_host(raw.get("backends") or []), **raw}
    validate_target_dict(raw, str(path))
    from edgekit import backends

    joining = [b for b in backends.joining(raw["name"]) if b not in raw["backends"]]
    if joining:  # backends from outside edgekit's tree that run here (Backend.extra_targets)
        raw = {**raw, "backends": [*raw["backends"], *joining]}
    if raw["name"] != path.stem:
        raise BadInput(f"{path}: key 'name' is '{raw['name']}' but the file is named '{path.stem}.yaml'")
    for table in ("peak_tops", "channel_multiple"):
        missing = [p for p in raw["precisions"] if p not in raw[table]]
        if missing:
            raise BadInput(f"{path}: key '{table}' lacks an entry for precision(s) {', '.join(missing)}")
    return Target(**raw, path=str(path))


def validate_target_dict(raw: dict[str, Any], where: str) -> None:
    """Schema check with a one-line message naming the file and the key."""
    errors = sorted(jsonschema.Draft202012Validator(TARGET_SCHEMA).iter_errors(raw), key=lambda e: e.path)
    if not errors:
        return
    e = errors[0]
    at = ".".join(str(p) for p in e.absolute_path)
    if e.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)'", e.message.split("(")[-1])
        key = extra[0] if extra else e.message
        raise BadInput(f"{where}: unknown key '{at + '.' if at else ''}{key}'")
    if e.validator == "required":
        key = re.findall(r"'([^']+)'", e.message)[0]
        raise BadInput(f"{where}: missing key '{at + '.' if at else ''}{key}'")
    if e.validator == "enum" and list(e.validator_value) == list(PRECISIONS):
        raise BadInput(f"{where}: key '{at}' names {e.instance!r}, not a precision ({', '.join(PRECISIONS)})")
    raise BadInput(f"{where}: key '{at or '(top)'}': {e.message}")


# ---------------------------------------------------------------- host detection


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info.setdefault(k.strip(), v.strip())
    return info


def detect_host(listed: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """CPU, memory and derived peaks of this machine, in the target schema's terms; `listed`: the target's
    backends, whose runtimes come first under "runtimes"."""
    import psutil

    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    wanted = [
        "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
        "avx512_bf16", "avx512_fp16", "avx512_vp2intersect", "amx_tile", "amx_int8", "amx_bf16",
        "asimd", "asimdhp", "asimddp", "fphp", "sve", "i8mm",
    ]
    isa = [f for f in wanted if f in flags]
    arch = platform.machine() or "x86_64"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    mhz = float(info.get("cpu MHz", "0") or 0)
    freq = psutil.cpu_freq()
    ghz = round(((freq.max or freq.current) if freq else mhz) / 1000, 2) or 2.0

    # FP32 FLOPs per cycle per core: two FMA units of the widest vector width. AMD's AVX-512 before Zen 5
    # (which alone of them has VP2INTERSECT) runs on 256-bit datapaths: AVX2's rate.
    if "avx512f" in flags and (info.get("vendor_id") != "AuthenticAMD" or "avx512_vp2intersect" in flags):
        fp32_per_cycle = 64
    elif ("avx2" in flags and "fma" in flags) or "avx512f" in flags:
        fp32_per_cycle = 32
    elif "asimd" in flags:
        fp32_per_cycle = 16
    else:
        fp32_per_cycle = 8
    # INT8 gains only with dot-product instructions (VNNI, AMX, ARM's sdot): without, AVX2's pmaddubsw
    # path measured slower than FP32 in ONNX Runtime (shared/device-facts.md)
    int8_gain = 4 if {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & flags else 1
    fp16_gain = 2 if {"avx512_fp16", "asimdhp", "amx_bf16"} & flags else 1
    fp32_tops = cores * ghz * fp32_per_cycle / 1000
    align = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    return {
        "vendor": info.get("vendor_id", ""),
        "precisions": ["fp32", "fp16", "int8"],
        "peak_tops": {
            "fp32": round(fp32_tops, 3),
            "fp16": round(fp32_tops * fp16_gain, 3),
            "int8": round(fp32_tops * int8_gain, 3),
        },
        # Bandwidth is not readable from software; a typical figure for a server share, to be
        # replaced by a fit to measured profiles.
        "memory": {"size_gb": mem_gb, "bandwidth_gbps": 20.0},
        "channel_multiple": {"fp32": align, "fp16": align, "int8": align},
        "cpu": {
            "arch": arch if arch in ("x86_64", "aarch64", "armv7l") else "x86_64",
            "model": info.get("model name", platform.processor() or arch),
            "cores": cores,
            "freq_ghz": ghz,
            "isa": isa,
        },
        "runtimes": _installed_runtimes(listed),
    }


def _installed_runtimes(listed: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of every backend's runtime (Backend.runtime_distributions), the listed backends'
    first."""
    from importlib import metadata

    from edgekit import backends

    known = backends.names()
    found = {}
    for name in [*[b for b in listed if b in known], *known]:
        for dist in backends.get(name).runtime_distributions:
            if dist in found:
                continue
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    return found
