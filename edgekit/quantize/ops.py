"""ONNX op sets the stages share (one definition: ingest's MAC count, the INT8 paths, sensitivity, the
detector-head search and localisation's blame all mean the same ops)."""

from __future__ import annotations

# The ops with weights that every INT8 path of edgekit quantizes; a tuple, so lists built from it keep
# one order from run to run.
WEIGHTED_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
