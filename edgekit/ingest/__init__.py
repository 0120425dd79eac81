"""Ingest: any ONNX (opset >= 11) or a PyTorch factory -> one canonical ONNX and its ModelSpec.

spec.py holds what later stages read (ModelSpec, TensorSpec, costs); canonical.py the stage itself
(load, opset upgrade, fixed shapes, size checks, onnxslim); torch_export.py the PyTorch exporters.
"""

from edgekit.ingest.canonical import available_memory, graph_inputs, human_bytes, ingest, tensor_bytes
from edgekit.ingest.spec import (
    CANONICAL_OPSET,
    MIN_OPSET,
    LayerCost,
    ModelSpec,
    TensorSpec,
    count_params,
    is_dynamic,
    layer_costs,
    parse_input_shapes,
    sha256_file,
)
from edgekit.ingest.torch_export import load_torch_module

__all__ = ["CANONICAL_OPSET", "MIN_OPSET", "LayerCost", "ModelSpec", "TensorSpec", "available_memory", "count_params",
           "graph_inputs", "human_bytes", "ingest", "is_dynamic", "layer_costs", "load_torch_module",
           "parse_input_shapes", "sha256_file", "tensor_bytes"]
