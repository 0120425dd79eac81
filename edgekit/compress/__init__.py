"""Compression in torch, independent of any one backend: structured pruning (Torch-Pruning), group
sensitivity, distillation, low rank, and the ONNX -> torch conversion they need; `stage` chains them."""
