"""The package in memory: typed records for manifest.json, and the one loader every reader uses.

`load_package(DIR)` reads a package folder as untrusted input (bounded JSON through edgekit.untrusted,
every path checked to stay inside the package, links followed, and the manifest schema: wrong types
are always refused; missing fields only with `complete=True`, so packages of older edgekit versions
still compare) and returns a `Package`: its path, its plan.yaml, the manifest's top level and one
`ArtifactRecord` per artifact. `ArtifactRecord.to_artifact(root)` is the one place where a backend's
Artifact is rebuilt from a manifest record.

Dicts exist only at the JSON edge: `from_dict` / `to_dict` convert, and keep what was read exactly
(the keys' order, keys absent, fields this version does not model), so `to_dict(from_dict(d)) == d`
and a manifest read and written again is the same bytes. Records made in code (`_keys` None) write
every field in the order the build writes them. Writing a manifest stays with the build
(edgekit/pipeline), which assembles it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgekit.backends.base import Artifact
from edgekit.errors import BadInput

MANIFEST = "manifest.json"
SCHEMA_PREFIX = "edgekit-manifest/"
# Every reader needs these of each artifact record, whatever the manifest's version.
ARTIFACT_KEYS = ("key", "backend", "precision", "entry", "files", "bytes")


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class _Record:
    """A JSON object as a dataclass. `extra` holds the keys this version does not model; `_keys` the keys
    as read, in order (None: made in code). `_nested` names the fields that hold records: (class, is_list)."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    _keys: tuple[str, ...] | None = field(default=None, kw_only=True, repr=False, compare=False)

    _what: ClassVar[str] = "record"  # in error lines
    _nested: ClassVar[dict[str, tuple[type[_Record], bool]]] = {}
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()  # made in code: left out while None

    @classmethod
    def _fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "_keys")]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> Any:
        if not isinstance(d, dict):
            raise BadInput(f"{where}: {cls._what} is {type(d).__name__}, expected a mapping")
        known = cls._fields()
        values: dict[str, Any] = {}
        for name in known:
            if name not in d:
                continue
            value, nested = d[name], cls._nested.get(name)
            if nested and value is not None:
                kind, is_list = nested
                value = [kind.from_dict(v, where) for v in value] if is_list else kind.from_dict(value, where)
            values[name] = value
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name in known and f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise BadInput(f"{where}: {cls._what} has no '{missing[0]}'")
        return cls(**values, extra={k: v for k, v in d.items() if k not in known}, _keys=tuple(d))

    def to_dict(self) -> dict[str, Any]:
        known = self._fields()
        if self._keys is None:
            order = [k for k in known if k not in self._omit_if_none or getattr(self, k) is not None]
        else:  # as read; then what was set since (dataclasses.replace keeps _keys)
            order = [*self._keys, *(k for k in known if k not in self._keys and getattr(self, k) is not None)]
        order += [k for k in self.extra if k not in order]
        out: dict[str, Any] = {}
        for k in order:
            if k not in known:
                if k in self.extra:
                    out[k] = self.extra[k]
                continue
            value = getattr(self, k)
            if isinstance(value, _Record):
                value = value.to_dict()
            elif isinstance(value, list) and k in self._nested:
                value = [v.to_dict() for v in value]
            out[k] = value
        return out


@dataclass(frozen=True)
class FileRecord(_Record):
    path: str  # relative to the package folder
    bytes: int
    sha256: str | None = None

    _what: ClassVar[str] = "an artifact's file"


@dataclass(frozen=True)
class LatencyRecord(_Record):
    """A latency as the manifest records it (profiling.timing.Latency.to_dict, or a device's, with conditions)."""

    _what: ClassVar[str] = "a latency"

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None
    min: float | None = None
    runs: int | None = None
    threads: int | None = None
    where: str | None = None  # local:HOST | ssh://... | estimate
    conditions: dict[str, Any] | None = None  # a device's power mode, clocks, temperatures

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"conditions"})


@dataclass(frozen=True)
class VerificationRecord(_Record):
    """An artifact's agreement with the FP32 reference (verify.verifier.Verification.to_dict)."""

    _what: ClassVar[str] = "an artifact's verification"

    samples: int | None = None
    cosine_min: float | None = None
    snr_db_min: float | None = None
    max_abs_error: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    diverging_layer: dict[str, Any] | None = None
    centred_cosine_min: float | None = None
    centred_snr_db_min: float | None = None
    precision: str | None = None
    slice_cosine_min: float | None = None
    slice_snr_db_min: float | None = None
    score_iou_min: float | None = None
    rank_correlation_min: float | None = None
    worst_slices: list[dict[str, Any]] = field(default_factory=list)
    worst_slice: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    task: dict[str, Any] | None = None  # the task metric that decided (tasks.base.TaskResult.to_dict)
    tensor_failures: list[str] = field(default_factory=list)
    tensor_passed: bool | None = None
    integrity_failures: list[str] = field(default_factory=list)
    where: str | None = None  # what computed the figures: "host x86_64 ...", "rknn-simulator"
    # The same check on the target's own arithmetic (an ARM board's runtime under qemu): {where, cpu, samples,
    # cosine_min, snr_db_min, task, passed, variants, ...}; None where the host computes as the target does.
    isa: dict[str, Any] | None = None


@dataclass(frozen=True)
class ArtifactRecord(_Record):
    """One artifact of the package, as manifest.json records it (docs/manifest.md)."""

    _what: ClassVar[str] = "an artifact"

    key: str
    backend: str
    precision: str
    entry: str  # relative to the package folder, inside the artifact's own folder
    files: list[FileRecord]
    bytes: int
    verification: VerificationRecord | None = None
    latency_ms: LatencyRecord | None = None  # the device's after `edgekit profile --device`
    reference_latency_ms: LatencyRecord | None = None
    speedup: float | None = None
    speedup_vs_onnxruntime_fp32: float | None = None
    peak_memory_mb: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    host_latency_ms: LatencyRecord | None = None  # this host's (or the estimate), once a device measured it
    device_latency_ms: LatencyRecord | None = None
    quantization: dict[str, Any] | None = None  # INT8: settings kept and the recovery ladder's record
    # Every device that measured it, by name ({device: latency with `target` and `measured`}), and across the
    # devices of the package's target the spread of their p50s (one SoC varies up to 2x between boards).
    device_latencies_ms: dict[str, Any] | None = None
    device_spread: dict[str, Any] | None = None

    _nested: ClassVar[dict[str, tuple[type[_Record], bool]]] = {
        "files": (FileRecord, True), "verification": (VerificationRecord, False),
        **{k: (LatencyRecord, False) for k in ("latency_ms", "reference_latency_ms", "host_latency_ms",
                                               "device_latency_ms")}}
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"host_latency_ms", "device_latency_ms", "quantization",
                                                          "device_latencies_ms", "device_spread"})

    @property
    def passed(self) -> bool:
        return bool(self.verification and self.verification.passed)

    @property
    def folder(self) -> str:
        """The artifact's own folder in the package (what a device copy sends)."""
        return str(Path(self.entry).parent)

    def with_device_latency(self, measured: LatencyRecord | dict[str, Any], device: str | None = None,
                            target: str | None = None, measured_at: str | None = None) -> ArtifactRecord:
        """This record once measured on a device (`edgekit profile --device`, the planner's --device):
        `latency_ms` becomes the device's (where: ssh://...), the host's or the estimate moves to
        `host_latency_ms`, `device_latency_ms` holds it too. Speedups stay the host's interleaved ratios.
        With the device's name, the measurement is also kept in `device_latencies_ms` beside the other devices'."""
        lat = measured if isinstance(measured, LatencyRecord) else LatencyRecord.from_dict(measured)
        previous = self.latency_ms
        host = previous if previous is not None and previous.to_dict() \
            and not str(previous.where or "").startswith("ssh://") else self.host_latency_ms
        new = dataclasses.replace(self, host_latency_ms=host, latency_ms=lat, device_latency_ms=lat)
        if device is None:
            return new
        by_device = {**(self.device_latencies_ms or {}),
                     device: {**lat.to_dict(), "target": target, "measured": measured_at}}
        return dataclasses.replace(new, device_latencies_ms=by_device)

    def with_slowest_device(self, devices: list[str]) -> ArtifactRecord:
        """`latency_ms`/`device_latency_ms` become the slowest of these devices' measurements (a pool run: the
        figure a fleet of these boards can promise); unchanged where none of them measured it."""
        rows = {d: r for d, r in (self.device_latencies_ms or {}).items() if d in devices and r.get("p50")}
        if not rows:
            return self
        slowest = rows[max(rows, key=lambda d: rows[d]["p50"])]
        lat = LatencyRecord.from_dict({k: v for k, v in slowest.items() if k not in ("target", "measured")})
        return dataclasses.replace(self, latency_ms=lat, device_latency_ms=lat)

    def with_device_spread(self, target: str) -> ArtifactRecord:
        """`device_spread` over the devices of `target` in device_latencies_ms: None below two devices (a
        spread of one board is not a spread)."""
        p50 = {d: r["p50"] for d, r in (self.device_latencies_ms or {}).items()
               if r.get("target") == target and isinstance(r.get("p50"), int | float) and r["p50"] > 0}
        if len(p50) < 2:
            return dataclasses.replace(self, device_spread=None)
        fastest, slowest = min(p50, key=p50.__getitem__), max(p50, key=p50.__getitem__)
        return dataclasses.replace(self, device_spread={
            "target": target, "devices": len(p50), "fastest": fastest, "slowest": slowest,
            "p50_min": p50[fastest], "p50_max": p50[slowest], "ratio": round(p50[slowest] / p50[fastest], 4)})

    def to_artifact(self, root: str | Path, check_sha256: bool = True) -> Artifact:
        """The Artifact a backend loads (root: the package folder; the Artifact's root is the artifact's
        folder in it). Files that are missing or (with check_sha256) differ from the manifest are refused,
        as the record's figures would describe other files. `edgekit debug` looks at edited artifacts on
        purpose: it passes False."""
        from edgekit.ingest import sha256_file

        root = Path(root)
        for f in self.files:
            p = root / f.path
            if not p.is_file():
                raise BadInput(f"{root}: {self.key} file {f.path} is missing")
            if check_sha256 and f.sha256 and sha256_file(p) != f.sha256:
                raise BadInput(f"{root}: {f.path} does not match its sha256 in {MANIFEST}")
        folder = Path(self.entry).parent
        return Artifact(self.backend, self.precision, str(root / folder),
                        [str(Path(f.path).relative_to(folder)) for f in self.files],
                        str(Path(self.entry).relative_to(folder)), dict(self.details or {}))


# ---------------------------------------------------------------- the package


@dataclass(init=False)
class Package:
    """A package folder in memory: `path`, `header` (the manifest's top level, artifacts aside: JSON
    values), `records` (one ArtifactRecord per artifact, in order) and `plan` (plan.yaml as written, when
    readable). Made from a folder's path and its manifest's JSON. `manifest` and `artifacts` are the JSON
    form, for readers of dicts; treat them as read-only."""

    path: Path
    header: dict[str, Any] = field(repr=False)
    records: list[ArtifactRecord] = field(repr=False)
    plan: dict[str, Any] | None = field(default=None, repr=False)

    def __init__(self, path: str | Path, manifest: dict[str, Any], plan: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.plan = plan
        where = str(self.path / MANIFEST)
        self.header = {k: (None if k == "artifacts" else v) for k, v in manifest.items()}  # keeps the key order
        self.records = [ArtifactRecord.from_dict(a, where) for a in manifest.get("artifacts") or []]

    @classmethod
    def from_dict(cls, manifest: dict[str, Any], path: str | Path, plan: dict[str, Any] | None = None) -> Package:
        return cls(path, manifest, plan)

    def to_dict(self) -> dict[str, Any]:
        """manifest.json's content (write it with packaging.manifest.write_json)."""
        out = {k: ([r.to_dict() for r in self.records] if k == "artifacts" else v) for k, v in self.header.items()}
        if "artifacts" not in out:
            out["artifacts"] = [r.to_dict() for r in self.records]
        return out

    @property
    def manifest(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        """{key: the artifact's record as JSON}."""
        return {r.key: r.to_dict() for r in self.records}

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]

    @property
    def passed(self) -> bool:
        return bool(self.header.get("passed"))

    def artifact(self, key: str) -> ArtifactRecord:
        for r in self.records:
            if r.key == key:
                return r
        raise BadInput(f"no artifact {key} in {self.path}; it has {', '.join(self.keys) or 'none'}")

    def with_device_latencies(self, latencies: dict[str, LatencyRecord | dict[str, Any]], device: str | None = None,
                              target: str | None = None, measured_at: str | None = None) -> Package:
        """The package with these artifacts' device measurements recorded (ArtifactRecord.with_device_latency);
        with the device's name, also kept by device, and the spread over the package target's devices updated."""
        own = str(self.header.get("target") or "")
        records = [r.with_device_latency(latencies[r.key], device, target, measured_at) if r.key in latencies else r
                   for r in self.records]
        if device is not None:
            records = [r.with_device_spread(own) if r.key in latencies else r for r in records]
        return self.with_records(records)

    def with_records(self, records: list[ArtifactRecord]) -> Package:
        """The same package with these artifact records (e.g. device latencies added), to write back."""
        new = Package(self.path, {**self.header, "artifacts": []}, self.plan)
        new.records = list(records)
        return new

    def __repr__(self) -> str:
        return f"Package({str(self.path)!r}, artifacts={self.keys})"


# ---------------------------------------------------------------- the loader


def load_package(path: str | Path, complete: bool = False) -> Package:
    """A package folder, read as untrusted input: BadInput (UnsafeInput for a path that leaves the
    package) with one line when it is not a package. complete: every field the schema requires must be
    there too (what reports and devices need); without it, only wrong types are refused, so packages of
    older edgekit versions still compare. plan.yaml is context: unreadable, it is None."""
    from edgekit.untrusted import UnsafeInput, inside, load_json, load_yaml

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BadInput(f"{path} is not an edgekit package (no {MANIFEST}): give a folder written by `edgekit build`")
    manifest = load_json(manifest_path, "manifest")
    check_manifest(manifest, str(manifest_path), complete, root=path)
    plan = None
    plan_path = inside(path, str(manifest.get("plan") or "plan.yaml"), f"{MANIFEST} plan")
    if plan_path.is_file():
        try:
            loaded = load_yaml(plan_path, "plan")
            plan = loaded if isinstance(loaded, dict) else None
        except UnsafeInput:
            raise
        except BadInput:
            plan = None  # the plan is context for the comparison, never a reason to refuse it
    return Package(path, manifest, plan)


def check_manifest(manifest: Any, where: str = MANIFEST, complete: bool = False, root: Path | None = None) -> None:
    """A manifest from anywhere (a folder: root, an archive): its shape; every path it names (UnsafeInput),
    as text and, with root, on disk (links followed); its schema. BadInput naming `where`, one line."""
    from edgekit.packaging.manifest import check_manifest_paths, check_package_files, schema_problem

    if not isinstance(manifest, dict) or not str(manifest.get("schema", "")).startswith(SCHEMA_PREFIX) \
            or not isinstance(manifest.get("artifacts"), list):
        raise BadInput(f"{where} is not an edgekit manifest (no schema {SCHEMA_PREFIX}N or artifacts list)")
    for a in manifest["artifacts"]:
        if not isinstance(a, dict) or not set(ARTIFACT_KEYS) <= set(a):
            raise BadInput(f"{where}: an artifact lacks {'/'.join(ARTIFACT_KEYS)}")
    # First: an unsafe path is refused as such, not as a schema mismatch.
    if root is not None:
        check_package_files(root, manifest)
    else:
        check_manifest_paths(manifest, where)
    # Wrong types crash every reader: always refused. Missing fields only when the reader needs them.
    problem = schema_problem(manifest, missing_too=False) or (schema_problem(manifest, missing_only=True)
                                                              if complete else None)
    if problem:
        raise BadInput(f"{where} does not match the manifest schema ({problem}): the package is damaged or "
                       "was not written by edgekit; rebuild it with `edgekit build`")


def manifest_from_bytes(data: bytes, where: str = MANIFEST) -> dict[str, Any]:
    """manifest.json's bytes (from an archive) as JSON, checked as check_manifest(complete=True) does."""
    from edgekit.untrusted import UnsafeInput

    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{where} is not valid JSON ({e})") from None
    except RecursionError:
        raise UnsafeInput(f"{where}: JSON nested too deeply") from None
    check_manifest(manifest, where, complete=True)
    return manifest  # type: ignore[no-any-return]
