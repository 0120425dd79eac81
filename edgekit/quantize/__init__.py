"""Quantization algorithms independent of any one backend: the quantized-op sets, calibration (the
reader, min/max and KL ranges of the FP32 model's activations), the FP16 range check, per-layer INT8
sensitivity and the mixed-precision recovery, attention and detector-head detection. Backends apply
the results through their own libraries."""
