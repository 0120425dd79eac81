"""A cheap per-layer INT8 error ranking: one Q/DQ model, one pass, after ONNX Runtime's qdq_loss_debug.

The model is quantized once by the reference backend's Q/DQ quantizer (ONNX Runtime's quantize_static) with the
settings the real backend is asked for (method, per-channel, 7-bit weights, nodes kept in float). The FP32 and the
Q/DQ models then run on a few batches with the tensors the ranking needs exposed as outputs, graph optimizations off
so that they exist (as qdq_loss_debug's collect_activations runs them). Per quantized node:
- what it reads and what its consumers read, against FP32 (qdq_loss_debug's "xmodel_err"), as diagnostics;
- the error it *introduces*: its output after its Q/DQ against a float copy of the node run on the very same
  (quantized) inputs, put into the Q/DQ graph beside it. Noise a node inherits, or amplifies (a classifier's last
  Gemm turns small feature noise into large logit noise), is the same in both and cancels: ranking by output SNR
  would put every late layer first, and a plain dB drop from inputs to output the first layer (it reads the exact
  input). Measured per channel, each channel against its own signal (capped at 1, a channel fully lost), then
  averaged: a few outlier channels that set a tensor's one scale hold most of its energy, and a whole-tensor figure
  hides that the other channels were rounded away.

The proxy is ONNX Runtime's quantizer whatever the backend: it ranks; real builds of the backend confirm (the
mixed-precision search). It costs one quantization and a few runs, where leave-one-out costs a build per layer.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekit import backends
from edgekit.data import Dataset
from edgekit.errors import EdgekitError
from edgekit.ingest import ModelSpec
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
from edgekit.quantize.ops import WEIGHTED_OPS

QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"  # ORT renames a graph output's producer tensor so (quant_utils)
COPY = "edgekit_float_copy/"  # the float copies' tensor and node names in the Q/DQ graph
FOLDED = ("Relu", "Clip", "LeakyRelu")  # activations a Q/DQ quantizer folds into the output's quantization range
MAX_SNR_DB = 120.0  # an exact tensor: a finite figure for JSON and sorting
TINY = 10 ** (-MAX_SNR_DB / 10)
# A node whose error is this many times its weights' alone is losing it in its output's quantization (outlier
# channels): that tensor's consumers follow it in search_order.
OUTPUT_DOMINATED = 2.0


@dataclass
class LayerError:
    """One quantized node of the Q/DQ proxy."""

    node: str
    op_type: str
    macs: int
    error: float  # noise / signal power it introduces, per channel, averaged (the rank; 0 = none, 1 = all lost)
    weight_error: float  # the same, from its weights alone (its output before its own Q/DQ)
    input_snr_db: float  # the worst activation input as the node reads it, against FP32 (diagnostic)
    output_snr_db: float  # its output as its consumers read it, against FP32 (diagnostic)
    producers: list[str] = field(default_factory=list)  # quantizable nodes whose outputs it reads
    consumers: list[str] = field(default_factory=list)  # quantizable nodes that read its output

    @property
    def introduced_db(self) -> float:
        """Its error as an SNR (lower: worse)."""
        return _db(self.error)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "introduced_db": self.introduced_db}


@dataclass
class LayerErrors:
    layers: list[LayerError]  # most error introduced first
    output_snr_db: float  # the Q/DQ proxy's model outputs against FP32 (min over outputs)
    skipped: list[str]  # nodes asked for that the Q/DQ graph gave no tensors for
    seconds: float


def qdq_layer_errors(spec: ModelSpec, calibration: Dataset, batches: list[dict[str, np.ndarray]],
                     settings: QuantizationSettings, nodes: list[str] | None = None,
                     threads: int | None = None) -> LayerErrors:
    """Per-node INT8 error of the Q/DQ proxy over `batches`, most error introduced first. `nodes`: the
    quantizable nodes to rank (default: every named weighted node not in settings.exclude_nodes)."""
    start = time.perf_counter()
    model = spec.load()
    wanted = nodes if nodes is not None else [n.name for n in model.graph.node if n.name and
                                              n.op_type in WEIGHTED_OPS and n.name not in settings.exclude_nodes]
    with tempfile.TemporaryDirectory(prefix="edgekit-qdq-error-") as tmp:
        qdq = _proxy(spec, calibration, settings, Path(tmp))
        plan, skipped = _plan(model, qdq, wanted)
        outputs: list[tuple[Tensor, Tensor]] = [(("float", o.name), ("qdq", o.name)) for o in model.graph.output]
        pairs = [p for node in plan.values() for p in node.pairs()] + outputs
        stats = _collect(model, qdq, pairs, batches, threads or min(4, os.cpu_count() or 1), Path(tmp))
    macs = {layer.name: layer.macs for layer in spec.layers}
    around = _neighbours(model, set(wanted))
    layers = []
    for name, p in plan.items():
        if not all(pair in stats for pair in p.pairs()):
            skipped.append(name)
            continue
        reads = min((_db(stats[i].nsr) for i in p.inputs), default=MAX_SNR_DB)
        producers, consumers = around.get(name, ([], []))
        layers.append(LayerError(name, p.op_type, macs.get(name, 0), stats[p.local].channel_nsr,
                                 stats[p.raw].channel_nsr, reads, _db(stats[p.output].nsr), producers, consumers))
    layers.sort(key=lambda e: (e.error, e.macs), reverse=True)
    snr = min((_db(stats[p].nsr) for p in outputs if p in stats), default=MAX_SNR_DB)
    return LayerErrors(layers, snr, skipped, time.perf_counter() - start)


def search_order(errors: LayerErrors) -> list[LayerError]:
    """The order to keep nodes in float: most error introduced first, with its neighbours. A node whose error is
    mostly its output's quantization (outlier channels) comes after the consumers of that output: NNCF and ncnn
    quantize a node's inputs, so the consumer in float is what removes that quantizer. Its producers follow it: a
    tensor's Q/DQ is shared by its producer and consumers, ONNX Runtime keeps a tensor quantized while any of them
    is, and its fused INT8 kernels read and write those tensors, so an error often leaves only with a neighbour in
    float too. The search tries the first node alone first, and grows only when a real build says so."""
    by_name = {e.node: e for e in errors.layers}
    order: dict[str, LayerError] = {}
    for e in errors.layers:
        output_dominated = e.error >= OUTPUT_DOMINATED * max(e.weight_error, TINY)
        for n in [*(e.consumers if output_dominated else []), e.node, *e.producers]:
            if n in by_name:
                order.setdefault(n, by_name[n])
    return list(order.values())


def gain_db(e: LayerError, errors: LayerErrors, cap_db: float = 60.0) -> float:
    """An estimate of the model-output SNR the node's float copy would gain, its error taken as independent
    additive noise at the output (the model's noise minus its share): leave-one-out's scale, for reports."""
    share = e.error / max(10 ** (-errors.output_snr_db / 10), TINY)
    return float(min(cap_db, -10 * math.log10(max(1 - share, 10 ** (-cap_db / 10)))))


def _proxy(spec: ModelSpec, calibration: Dataset, settings: QuantizationSettings, root: Path) -> onnx.ModelProto:
    """The reference backend's INT8 of the model with these settings: a Q/DQ ONNX graph."""
    name = backends.REFERENCE_BACKEND
    art = backends.get_installed(name).export(spec, ArtifactPlan(name, "int8", settings), calibration, root)
    qdq = onnx.load(str(art.entry_path))
    if not any(n.op_type == "QuantizeLinear" for n in qdq.graph.node):
        raise EdgekitError(f"{name} INT8 of the model has no QuantizeLinear node: no Q/DQ graph to rank layers on")
    return qdq


Tensor = tuple[str, str]  # ("float" | "qdq", tensor name)


@dataclass
class _NodePlan:
    op_type: str
    inputs: list[tuple[Tensor, Tensor]]  # (FP32, as the node reads it in the Q/DQ graph)
    output: tuple[Tensor, Tensor]  # (FP32, as its consumers read it)
    raw: tuple[Tensor, Tensor]  # (float copy, node) before the output's Q/DQ and any folded activation
    local: tuple[Tensor, Tensor]  # (float copy, node) as its consumers read it

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        return [*self.inputs, self.output, self.raw, self.local]


def _plan(model: onnx.ModelProto, qdq: onnx.ModelProto, wanted: list[str]) -> tuple[dict[str, _NodePlan], list[str]]:
    """What to compare per node, and the float copies added to `qdq` (in place) for it.

    A node keeps its name in the Q/DQ graph and reads its activation inputs at the same positions (a DQ output
    there). Its output is followed by Q -> DQ, or renamed NAME_QuantizeLinear_Input where NAME is a graph output
    the DQ now writes. A Relu/Clip after it may be folded into its quantization range: its output then comes
    straight from the node under the activation's name, and the float copy applies that activation itself."""
    inits = {i.name: i for i in model.graph.initializer}
    float_tensors = {t for n in model.graph.node for t in n.output} | {i.name for i in model.graph.input}
    fnodes = {n.name: n for n in model.graph.node if n.name}
    fconsumers = _consumers(model)
    qnodes = {n.name: n for n in qdq.graph.node if n.name}
    qconsumers = _consumers(qdq)
    copied: set[str] = set()

    def after_qdq(t: str) -> str:
        q = next((c for c in qconsumers.get(t, []) if c.op_type == "QuantizeLinear"), None)
        dq = next((c for c in qconsumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"), None) if q else None
        return dq.output[0] if dq is not None else t

    def copy(node: onnx.NodeProto, reads: list[str]) -> None:
        for t in node.input:
            if t in inits and t not in copied:  # the float weights, beside the quantized ones
                copied.add(t)
                qdq.graph.initializer.append(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(inits[t]),
                                                                          COPY + t))
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = COPY + node.name
        twin.ClearField("input")
        twin.input.extend(COPY + t if t in inits else r for t, r in zip(node.input, reads))
        twin.ClearField("output")
        twin.output.extend(COPY + t for t in node.output)
        qdq.graph.node.append(twin)

    plan: dict[str, _NodePlan] = {}
    skipped = []
    for name in wanted:
        node, q = fnodes.get(name), qnodes.get(name)
        if node is None or q is None or q.op_type != node.op_type or len(q.input) != len(node.input):
            skipped.append(name)
            continue
        produced = q.output[0]
        logical = produced.removesuffix(QUANT_INPUT_SUFFIX)
        chain = _folded_chain(node.output[0], logical, fconsumers, inits)
        if logical not in float_tensors or chain is None:
            skipped.append(name)
            continue
        copy(node, [r if f and f not in inits else "" for f, r in zip(node.input, q.input)])
        for act in chain:
            copy(act, [COPY + t if i == 0 else t for i, t in enumerate(act.input)])
        read = logical if produced != logical else after_qdq(produced)
        plan[name] = _NodePlan(node.op_type, [(("float", f), ("qdq", r)) for f, r in zip(node.input, q.input)
                                              if f and f not in inits],
                               (("float", logical), ("qdq", read)), (("qdq", COPY + node.output[0]), ("qdq", produced)),
                               (("qdq", COPY + logical), ("qdq", read)))
    return plan, skipped


def _folded_chain(start: str, end: str, consumers: dict[str, list[onnx.NodeProto]],
                  inits: dict[str, Any]) -> list[onnx.NodeProto] | None:
    """The folded activations from a node's output to the tensor the Q/DQ graph gives under its name (none when
    they are the same), or None when that is not a short chain of them with constant parameters."""
    chain: list[onnx.NodeProto] = []
    t = start
    while t != end:
        users = consumers.get(t, [])
        if len(chain) == 2 or len(users) != 1 or users[0].op_type not in FOLDED or \
                any(x and x not in inits for x in users[0].input[1:]):
            return None
        chain.append(users[0])
        t = users[0].output[0]
    return chain


@dataclass
class _Stat:
    signal: np.ndarray  # per channel: sum of squares of the reference tensor
    noise: np.ndarray  # per channel: sum of squares of the difference

    @property
    def nsr(self) -> float:
        """Noise-to-signal power of the whole tensor (qdq_loss_debug's SNR, as a ratio)."""
        return float(self.noise.sum() / max(float(self.signal.sum()), 1e-30)) or TINY

    @property
    def channel_nsr(self) -> float:
        """Noise-to-signal power per channel (at most 1: a channel fully lost), averaged over the channels that
        carry signal."""
        live = self.signal > 1e-12 * max(float(self.signal.max()), 1e-30)
        return float(np.mean(np.minimum(1.0, self.noise[live] / self.signal[live]))) if live.any() else 0.0


def _collect(model: onnx.ModelProto, qdq: onnx.ModelProto, pairs: list[tuple[Tensor, Tensor]],
             batches: list[dict[str, np.ndarray]], threads: int, tmp: Path) -> dict[tuple[Tensor, Tensor], _Stat]:
    """Run both models on every batch, accumulating per-channel signal and noise energy per pair, batch by batch
    (a detector's intermediates over many batches would not fit in memory)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # fused nodes expose no tensors
    names = {src: list(dict.fromkeys(t for pair in pairs for s, t in pair if s == src)) for src in ("float", "qdq")}
    sessions = {}
    for src, m in (("float", model), ("qdq", qdq)):
        path = tmp / f"{src}-exposed.onnx"
        onnx.save(_exposing(m, names[src]), str(path))
        sessions[src] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    stats: dict[tuple[Tensor, Tensor], _Stat] = {}
    bad: set[tuple[Tensor, Tensor]] = set()
    for feeds in batches:
        values = {(src, n): v for src, s in sessions.items() for n, v in zip(names[src], s.run(names[src], feeds))}
        for pair in pairs:
            ref, test = np.asarray(values[pair[0]], np.float64), np.asarray(values[pair[1]], np.float64)
            if pair in bad or ref.shape != test.shape:
                bad.add(pair)
                continue
            axes = tuple(i for i in range(ref.ndim) if i != 1) if ref.ndim >= 2 else None
            signal, noise = np.atleast_1d((ref * ref).sum(axis=axes)), np.atleast_1d(((ref - test) ** 2).sum(axis=axes))
            if pair in stats:
                stats[pair].signal += signal
                stats[pair].noise += noise
            else:
                stats[pair] = _Stat(signal, noise)
    return {p: s for p, s in stats.items() if p not in bad}


def _exposing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model with these (float) tensors as graph outputs too."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                            for n in names if n not in existing)
    return out


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            found.setdefault(t, []).append(n)
    return found


def _neighbours(model: onnx.ModelProto, quantizable: set[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Per quantizable node, (the quantizable nodes whose outputs it reads, those that read its output), through
    weightless ops of one data input (an activation, a reshape, a pooling): an Add or a Concat writes a tensor of
    its own, with its own Q/DQ."""
    inits = {i.name for i in model.graph.initializer}
    producer = {t: n for n in model.graph.node for t in n.output
                if sum(1 for x in n.input if x and x not in inits) == 1 or n.name in quantizable}
    consumers = {t: [n for n in ns if n.name in quantizable or sum(1 for x in n.input if x and x not in inits) == 1]
                 for t, ns in _consumers(model).items()}

    def walk(node: onnx.NodeProto, forward: bool) -> list[str]:
        found, seen, todo = [], set(), list(node.output if forward else node.input)
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in consumers.get(t, []) if forward else [producer[t]] if t in producer else []:
                if n.name in quantizable:
                    found.append(n.name)
                else:
                    todo += list(n.output if forward else n.input)
        return list(dict.fromkeys(found))

    return {n.name: (walk(n, False), walk(n, True)) for n in model.graph.node if n.name in quantizable}


def _db(nsr: float) -> float:
    return float(min(MAX_SNR_DB, -10 * math.log10(max(nsr, TINY))))
