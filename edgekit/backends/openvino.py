"""OpenVINO backend: IR (xml/bin) from the canonical ONNX; FP16 as compressed weights; INT8 by NNCF
post-training quantization with the user's calibration data (optionally with accuracy control)."""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.errors import BadInput, EdgekitError
from edgekit.quantize import import_nncf
from edgekit.quantize.fp16_range import fp16_unsafe_nodes
from edgekit.quantize.qdq_model import prequantized, with_float_weights

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan

DEVICE = "CPU"
NNCF_PRESETS = ("performance", "mixed")  # QuantizationSettings.preset; None: NNCF's default


class OvSession:
    def __init__(self, xml: Path, threads: int, precision_hint: str) -> None:
        import openvino as ov

        core = ov.Core()
        self.threads = threads
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                       "INFERENCE_PRECISION_HINT": precision_hint}
        self.model = core.read_model(str(xml))
        self.compiled = core.compile_model(self.model, DEVICE, self.config)
        # What OpenVINO applied (it may adjust a hint), recorded with the artifact.
        self.applied = {key: _plain(self.compiled.get_property(key))
                        for key in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT")}
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.array(result[o]) for o in self.outputs]

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        """Every named activation of the IR, exposed as an extra output, in execution order."""
        import openvino as ov

        model = self.model.clone()
        taps = [out for op in model.get_ordered_ops() if op.get_type_name() not in _NOT_ACTIVATIONS
                for out in op.outputs() if out.get_names() and out.get_element_type() in (ov.Type.f32, ov.Type.f16)]
        model.add_outputs(taps)
        compiled = ov.Core().compile_model(model, DEVICE, self.config)
        result = compiled(feeds)
        entries = []
        for port in compiled.outputs:
            names = sorted(port.get_names())
            entries.append((names, np.asarray(result[port], np.float32)))
        rank = {name: i for i, out in enumerate(taps) for name in out.get_names()}
        return sorted(entries, key=lambda e: min(rank.get(n, 1 << 30) for n in e[0]))


def _plain(value: Any) -> str | int:
    """A compiled-model property as JSON: ints stay, ov.Type as its short name (f32), the rest as text."""
    if isinstance(value, int):
        return value
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


# Ops whose outputs are weights, shapes or re-encodings, not activations to compare.
_NOT_ACTIVATIONS = {"Parameter", "Constant", "Result", "Convert", "ShapeOf", "FakeQuantize"}


@register
class OpenVinoBackend(Backend):
    name = "openvino"
    precisions = ("fp32", "fp16", "int8")
    requires = ("openvino", "nncf")
    install_hint = "pip install 'edgekit[openvino]'"
    accuracy_control = True  # nncf.quantize_with_accuracy_control
    calibration_methods = ("minmax",)  # nncf.quantize has its own range estimators, not ONNX Runtime's methods
    int8_reduce_range = True  # NNCF overflow_fix, for x86 without VNNI
    takes_qdq_onnx = True  # the ONNX frontend reads Q/DQ pairs as FakeQuantize
    runtime_distributions = ("openvino",)
    report_color = "#CC79A7"
    device_modules = ("openvino", "numpy")

    def versions(self) -> dict[str, str]:
        return {d: metadata.version(d) for d in ("openvino", "nncf")}

    def default_options(self) -> dict[str, Any]:
        """NNCF's settings, carried in the plan's quantization settings (preset, fast_bias_correction)."""
        return {"preset": None, "fast_bias_correction": True}

    def check_plan(self, plan: ArtifactPlan, where: str) -> None:
        q = plan.quantization
        if q is not None and q.preset not in (None, *NNCF_PRESETS):
            raise BadInput(f"{where}.quantization.preset is {q.preset!r}; use one of {', '.join(NNCF_PRESETS)} or null")

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        """Ops the ONNX frontend cannot convert stay FrameworkNodes in a partial conversion."""
        import tempfile

        from openvino.frontend import FrontEndManager

        fe = FrontEndManager().load_by_framework("onnx")
        by_output = {out: n for n in model.graph.node for out in n.output}
        issues = []
        # The frontend maps the file lazily: read everything before the temporary file goes away.
        with tempfile.TemporaryDirectory(prefix="edgekit-ov-check-") as tmp:
            path = Path(tmp) / "m.onnx"
            onnx.save(model, str(path))
            # Keep the input and the model referenced while their nodes are read (nodes do not own them).
            input_model = fe.load(str(path))
            partial = fe.convert_partially(input_model)
            ops = partial.get_ordered_ops()
            found = [(op.get_attributes().get("ONNX_META_type", op.get_type_name()), op.get_friendly_name())
                     for op in ops if "FrameworkNode" in op.get_type_name()]
            del ops, partial, input_model
            gc.collect()  # no OpenVINO object may outlive the file it maps
        for op_type, friendly in found:
            node = by_output.get(friendly)
            issues.append(OpIssue(self.name, op_type, node.name if node else friendly,
                                  "no OpenVINO ONNX frontend conversion"))
        return issues

    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path) -> Artifact:
        import openvino as ov

        model = ov.convert_model(spec.onnx_path)
        details: dict[str, Any] = {"converter": "openvino.convert_model", "device": DEVICE}
        notes: list[str] = []
        compress = False
        kept_constants: dict[str, np.ndarray] = {}
        if plan.precision == "fp16":
            keep, notes, kept_constants = self._keep_fp32(spec, plan, model)
            details["keep_fp32"] = keep
            compress = True
        elif plan.precision == "int8" and plan.quantization is not None and plan.quantization.qdq_model:
            src, quantizer = prequantized(plan.quantization.qdq_model)  # QAT's Q/DQ -> FakeQuantize; no NNCF here
            model, details["quantizer"] = ov.convert_model(with_float_weights(src)), quantizer
        elif plan.precision == "int8":
            if calibration is None or len(calibration) == 0:
                raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
            model, qdetails = self._int8(spec, plan, calibration, model)
            details.update(qdetails)
            if qdetails.get("fused_head_nodes"):
                fused = qdetails["fused_head_nodes"]
                notes.append(f"{len(fused)} detector head node(s) have no op of their own in the IR (OpenVINO "
                             f"fused them into a neighbour): {', '.join(fused)}")
        elif plan.precision != "fp32":
            raise BadInput(f"{self.name} cannot build precision {plan.precision}")
        # FP32 and INT8 artifacts compute in f32 where not quantized (no silent bf16 on AMX/AVX512_BF16 CPUs).
        details["inference_precision_hint"] = "f32"
        # INFERENCE_NUM_THREADS is the build's thread count, filled in when the artifact is loaded.
        details["runtime_config"] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        details["weights"] = "fp16 (compressed)" if compress else "fp32"
        ov.save_model(model, str(root / "model.xml"), compress_to_fp16=compress)
        if kept_constants:
            _restore_fp32(root / "model.xml", kept_constants)
        return Artifact(self.name, plan.precision, str(root), ["model.xml", "model.bin"], "model.xml", details, notes)

    def load(self, artifact: Artifact, threads: int) -> OvSession:
        session = OvSession(artifact.entry_path, threads, artifact.details.get("inference_precision_hint", "f32"))
        # Verification loads it with the build's threads before the manifest is written: that is recorded.
        artifact.details["runtime_config"] = session.applied
        return session

    # ------------------------------------------------------------ precisions

    @staticmethod
    def _keep_fp32(spec: ModelSpec, plan: ArtifactPlan, model: Any) -> tuple[list[str], list[str], dict[str, Any]]:
        """The weight constants of layers outside the FP16 range (and of those a plan names) that must stay
        FP32: {friendly name: FP32 values}, put back after compression (_restore_fp32)."""

        onnx_model = spec.load()
        risks = fp16_unsafe_nodes(onnx_model)
        named = set(plan.keep_fp32)
        unknown = sorted(named - {n.name for n in onnx_model.graph.node})
        if unknown:  # else silently compressed while recorded as kept
            raise BadInput(f"openvino: no node named {', '.join(map(repr, unknown))} in the model to keep in FP32 "
                           "(names as `edgekit inspect` lists them)")
        nodes = {n.name: n for n in onnx_model.graph.node}
        wanted = [r.node for r in risks] + sorted(named)
        mapping = map_weighted_nodes(onnx_model, model, [n for n in dict.fromkeys(wanted) if n in nodes])
        found: dict[str, np.ndarray] = {}
        missing = []
        for node in dict.fromkeys(wanted):
            hit = mapping.get(node)
            if hit is None or hit.weight is None:
                missing.append(node)
                continue
            found[hit.weight.get_friendly_name()] = np.array(hit.weight.get_data(), dtype=np.float32)
        if missing:
            raise EdgekitError(f"openvino: no weight constant in the converted IR for node(s) {', '.join(missing)} "
                               "(matched by name, output tensor and weights, BatchNorm/scale folding allowed), so they "
                               "cannot be kept in FP32")
        keep = sorted({r.node for r in risks} | named)
        return keep, [f"{r.node} ({r.op_type}) kept in FP32: {r.reason}" for r in risks], found

    def _int8(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset, model: Any) -> tuple[Any, dict]:
        nncf = import_nncf()

        q = plan.quantization
        assert q is not None, "an int8 artifact plan carries quantization settings"
        batches = calibration.batches(spec)
        dataset = nncf.Dataset(batches)
        kwargs: dict[str, Any] = {
            "subset_size": min(q.samples, len(batches)),
            "fast_bias_correction": q.fast_bias_correction,
            "target_device": nncf.TargetDevice.CPU,
        }
        if q.preset:
            kwargs["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                                "mixed": nncf.QuantizationPreset.MIXED}[q.preset]
        if q.reduce_range:
            # 7-bit weights in every layer: u8*s8 products saturate on x86 without VNNI; NNCF's default
            # fixes the first layer only (measured on AVX2 DefectNet: cosine 0.9895 -> 0.9926).
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

            kwargs["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
        if q.model_type == "transformer":
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        # Head nodes the plan found itself (a detector's head): one OpenVINO fused away is dropped, noted.
        automatic = set(plan.options.get("detector_head_nodes") or [])
        ignored_ops, fused = _ignored_ops(spec, model, q.exclude_nodes, automatic) if q.exclude_nodes else ([], [])
        if ignored_ops:
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored_ops)  # validated: NNCF must find each
        method = "nncf.quantize"
        try:
            if q.accuracy_control:
                model = self._with_accuracy_control(spec, calibration, model, dataset, kwargs, plan)
                method = "nncf.quantize_with_accuracy_control"
            else:
                model = nncf.quantize(model, dataset, **kwargs)
        except EdgekitError:
            raise
        except Exception as e:
            raise EdgekitError(f"{method} failed: {type(e).__name__}: {e}") from None
        return model, {
            "quantizer": method,
            "calibration_samples": kwargs["subset_size"] * max(1, spec.inputs[0].shape[0]),
            "preset": q.preset or "nncf default",
            "overflow_fix": "enable (all layers)" if q.reduce_range else "nncf default (first layer)",
            "fast_bias_correction": q.fast_bias_correction,
            "model_type": q.model_type,
            "excluded_nodes": list(q.exclude_nodes),
            "ignored_ops": ignored_ops,
            **({"fused_head_nodes": fused} if fused else {}),
        }

    @staticmethod
    def _with_accuracy_control(spec: ModelSpec, calibration: Dataset, model: Any, dataset: Any,
                               kwargs: dict[str, Any], plan: ArtifactPlan) -> Any:
        """NNCF's own accuracy-aware loop, validated on the calibration samples (never on the held-out validation
        set that decides acceptance), in points: by the task metric where the plan carries one
        (options["accuracy_control_metric"]: a callable of the outputs over all calibration batches, concatenated;
        the recovery ladder sets it for its own build), else by the labels' accuracy. With a task metric (a
        detector's mAP has no per-sample value) NNCF ranks the layers to revert by output differences; with labels
        by per-sample hits. options: max_accuracy_drop (points, default 1), accuracy_control_iterations (NNCF's
        max_num_iterations: at most that many layers reverted to float)."""
        nncf = import_nncf()
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        batches = calibration.batches(spec)
        metric = plan.options.get("accuracy_control_metric")
        if metric is not None:
            validation = dataset

            def validate(compiled: Any, data: Any) -> tuple[float | None, list[list[np.ndarray]]]:
                outs = [[np.array(r[o]) for o in compiled.outputs] for r in (compiled(x) for x in data)]
                if len(outs) != len(batches):  # NNCF probing with one item: the metric is over the whole set
                    return None, outs
                return float(metric([np.concatenate([np.asarray(b[i], np.float64) for b in outs])
                                     for i in range(len(outs[0]))])), outs
        else:
            labels = calibration.batch_labels(spec)
            if labels is None:
                raise BadInput("accuracy control needs labelled calibration data (class sub-folders or npz 'labels') "
                               "or a task metric (--task)")
            validation = nncf.Dataset(list(zip(batches, labels.reshape(len(batches), -1))), lambda item: item[0])

            def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
                hits = [100.0 * float(np.argmax(np.array(compiled(x)[0]).reshape(-1)) == y[0]) for x, y in data]
                return float(np.mean(hits)), hits

        args = dict(kwargs)
        if "advanced_parameters" in args:  # nncf.quantize's name; the accuracy-controlled one calls it so
            args["advanced_quantization_parameters"] = args.pop("advanced_parameters")
        if plan.options.get("accuracy_control_iterations"):
            args["advanced_accuracy_restorer_parameters"] = AdvancedAccuracyRestorerParameters(
                max_num_iterations=int(plan.options["accuracy_control_iterations"]))
        return nncf.quantize_with_accuracy_control(
            model, dataset, validation, validate, max_drop=float(plan.options.get("max_accuracy_drop", 1.0)),
            drop_type=nncf.DropType.ABSOLUTE, **args)


def _ignored_ops(spec: ModelSpec, model: Any, nodes: list[str], automatic: set[str] | None = None
                 ) -> tuple[list[str], list[str]]:
    """The IR ops that NNCF must leave in float for these ONNX nodes, each node checked to have some: a
    misspelled name would otherwise be quantized and still recorded as excluded. OpenVINO names an op
    after its ONNX node (a biased Conv: "NODE/WithoutBiases" + an Add "NODE"), except an op producing a
    model output, which takes the output's name: ops are matched by name and by output tensor.
    Nodes in `automatic` (found by edgekit, not named by the user) that no IR op matches (OpenVINO fused
    them into a neighbour: a Reshape, a Split) are dropped instead, and returned second."""
    automatic = automatic or set()
    by_name = {n.name: n for n in spec.load().graph.node}
    unknown = [n for n in nodes if n not in by_name]
    if unknown:
        raise BadInput(f"openvino: no node named {', '.join(map(repr, unknown))} in the model to keep in float "
                       "(names as `edgekit inspect` lists them)")
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Constant", "Result")]
    found: dict[str, list[str]] = {}
    for node in dict.fromkeys(nodes):
        pattern, outputs = re.compile(re.escape(node) + "($|/.*)"), set(by_name[node].output)
        found[node] = [op.get_friendly_name() for op in ops if pattern.match(op.get_friendly_name())
                       or any(outputs & out.get_names() for out in op.outputs())]
    # Converters' names (paddle2onnx's p2o.Conv.61) do not survive OpenVINO's fusions (a Conv with the
    # Mul/Add of a BatchNorm after it becomes one Convolution named Multiply_123): weighted nodes are
    # matched by their weights instead, and keep the bias Add fused after them.
    unnamed = [n for n, hits in found.items() if not hits]
    if unnamed:
        for node, hit in map_weighted_nodes(spec.load(), model, unnamed).items():
            found[node] = hit.ops
    missing = [n for n, hits in found.items() if not hits and n not in automatic]
    if missing:
        raise EdgekitError(f"openvino: node(s) {', '.join(missing)} have no op in the converted IR (matched by "
                           "name, output tensor and weights: OpenVINO fused them away), so they cannot be kept in "
                           "float")
    fused = [n for n, hits in found.items() if not hits]
    return list(dict.fromkeys(op for hits in found.values() for op in hits)), fused


WEIGHTED_ONNX = {"Conv": "conv", "ConvTranspose": "deconv", "Gemm": "matmul", "MatMul": "matmul"}
WEIGHTED_IR = {"Convolution": "conv", "GroupConvolution": "conv", "ConvolutionBackpropData": "deconv",
               "GroupConvolutionBackpropData": "deconv", "MatMul": "matmul"}
_PASS_THROUGH = {"Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}  # between a weight and its op
PROPORTIONAL = 0.9999  # |cosine| of every output channel's weights: the same filter, rescaled by a folded BN


@dataclass
class IrMatch:
    """The IR ops an ONNX node became: the weighted op and a bias Add fused after it; its weight constant."""

    ops: list[str]
    weight: Any  # openvino Constant node, or None
    by: str  # "weights": by values (BatchNorm/scale folding allowed); "shape": the only op of its kind and size


def map_weighted_nodes(onnx_model: onnx.ModelProto, model: Any, nodes: list[str]) -> dict[str, IrMatch]:
    """ONNX weighted nodes (Conv, ConvTranspose, Gemm, MatMul with a constant weight) -> the IR op each
    became, whatever OpenVINO named it: same kind, same number of weights, and every output channel's
    weights proportional (OpenVINO folds a following BatchNorm or channel scale into the filter). Several
    candidates: the first in graph order. A node with no weight, or none that matches, is left out."""
    inits = {i.name: i for i in onnx_model.graph.initializer}
    by_name = {n.name: n for n in onnx_model.graph.node}
    candidates = []
    for op in model.get_ordered_ops():
        kind = WEIGHTED_IR.get(op.get_type_name())
        const = _weight_constant(op) if kind else None
        if const is not None:
            candidates.append((kind, op, const, int(np.prod(const.get_output_shape(0)))))
    taken: set[str] = set()
    out: dict[str, IrMatch] = {}
    for name in nodes:
        node = by_name.get(name)
        kind = WEIGHTED_ONNX.get(node.op_type) if node is not None else None
        weight = next((inits[i] for i in node.input[1:2] or node.input[:1] if i in inits), None) if kind else None
        if weight is None and node is not None and node.op_type == "MatMul":
            weight = next((inits[i] for i in node.input if i in inits), None)
        if weight is None:
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        same = [(op, const) for k, op, const, size in candidates if k == kind and size == w.size]
        hit = next(((op, const) for op, const in same if op.get_friendly_name() not in taken
                    and _proportional(w, np.array(const.get_data(), dtype=np.float32), kind)), None)
        by = "weights"
        if hit is None and len(same) == 1 and same[0][0].get_friendly_name() not in taken:
            hit, by = same[0], "shape"  # transformed beyond a rescale, but the only op of its kind and size
        if hit is not None:
            taken.add(hit[0].get_friendly_name())
            out[name] = IrMatch([hit[0].get_friendly_name(), *_bias_add(hit[0])], hit[1], by)
    return out


def _weight_constant(op: Any) -> Any:
    """The Constant a weighted op's weights come from (through Convert/Reshape/Transpose), or None."""
    for i in ((1, 0) if op.get_type_name() == "MatMul" else (1,)):
        if i >= op.get_input_size():
            continue
        src = op.input_value(i).get_node()
        while src.get_type_name() in _PASS_THROUGH and src.get_input_size():
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant":
            return src
    return None


def _bias_add(op: Any) -> list[str]:
    """The Add right after a weighted op that adds a constant (its bias, or a folded BatchNorm's shift)."""
    users = [t.get_node() for t in op.output(0).get_target_inputs()]
    if len(users) != 1 or users[0].get_type_name() != "Add":
        return []
    add = users[0]
    others = [add.input_value(i).get_node() for i in range(add.get_input_size())]
    return [add.get_friendly_name()] if any(o.get_type_name() in ("Constant", "Convert") for o in others) else []


def _proportional(onnx_w: np.ndarray, ir_w: np.ndarray, kind: str) -> bool:
    """The same weights up to one scale per output channel (a folded BatchNorm or channel scale). Group
    convolutions' [G, O/G, I/G, k...] hold ONNX's [O, I/G, k...] in the same memory order, so a reshape
    lines them up; a MatMul's weights may be stored transposed."""
    if kind == "matmul":
        a = onnx_w.reshape(onnx_w.shape[0], -1) if onnx_w.ndim > 1 else onnx_w.reshape(1, -1)
        layouts = [ir_w.reshape(a.shape), ir_w.reshape(a.T.shape).T]
        return any(_rows_proportional(a, b) or _rows_proportional(a.T, b.T) for b in layouts)
    b = ir_w.reshape(onnx_w.shape)
    out_axis = 0 if kind == "conv" else 1  # ConvTranspose: [I, O/G, k...]
    a, b = np.moveaxis(onnx_w, out_axis, 0), np.moveaxis(b, out_axis, 0)
    return _rows_proportional(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _rows_proportional(a: np.ndarray, b: np.ndarray) -> bool:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    zero = (na == 0) | (nb == 0)
    if np.any((na == 0) != (nb == 0)):
        return False
    cos = np.abs((a * b).sum(axis=1)[~zero] / (na[~zero] * nb[~zero]))
    return bool(cos.size == 0 or cos.min() >= PROPORTIONAL)


def _restore_fp32(xml: Path, constants: dict[str, np.ndarray]) -> None:
    """Put FP32 weights back where compression made them FP16 (constant -> Convert). The rt_info mark
    (DisableFP16Compression) cannot be set from Python: a string key is ignored on save, so a node a
    plan keeps in FP32 was compressed anyway. Out-of-range constants OpenVINO already leaves FP32."""
    import openvino as ov
    from openvino import opset13 as ops

    model = ov.Core().read_model(str(xml))
    todo = dict(constants)
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f16:
            continue
        half = np.array(op.get_data(), dtype=np.float32)
        same = [n for n, w in todo.items() if w.shape == half.shape]
        # OpenVINO names it NAME_compressed; else by value, as compression rounded it.
        name = next((n for n in same if op.get_friendly_name() == f"{n}_compressed"), None) or next(
            (n for n in same if np.array_equal(todo[n].astype(np.float16).astype(np.float32), half)), None)
        if name is None:
            continue
        full = ops.constant(todo.pop(name))
        full.set_friendly_name(name)
        for convert in [t.get_node() for t in op.output(0).get_target_inputs()]:
            for target in list(convert.output(0).get_target_inputs()):
                target.replace_source_output(full.output(0))
    if len(todo) < len(constants):  # something was compressed: write the patched IR in place
        tmp = xml.with_name("restored.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        del model
        tmp.replace(xml)
        tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
