"""Per-layer INT8 sensitivity and a mixed-precision search (the most sensitive layers kept in float).

Measured with the real backend: each variant is a real INT8 build by its own quantizer (`exclude_nodes` keeps
nodes in float), run in its runtime and compared with the FP32 ONNX Runtime reference, as verification does.

Methods (`layer_sensitivity(method=...)`):
- `leave_one_out` (default): uniform INT8 once, then for each node INT8 with only that node in float;
  the figure is the output SNR gained by keeping it in float. One build per node, all of the same
  cost, and it measures exactly what the mixed-precision search will do (remove one node's error
  from the full INT8 model, interactions included).
- `only`: for each node, INT8 with only that node quantized (everything else in float); the figure is
  the SNR lost by quantizing it alone, turned into the same "gain" scale (see `_only_gain_db`).
- `qdq_error`: no build of the backend: one Q/DQ model by ONNX Runtime's quantizer, same settings, each node's
  error introduced measured in one pass (quantize.layer_error); a proxy for any backend, real builds confirm.

Backend caveat: ONNX Runtime's Q/DQ quantizer puts a Q/DQ pair on a tensor when its producer OR any consumer is
quantized: a tensor with outlier channels between two quantized convs stays INT8 when only one is excluded, so
leave-one-out sees no gain for either; `only` sees both, and `qdq_error` lists the pair together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import backends
from edgekit.data import Dataset
from edgekit.errors import BadInput
from edgekit.home import cache_dir
from edgekit.ingest import ModelSpec
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
from edgekit.quantize.ops import WEIGHTED_OPS as QUANTIZABLE_OPS
from edgekit.verify.verifier import Thresholds, Verification, headline, run_all, verify_outputs

METHODS = ("leave_one_out", "only", "qdq_error")
REFERENCE_BACKEND = backends.REFERENCE_BACKEND  # every artifact is verified against it in FP32 (README: Verification)
CACHE_SCHEMA = "edgekit-sensitivity/1"
Judge = Callable[[list[np.ndarray], str], Verification]  # outputs on the validation batches -> the verdict


@dataclass
class LayerSensitivity:
    node: str
    op_type: str
    macs: int
    snr_db: float  # output SNR (min over outputs) of the variant where this node is the one changed
    snr_gain_db: float  # output SNR gained by keeping this node in float (estimated for method "only")
    accuracy: float | None = None  # fraction correct of that variant, when labels exist
    accuracy_gain_points: float | None = None  # accuracy gained by keeping this node in float
    cosine: float | None = None  # output cosine (min over outputs) of that variant

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sensitivities(list[LayerSensitivity]):
    """The ranked layers (most sensitive first) with what they were measured against; a list, so callers can
    treat it as `list[LayerSensitivity]`; `cached`: it came from the cache without building anything."""

    def __init__(self, layers: list[LayerSensitivity], *, method: str, backend: str, uniform: dict[str, Any],
                 skipped: list[str], key: str, cached: bool = False) -> None:
        super().__init__(layers)
        self.method = method
        self.backend = backend
        self.uniform = uniform  # uniform INT8 figures: snr_db, cosine, accuracy, reference_accuracy
        self.skipped = skipped  # quantizable nodes not measured (over max_nodes, or unnamed)
        self.key = key
        self.cached = cached

    def to_dict(self) -> dict[str, Any]:
        return {"schema": CACHE_SCHEMA, "key": self.key, "method": self.method, "backend": self.backend,
                "uniform": self.uniform, "skipped": self.skipped, "layers": [s.to_dict() for s in self]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], cached: bool) -> Sensitivities:
        return cls([LayerSensitivity(**s) for s in d["layers"]], method=d["method"], backend=d["backend"],
                   uniform=d["uniform"], skipped=d["skipped"], key=d["key"], cached=cached)


@dataclass
class MixedPrecisionStep:
    """One verified build of the search."""

    float_nodes: list[str]
    passed: bool
    cosine_min: float
    snr_db_min: float
    top1_agreement: float | None
    accuracy: float | None
    reference_accuracy: float | None
    failures: list[str] = field(default_factory=list)
    metric: str = "cosine"  # the figure that decided (edgekit.verify.verifier.headline): a task metric, or cosine
    value: float | None = None

    @classmethod
    def of(cls, float_nodes: list[str], v: Verification) -> MixedPrecisionStep:
        return cls(list(float_nodes), v.passed, v.cosine_min, v.snr_db_min, v.top1_agreement, v.accuracy,
                   v.reference_accuracy, list(v.failures), *headline(v))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rank(self) -> tuple[float, int, float]:  # the best failed step: task metric, fewest misses, then worst SNR
        return -math.inf if self.value is None else self.value, -len(self.failures), self.snr_db_min


@dataclass
class MixedPrecisionResult:
    float_nodes: list[str]  # nodes to keep in float (on top of settings.exclude_nodes given by the user)
    settings: QuantizationSettings  # the settings to build with: exclude_nodes = user's + float_nodes
    passed: bool  # the thresholds hold with these settings
    reason: str  # why the search stopped
    steps: list[MixedPrecisionStep]
    sensitivities: list[LayerSensitivity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"float_nodes": self.float_nodes, "settings": asdict(self.settings), "passed": self.passed,
                "reason": self.reason, "steps": [s.to_dict() for s in self.steps],
                "sensitivities": [s.to_dict() for s in self.sensitivities]}


# ---------------------------------------------------------------- sensitivity


def default_cache_dir() -> Path:
    return cache_dir("sensitivity")


def layer_sensitivity(
    spec: ModelSpec,
    backend_name: str,
    calibration: Dataset,
    validation: Dataset,
    settings: QuantizationSettings,
    cache_dir: str | Path | None = None,
    *,
    method: str = "leave_one_out",
    max_nodes: int = 64,
    max_batches: int = 32,
    threads: int | None = None,
    use_cache: bool = True,
    options: dict[str, Any] | None = None,
) -> Sensitivities:
    """How much INT8 matters for each quantizable node, most sensitive first (see the module doc)."""
    if method not in METHODS:
        raise BadInput(f"unknown sensitivity method '{method}'; use one of {', '.join(METHODS)}")
    if calibration is None or len(calibration) == 0:
        raise BadInput("sensitivity analysis needs calibration data for the INT8 builds")
    proxy = method == "qdq_error"  # measured on the reference backend's Q/DQ model, whichever backend asks
    measured = REFERENCE_BACKEND if proxy else backend_name
    backend = backends.get_installed(measured)
    candidates, skipped = _candidates(spec, settings, max_nodes)
    batches, labels = _validation(spec, validation, max_batches)
    key = _cache_key(spec, measured, backend, method, settings, calibration, batches, labels, candidates,
                     {} if proxy else options or {})
    cache_file = Path(cache_dir or default_cache_dir()) / f"{spec.sha256[:16]}-{measured}-{method}-{key[:24]}.json"
    if use_cache and (hit := _read_cache(cache_file, key)) is not None:
        return hit
    if proxy:
        result = _qdq_error(spec, calibration, batches, settings, candidates, skipped, key, threads)
    else:
        result = _built(spec, backend_name, calibration, batches, labels, settings, candidates, skipped, key, method,
                        threads, options)
    if use_cache:
        _write_cache(cache_file, result)
    return result


def _built(spec: ModelSpec, backend_name: str, calibration: Dataset, batches: list[dict[str, np.ndarray]],
           labels: np.ndarray | None, settings: QuantizationSettings, candidates: list[_Node], skipped: list[str],
           key: str, method: str, threads: int | None, options: dict[str, Any] | None) -> Sensitivities:
    from edgekit.console import progress  # methods leave_one_out and only: a real build of the backend per node

    runner = _Runner(spec, backend_name, calibration, batches, labels, threads, options=options)
    cap_db = 60.0  # "only": a node explaining all of the uniform noise gains at most this much
    layers: list[LayerSensitivity] = []
    with progress() as bar:
        task = bar.add_task(f"INT8 sensitivity ({method}, {backend_name})", total=len(candidates) + 1)
        uniform = runner.verify(settings)
        bar.advance(task)
        all_named = [n.name for n in spec.load().graph.node if n.name]
        for node in candidates:
            if method == "leave_one_out":
                v = runner.verify(_with_float(settings, [node.name]))
                gain = v.snr_db_min - uniform.snr_db_min
                acc_gain = _points(v.accuracy, uniform.accuracy)
            else:
                # Every other node in float (not only the weighted ones: Add, Concat, ... get Q/DQ too).
                v = runner.verify(_with_float(settings, [n for n in all_named if n != node.name]))
                gain = _only_gain_db(uniform.snr_db_min, v.snr_db_min, cap_db)
                acc_gain = _points(v.reference_accuracy, v.accuracy)
            layers.append(LayerSensitivity(node.name, node.op_type, node.macs, v.snr_db_min, gain, v.accuracy,
                                           acc_gain, v.cosine_min))
            bar.advance(task)
    # SNR gain first: it is continuous and the thresholds on SNR/cosine follow it, while accuracy over a
    # few validation batches moves in coarse steps (1/samples) and ties often; it breaks SNR ties.
    layers.sort(key=lambda s: (round(s.snr_gain_db, 2), s.accuracy_gain_points or 0.0, s.macs), reverse=True)
    return Sensitivities(layers, method=method, backend=backend_name, skipped=skipped, key=key, uniform={
        "snr_db": uniform.snr_db_min, "cosine": uniform.cosine_min, "accuracy": uniform.accuracy,
        "reference_accuracy": uniform.reference_accuracy, "passed_default_thresholds": uniform.passed,
        "validation_samples": uniform.samples})


def _qdq_error(spec: ModelSpec, calibration: Dataset, batches: list[dict[str, np.ndarray]],
               settings: QuantizationSettings, candidates: list[_Node], skipped: list[str], key: str,
               threads: int | None) -> Sensitivities:
    """Method qdq_error: the one-pass ranking in search order, on the sensitivity scale (quantize.layer_error)."""
    from edgekit.quantize.layer_error import gain_db, qdq_layer_errors, search_order

    errors = qdq_layer_errors(spec, calibration, batches, settings, [n.name for n in candidates], threads)
    layers = [LayerSensitivity(e.node, e.op_type, e.macs, errors.output_snr_db + (g := gain_db(e, errors)), g)
              for e in search_order(errors)]
    return Sensitivities(layers, method="qdq_error", backend=REFERENCE_BACKEND, skipped=skipped + errors.skipped,
                         key=key, uniform={"snr_db": errors.output_snr_db, "seconds": round(errors.seconds, 3),
                                           "validation_batches": len(batches)})


def _only_gain_db(uniform_snr: float, only_snr: float, cap_db: float) -> float:
    """The SNR a node's float copy would gain in the full INT8 model, from its error alone: each node's error as
    independent additive noise at the output, the uniform model's noise N = sum of the nodes' n_i, so keeping
    node i in float leaves N - n_i, a gain of -10 log10(1 - n_i / N): both methods on one scale."""
    share = 10 ** ((uniform_snr - only_snr) / 10)  # n_i / N
    return float(min(cap_db, -10 * math.log10(max(1 - share, 10 ** (-cap_db / 10)))))


def _points(better: float | None, worse: float | None) -> float | None:
    return None if better is None or worse is None else (better - worse) * 100


@dataclass
class _Node:
    name: str
    op_type: str
    macs: int


def _candidates(spec: ModelSpec, settings: QuantizationSettings, max_nodes: int) -> tuple[list[_Node], list[str]]:
    """Quantizable nodes, most MACs first when over max_nodes; also the ones left out. Only nodes named in the
    graph: exclude_nodes matches by name, and ingest's made-up names (OP_index) no quantizer would find."""
    named = {n.name for n in spec.load().graph.node if n.name}
    already = set(settings.exclude_nodes)
    quantizable = [_Node(c.name, c.op_type, c.macs) for c in spec.layers
                   if c.op_type in QUANTIZABLE_OPS and c.name not in already]
    usable = [n for n in quantizable if n.name in named]
    ranked = sorted(usable, key=lambda n: n.macs, reverse=True)  # stable: graph order among equals
    keep = {n.name for n in ranked[: max(0, max_nodes)]}
    chosen = [n for n in usable if n.name in keep]  # graph order: the progress bar follows the model
    return chosen, [n.name for n in quantizable if n.name not in keep]


def _validation(spec: ModelSpec, validation: Dataset, max_batches: int | None
                ) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    batches = validation.batches(spec)
    if max_batches is not None:
        batches = batches[: max(1, max_batches)]
    if not batches:
        raise BadInput(f"validation data has {len(validation)} samples, fewer than one batch of the model")
    labels = validation.batch_labels(spec)
    if labels is not None:
        labels = labels[: len(batches) * max(1, spec.inputs[0].shape[0])]
    return batches, labels


def _with_float(settings: QuantizationSettings, nodes: list[str]) -> QuantizationSettings:
    return dataclasses.replace(settings, exclude_nodes=list(dict.fromkeys([*settings.exclude_nodes, *nodes])))


class _Runner:
    """Builds an INT8 variant in a scratch folder, runs it on the validation batches, compares."""

    def __init__(self, spec: ModelSpec, backend_name: str, calibration: Dataset,
                 batches: list[dict[str, np.ndarray]], labels: np.ndarray | None, threads: int | None,
                 thresholds: Thresholds | None = None, options: dict[str, Any] | None = None,
                 judge: Judge | None = None) -> None:
        self.options = dict(options or {})  # the backend's plan options (a TensorRT target's engine settings)
        self.spec, self.backend_name, self.calibration = spec, backend_name, calibration
        self.backend = backends.get_installed(backend_name)
        self.batches, self.labels = batches, labels
        self.threads = threads or min(4, os.cpu_count() or 1)
        self.thresholds = thresholds or Thresholds()
        self.names = [o.name for o in spec.outputs]
        self.judge = judge  # the build's verdict (Verifier.judge: its reference, its task metric) on these batches
        if judge is not None:
            return
        ref_backend = backends.get_installed(REFERENCE_BACKEND)
        with _scratch() as root:
            ref = ref_backend.export(spec, ArtifactPlan(REFERENCE_BACKEND, "fp32"), None, root)
            self.reference = run_all(ref_backend.load(ref, self.threads), batches)

    def verify(self, settings: QuantizationSettings) -> Verification:
        plan = ArtifactPlan(self.backend_name, "int8", settings, options=self.options)
        with _scratch() as root:
            art = self.backend.export(self.spec, plan, self.calibration, root)
            session = self.backend.load(art, self.threads)
            outputs = run_all(session, self.batches)
            del session  # release the runtime's hold on the files before the folder goes
        if self.judge is not None:
            return self.judge(outputs, "int8")
        return verify_outputs(self.reference, outputs, self.names, self.labels, self.thresholds)


class _OutOfTime(Exception):  # the search's deadline passed before a build it needed
    pass


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edgekit-sens-") as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------- cache


def _hash_dataset(h: Any, inputs: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                  labels: np.ndarray | None) -> None:
    for feeds in inputs if isinstance(inputs, list) else [inputs]:
        for name in sorted(feeds):
            a = np.ascontiguousarray(feeds[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, np.int64).tobytes())


def _cache_key(spec: ModelSpec, backend_name: str, backend: Any, method: str, settings: QuantizationSettings,
               calibration: Dataset, batches: list[dict[str, np.ndarray]], labels: np.ndarray | None,
               candidates: list[_Node], options: dict[str, Any] | None = None) -> str:
    """Everything the figures depend on: the model, backend (and its library versions, since a new
    quantizer changes the result), method, settings, calibration and validation data, nodes measured."""
    h = hashlib.sha256()
    try:
        versions = backend.versions()
    except Exception:  # a backend that cannot say: still cached, keyed without it
        versions = {}
    h.update(json.dumps({"schema": CACHE_SCHEMA, "model": spec.sha256, "backend": backend_name,
                         "versions": versions, "method": method, "settings": asdict(settings),
                         "nodes": [n.name for n in candidates], "options": options or {}},
                        sort_keys=True, default=str).encode())
    _hash_dataset(h, calibration.inputs, calibration.labels)
    h.update(b"|validation|")
    _hash_dataset(h, batches, labels)
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> Sensitivities | None:
    try:
        d = json.loads(path.read_text())
        return Sensitivities.from_dict(d, cached=True) if d.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: measure again


def _write_cache(path: Path, result: Sensitivities) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result.to_dict(), indent=1))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only cache only costs time


# ---------------------------------------------------------------- mixed precision


def mixed_precision(
    spec: ModelSpec,
    backend_name: str,
    calibration: Dataset,
    validation: Dataset,
    thresholds: Thresholds,
    settings: QuantizationSettings,
    sensitivities: list[LayerSensitivity] | None = None,
    max_float_nodes: int | None = None,
    *,
    max_float_fraction: float | None = None,
    method: str = "leave_one_out",
    max_nodes: int = 64,
    max_batches: int | None = None,
    sensitivity_batches: int = 32,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    options: dict[str, Any] | None = None,
    judge: Judge | None = None,
    deadline: float | None = None,
    uniform_rejected: bool = False,
) -> MixedPrecisionResult:
    """The fewest most-sensitive nodes to keep in float so that INT8 meets `thresholds`.

    Verification uses all validation batches by default (`max_batches=None`), as the build does. `judge` (the
    build's Verifier.judge, on those batches): each step gets the build's verdict, task metric included.
    `max_float_fraction` caps the float nodes at that share of the measured quantizable nodes (rounded, at least
    1): past it the result would be a float model under an INT8 label. No build starts past `deadline`
    (time.monotonic()). `uniform_rejected`: the caller saw uniform INT8 with these settings fail: not rebuilt."""
    if calibration is None or len(calibration) == 0:
        raise BadInput("mixed precision needs calibration data for the INT8 builds")
    batches, labels = _validation(spec, validation, max_batches)
    runner = _Runner(spec, backend_name, calibration, batches, labels, threads, thresholds, options, judge)
    steps: list[MixedPrecisionStep] = []

    def attempt(nodes: list[str]) -> MixedPrecisionStep:
        step = MixedPrecisionStep.of(nodes, runner.verify(_with_float(settings, nodes)))
        steps.append(step)
        return step

    def result(nodes: list[str], passed: bool, reason: str) -> MixedPrecisionResult:
        return MixedPrecisionResult(list(nodes), _with_float(settings, nodes), passed, reason, steps,
                                    list(sensitivities or []))

    if not uniform_rejected and attempt([]).passed:
        return result([], True, "uniform INT8 meets the thresholds")
    if sensitivities is None:
        sensitivities = layer_sensitivity(spec, backend_name, calibration, validation, settings, cache_dir,
                                          method=method, max_nodes=max_nodes, max_batches=sensitivity_batches,
                                          threads=threads, options=options)
    ranked = [s.node for s in sensitivities if s.node not in set(settings.exclude_nodes)]
    limit = len(ranked) if max_float_nodes is None else min(len(ranked), max(0, max_float_nodes))
    capped_by = "max_float_nodes" if limit < len(ranked) else "every measured node"
    allowed = None if max_float_fraction is None else max(1, int(max_float_fraction * len(sensitivities) + 0.5))
    if allowed is not None and allowed < limit:
        limit = allowed
        capped_by = (f"at most {max_float_fraction:.0%} of the {len(sensitivities)} quantizable layers may stay "
                     "float: more would be a float model labelled INT8")
    if limit == 0:
        why = "no quantizable nodes to keep in float" if not ranked else f"the cap is 0 ({capped_by})"
        return result([], False, f"uniform INT8 misses the thresholds and {why}")

    # Prefixes of the ranked list (the k most sensitive nodes in float): grow k as 1, 2, 4, ... until a build
    # passes, then bisect: ~2*log2(k) builds where one node at a time takes k. It assumes more float nodes never
    # hurt (true but for noise); the answer is always a configuration that was itself built and verified.
    tried: dict[int, MixedPrecisionStep] = {}

    def passes(k: int) -> bool:
        if k not in tried:
            if deadline is not None and time.monotonic() > deadline:
                raise _OutOfTime
            tried[k] = attempt(ranked[:k])
        return tried[k].passed

    low, k = 0, 1  # low: largest k known to fail (0 = uniform)
    try:
        while not passes(k):
            low = k
            if k >= limit:
                best = max(tried.values(), key=MixedPrecisionStep.rank)
                return result(best.float_nodes, False, f"thresholds still missed with {k} nodes in float "
                              f"({capped_by}); best step: {', '.join(best.failures)}")
            k = min(2 * k, limit)
        high = k
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if passes(mid) else (mid, high)
    except _OutOfTime:  # the smallest passing prefix built so far, if any
        if not any(s.passed for s in tried.values()):
            return result([], False, f"time budget spent after {len(steps)} builds")
        high = min(k for k, s in tried.items() if s.passed)
    return result(ranked[:high], True, f"thresholds met with {high} node{'s' if high != 1 else ''} in float")
