"""Ingest: any ONNX (opset >= 11) or a PyTorch factory -> one canonical ONNX and its ModelSpec.

Canonical means: a modern opset (so per-channel Q/DQ is legal), every input dimension fixed,
shapes inferred for every tensor, and the graph simplified by onnxslim. Every later stage reads
the canonical file, never the user's original.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference, version_converter

from edgekit.errors import BadInput
from edgekit.ingest.spec import (
    CANONICAL_OPSET,
    MAX_INPUT_BYTES,
    MIN_OPSET,
    ModelSpec,
    TensorSpec,
    _default_opset,
    _tensor_spec,
    count_params,
    is_dynamic,
    layer_costs,
    log,
    sha256_file,
)
from edgekit.ingest.torch_export import _export_torch, _looks_like_factory


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
        model, export_notes = _export_torch(source, weights, input_shapes, workdir / "exported.onnx")
        notes += export_notes
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
    _check_input_sizes(model, input_shapes)
    model = _infer_shapes(model, source)
    _check_activation_sizes(model, input_shapes)
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
            if any(not is_dynamic(d) and d.dim_value != w for d, w in zip(dims, want)):
                raise BadInput(f"--input-shape {v.name}={want} conflicts with the model's fixed {_dims(dims)}")
            for d, w in zip(dims, want):
                d.Clear()
                d.dim_value = w
            notes.append(f"input {v.name} fixed to {want}")
            continue
        free = [i for i, d in enumerate(dims) if is_dynamic(d)]
        if free == [0] and len(dims) > 1:
            dims[0].Clear()
            dims[0].dim_value = 1  # a dynamic batch is the common case: default it to 1
            notes.append(f"input {v.name}: dynamic batch set to 1")
        elif free:
            raise BadInput(
                f"input '{v.name}' has dynamic dimensions {_dims(dims)}; fix them with "
                f"--input-shape {v.name}="
                + ",".join(str(d.dim_value) if i not in free else "1" if i == 0 else "N" for i, d in enumerate(dims))
            )
    # Stale intermediate shapes (computed for the dynamic dims) would conflict with the fixed ones.
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.ClearField("shape")
    return notes


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.3g} TiB" if n < 1000 else f"{n:,.0f} TiB"


def available_memory() -> int:
    """Bytes this process can allocate without swapping (psutil's 'available')."""
    import psutil

    return int(psutil.virtual_memory().available)


def tensor_bytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.float64) * np.dtype(spec.dtype).itemsize) if spec.shape else 0


def _fix_hint(name: str, shapes: dict[str, list[int]]) -> str:
    return ("give a smaller --input-shape" if name in shapes
            else "the model's own input is that large: re-export it with a smaller input")


def _check_input_sizes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Every input, at its fixed shape, is small enough to allocate (and to be an edge model's input)."""
    limit = min(MAX_INPUT_BYTES, available_memory())
    for t in graph_inputs(model):
        size = tensor_bytes(t)
        if size > limit:
            why = (f"over the {human_bytes(MAX_INPUT_BYTES)} edgekit accepts for one input" if limit == MAX_INPUT_BYTES
                   else f"more than the {human_bytes(limit)} of memory available")
            raise BadInput(f"input {t.name} at {'x'.join(map(str, t.shape))} {t.dtype} is {human_bytes(size)}, {why}: "
                           + _fix_hint(t.name, shapes))


def _check_activation_sizes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """A rough bound before anything runs the model: its largest intermediate tensor must fit in memory."""
    specs = [_tensor_spec(v) for v in [*model.graph.value_info, *model.graph.output]]
    specs = [t for t in specs if t.shape and all(d >= 0 for d in t.shape)]
    if not specs:
        return
    largest = max(specs, key=tensor_bytes)
    available = available_memory()
    if tensor_bytes(largest) > available:
        given = ", ".join(shapes) or "the inputs"
        raise BadInput(f"at the input shape of {given}, tensor {largest.name} of the model is "
                       f"{'x'.join(map(str, largest.shape))} {largest.dtype} = {human_bytes(tensor_bytes(largest))}, "
                       f"more than the {human_bytes(available)} of memory available: "
                       + ("give a smaller --input-shape" if shapes else "re-export the model with a smaller input"))


def _dims(dims: Any) -> str:
    return "[" + ", ".join((d.dim_param or "?") if is_dynamic(d) else str(d.dim_value) for d in dims) + "]"


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
