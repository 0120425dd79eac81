"""Ingest: any ONNX (opset >= 11) or a PyTorch factory -> one canonical ONNX and its ModelSpec.

Canonical means: a modern opset (so per-channel Q/DQ is legal), every input dimension fixed,
shapes inferred for every tensor, and the graph simplified by onnxslim. Every later stage reads
the canonical file, never the user's original.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

from edgekit.errors import BadInput, EdgekitError

CANONICAL_OPSET = 17
MIN_OPSET = 11
log = logging.getLogger(__name__)


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str  # numpy dtype name, e.g. "float32"


@dataclass
class LayerCost:
    """One node's size: what the cost model and `inspect` need."""

    name: str
    op_type: str
    macs: int
    params: int
    output_shape: list[int]


@dataclass
class ModelSpec:
    """The canonical model and what is known about it."""

    source: str  # user's path, or "package.module:factory"
    source_sha256: str
    source_bytes: int
    onnx_path: str  # the canonical ONNX file
    sha256: str  # of the canonical ONNX file
    opset: int
    source_opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    params: int
    macs: int
    layers: list[LayerCost] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what ingest changed, for the report
    torch_factory: str | None = None
    torch_weights: str | None = None

    def to_dict(self, layers: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not layers:
            d.pop("layers")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
        d["layers"] = [LayerCost(**c) for c in d.get("layers", [])]
        return cls(**d)

    def load(self) -> onnx.ModelProto:
        return onnx.load(self.onnx_path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_input_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """`NAME=1,3,640,640` (several allowed) -> {NAME: [1, 3, 640, 640]}."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            values = [int(v) for v in dims.replace("x", ",").split(",") if v.strip()]
            if not values or any(v <= 0 for v in values):
                raise ValueError
        except ValueError:
            raise BadInput(f"--input-shape '{item}' is not NAME=D0,D1,...; e.g. images=1,3,640,640") from None
        shapes[name] = values
    return shapes


def ingest(
    source: str,
    workdir: str | Path,
    input_shapes: dict[str, list[int]] | None = None,
    weights: str | None = None,
    simplify: bool = True,
) -> ModelSpec:
    """Bring a user's model into canonical form, written as workdir/model.onnx."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    input_shapes = dict(input_shapes or {})
    notes: list[str] = []
    path = Path(source)
    torch_factory = None
    if path.is_file():
        model = _load_onnx(path)
        src_sha, src_bytes = sha256_file(path), path.stat().st_size
    elif _looks_like_factory(source):
        torch_factory = source
        model = _export_torch(source, weights, input_shapes, workdir / "exported.onnx")
        notes.append(f"exported from PyTorch {source} (weights {weights or 'none'}) to ONNX")
        src_sha = sha256_file(weights) if weights else hashlib.sha256(source.encode()).hexdigest()
        src_bytes = Path(weights).stat().st_size if weights else 0
    else:
        raise BadInput(f"model file not found: {source} (give an .onnx file or package.module:factory)")

    source_opset = _default_opset(model)
    if source_opset < MIN_OPSET:
        raise BadInput(f"{source}: opset {source_opset} is older than {MIN_OPSET}; re-export with opset >= 11")
    if source_opset < CANONICAL_OPSET:
        model = _upgrade_opset(model, source, source_opset)
        notes.append(f"upgraded opset {source_opset} -> {CANONICAL_OPSET} (per-channel Q/DQ needs >= 13)")

    notes += _fix_input_shapes(model, input_shapes, source)
    model = _infer_shapes(model, source)
    if simplify:
        model, slim_note = _simplify(model)
        notes.append(slim_note)
        model = _infer_shapes(model, source)
    _require_static_outputs(model, source)

    out = workdir / "model.onnx"
    onnx.save(model, str(out))
    layers = layer_costs(model)
    op_counts: dict[str, int] = {}
    for node in model.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    return ModelSpec(
        source=source,
        source_sha256=src_sha,
        source_bytes=src_bytes,
        onnx_path=str(out),
        sha256=sha256_file(out),
        opset=_default_opset(model),
        source_opset=source_opset,
        inputs=graph_inputs(model),
        outputs=[_tensor_spec(v) for v in model.graph.output],
        params=count_params(model),
        macs=sum(c.macs for c in layers),
        layers=layers,
        op_counts=op_counts,
        notes=notes,
        torch_factory=torch_factory,
        torch_weights=weights,
    )


# ---------------------------------------------------------------- loading


def _load_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises several types for a damaged file
        raise BadInput(
            f"{path} is not a readable ONNX model ({type(e).__name__}); the file may be truncated or "
            "corrupt: re-export or re-download it"
        ) from None
    if not model.graph.node:
        raise BadInput(f"{path} holds no graph nodes; it is not a usable ONNX model: re-export it")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise BadInput(f"{path} fails the ONNX checker: {first}") from None
    return model


def _looks_like_factory(source: str) -> bool:
    module, sep, attr = source.partition(":")
    return bool(sep and module and attr and not source.endswith(".onnx"))


def load_torch_module(factory: str, weights: str | None) -> Any:
    """The user's module from `package.module:factory`, with a state_dict loaded safely."""
    try:
        import torch
    except ImportError:
        raise BadInput("a PyTorch model needs torch: pip install 'edgekit[torch]'") from None
    module_name, _, attr = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise BadInput(f"cannot import {factory}: {e}") from None
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"{factory} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise BadInput(f"weights file not found: {weights}")
        try:
            # weights_only: never unpickle arbitrary objects from a user-supplied file.
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"{weights} is not a loadable state_dict ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise BadInput(f"{weights} does not fit {factory}: {first}") from None
    return model


def _export_torch(
    factory: str, weights: str | None, input_shapes: dict[str, list[int]], out: Path
) -> onnx.ModelProto:
    if not input_shapes:
        raise BadInput(f"a PyTorch model needs its input shape: --input-shape input=1,3,224,224 ({factory})")
    model = load_torch_module(factory, weights)
    import torch

    model.eval()
    args = tuple(torch.zeros(*shape) for shape in input_shapes.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_out = _count_outputs(model(*args))
        names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        torch.onnx.export(
            model, args, str(out), dynamo=False, opset_version=CANONICAL_OPSET,
            input_names=list(input_shapes), output_names=names, do_constant_folding=True,
        )
    return onnx.load(str(out))


def _count_outputs(result: Any) -> int:
    return len(result) if isinstance(result, (tuple, list)) else 1


# ---------------------------------------------------------------- canonicalisation


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _upgrade_opset(model: onnx.ModelProto, source: str, opset: int) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(model, CANONICAL_OPSET)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200]
        raise BadInput(
            f"{source}: cannot upgrade opset {opset} to {CANONICAL_OPSET} ({first}); "
            f"re-export the model with opset >= {CANONICAL_OPSET}"
        ) from None


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    inits = {i.name for i in model.graph.initializer}
    return [_tensor_spec(v) for v in model.graph.input if v.name not in inits]


def _tensor_spec(v: onnx.ValueInfoProto) -> TensorSpec:
    t = v.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name if t.elem_type else "float32"
    return TensorSpec(v.name, shape, dtype)


def _fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]], source: str) -> list[str]:
    notes = []
    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    unknown = set(shapes) - {v.name for v in inputs}
    if unknown:
        names = ", ".join(v.name for v in inputs)
        raise BadInput(f"--input-shape names {', '.join(sorted(unknown))}, not an input of the model ({names})")
    for v in inputs:
        dims = v.type.tensor_type.shape.dim
        if v.name in shapes:
            want = shapes[v.name]
            if len(want) != len(dims):
                raise BadInput(f"--input-shape {v.name} has {len(want)} dims but the model input has {len(dims)}")
            for d, w in zip(dims, want):
                if d.HasField("dim_value") and d.dim_value not in (0, w):
                    raise BadInput(f"--input-shape {v.name}={want} conflicts with the model's fixed {_dims(dims)}")
                d.Clear()
                d.dim_value = w
            notes.append(f"input {v.name} fixed to {want}")
            continue
        free = [i for i, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
        if free == [0] and len(dims) > 1:
            dims[0].Clear()
            dims[0].dim_value = 1  # a dynamic batch is the common case: default it to 1
            notes.append(f"input {v.name}: dynamic batch set to 1")
        elif free:
            raise BadInput(
                f"input '{v.name}' has dynamic dimensions {_dims(dims)}; fix them with "
                f"--input-shape {v.name}=" + ",".join("1" if i == 0 else "N" for i in range(len(dims)))
            )
    # Stale intermediate shapes (computed for the dynamic dims) would conflict with the fixed ones.
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.ClearField("shape")
    return notes


def _dims(dims: Any) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def _infer_shapes(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:240]
        raise BadInput(f"{source}: shape inference failed ({first}); check --input-shape") from None


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    import onnxslim

    before = len(model.graph.node)
    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # a simplifier failure must not stop the build: keep the unsimplified graph
        return model, f"onnxslim failed ({type(e).__name__}); graph kept as is"
    if slim is None or not slim.graph.node:
        return model, "onnxslim returned nothing; graph kept as is"
    return slim, f"simplified by onnxslim: {before} -> {len(slim.graph.node)} nodes"


def _require_static_outputs(model: onnx.ModelProto, source: str) -> None:
    for out in model.graph.output:
        spec = _tensor_spec(out)
        if not out.type.tensor_type.HasField("shape") or any(d < 0 for d in spec.shape):
            log.info("output %s of %s has a data-dependent shape %s", spec.name, source, spec.shape)


# ---------------------------------------------------------------- size and cost


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers (weights; not shape constants)."""
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    return int(sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in float_types))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shapes[v.name] = _tensor_spec(v).shape
    for i in model.graph.initializer:
        shapes[i.name] = list(i.dims)
    return shapes


def layer_costs(model: onnx.ModelProto) -> list[LayerCost]:
    """MACs per node from inferred shapes. Convs and matrix products carry the cost; the rest is 0."""
    shapes = _shapes(model)
    inits = {i.name: i for i in model.graph.initializer}
    costs = []
    for i, node in enumerate(model.graph.node):
        out = shapes.get(node.output[0], []) if node.output else []
        params = sum(int(np.prod(inits[n].dims)) for n in node.input if n in inits)
        costs.append(LayerCost(node.name or f"{node.op_type}_{i}", node.op_type, _node_macs(node, shapes), params, out))
    return costs


def _prod(xs: list[int]) -> int:
    return int(np.prod(xs)) if xs and all(x >= 0 for x in xs) else 0


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    op = node.op_type
    out = shapes.get(node.output[0], []) if node.output else []
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes.get(node.input[3] if op == "QLinearConv" else node.input[1], [])
        return _prod(out) * _prod(w[1:]) if len(w) >= 3 else 0
    if op == "ConvTranspose":
        x, w = shapes.get(node.input[0], []), shapes.get(node.input[1], [])
        return _prod(x) * _prod(w[1:]) if len(w) >= 3 else 0
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shapes.get(node.input[0], [])
        k = a[-1] if a else 0
        if op == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a and len(a) == 2 else k
        return _prod(out) * k if k > 0 else 0
    return 0


def numpy_initializer(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def ensure(condition: bool, message: str) -> None:
    if not condition:
        raise EdgekitError(message)
