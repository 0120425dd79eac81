"""Compression algorithms that are independent of any one backend (FP16 range checks; later pruning
and distillation). Backends call these and apply the result through their own libraries."""
