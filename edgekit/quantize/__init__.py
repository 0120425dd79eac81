"""Quantization algorithms independent of any one backend: the quantized-op sets, the FP16 range check,
per-layer INT8 sensitivity and the mixed-precision recovery, attention and detector-head detection.
Backends apply the results through their own libraries."""
