"""OpenVINO backend: IR (xml/bin) from the canonical ONNX; FP16 as compressed weights; INT8 by NNCF
post-training quantization with the user's calibration data (optionally with accuracy control)."""

from __future__ import annotations

import gc
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.compress.fp16_range import fp16_unsafe_nodes, same_weights
from edgekit.errors import BadInput, EdgekitError

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.plans import ArtifactPlan

DEVICE = "CPU"


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
    int8_reduce_range = True  # NNCF overflow_fix, for x86 without VNNI

    def versions(self) -> dict[str, str]:
        return {d: metadata.version(d) for d in ("openvino", "nncf")}

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
        elif plan.precision == "int8":
            if calibration is None or len(calibration) == 0:
                raise BadInput("INT8 needs calibration data: pass --calib DIR|FILE.npz")
            model, qdetails = self._int8(spec, plan, calibration, model)
            details.update(qdetails)
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
        import openvino as ov

        onnx_model = spec.load()
        risks = fp16_unsafe_nodes(onnx_model)
        named = set(plan.keep_fp32)
        unknown = sorted(named - {n.name for n in onnx_model.graph.node})
        if unknown:  # else silently compressed while recorded as kept
            raise BadInput(f"openvino: no node named {', '.join(map(repr, unknown))} in the model to keep in FP32 "
                           "(names as `edgekit inspect` lists them)")
        names = {r.weight for r in risks} | {i for n in onnx_model.graph.node if n.name in named for i in n.input[1:2]}
        wanted = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer if i.name in names}
        found: dict[str, np.ndarray] = {}
        for op in model.get_ordered_ops():
            if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f32:
                continue
            # By name where OpenVINO kept it, else by value (constants get renamed and shared).
            hit = op.get_friendly_name() if op.get_friendly_name() in wanted else next(
                (n for n, w in wanted.items() if same_weights(op.get_data(), w)), None)
            if hit:
                found[hit] = np.array(op.get_data(), dtype=np.float32)
        missing = set(wanted) - set(found)
        if missing:
            raise EdgekitError(f"openvino: cannot find weight constant(s) {', '.join(sorted(missing))} to keep in FP32")
        keep = sorted({r.node for r in risks} | named)
        return keep, [f"{r.node} ({r.op_type}) kept in FP32: {r.reason}" for r in risks], found

    def _int8(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset, model: Any) -> tuple[Any, dict]:
        import nncf

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
        ignored_ops = _ignored_ops(spec, model, q.exclude_nodes) if q.exclude_nodes else []
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
        }

    @staticmethod
    def _with_accuracy_control(spec: ModelSpec, calibration: Dataset, model: Any, dataset: Any,
                               kwargs: dict[str, Any], plan: ArtifactPlan) -> Any:
        """NNCF's own accuracy-aware loop, validated on the labelled calibration samples (never on the
        held-out validation set that decides acceptance)."""
        import nncf

        labels = calibration.batch_labels(spec)
        if labels is None:
            raise BadInput("accuracy control needs labelled calibration data (class sub-folders or npz 'labels')")
        batches = calibration.batches(spec)
        items = list(zip(batches, labels.reshape(len(batches), -1)))

        def validate(compiled: Any, data: Any) -> float:
            hits = [int(np.argmax(np.array(compiled(x)[0]).reshape(-1)) == y[0]) for x, y in data]
            return float(np.mean(hits))

        max_drop = float(plan.options.get("max_accuracy_drop", 1.0)) / 100
        return nncf.quantize_with_accuracy_control(
            model, dataset, nncf.Dataset(items, lambda item: item[0]), validate, max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE, **{k: v for k, v in kwargs.items() if k != "fast_bias_correction"})


def _ignored_ops(spec: ModelSpec, model: Any, nodes: list[str]) -> list[str]:
    """The IR ops that NNCF must leave in float for these ONNX nodes, each node checked to have some: a
    misspelled name would otherwise be quantized and still recorded as excluded. OpenVINO names an op
    after its ONNX node (a biased Conv: "NODE/WithoutBiases" + an Add "NODE"), except an op producing a
    model output, which takes the output's name: ops are matched by name and by output tensor."""
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
    missing = [n for n, hits in found.items() if not hits]
    if missing:
        raise EdgekitError(f"openvino: node(s) {', '.join(missing)} have no op in the converted IR "
                           "(OpenVINO fused them away), so they cannot be kept in float")
    return [op for hits in found.values() for op in hits]


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
