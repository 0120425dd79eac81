"""Quantization algorithms independent of any one backend: the quantized-op sets, calibration (the
reader, min/max and KL ranges of the FP32 model's activations), the FP16 range check, per-layer INT8
sensitivity and the mixed-precision recovery, attention and detector-head detection. Backends apply
the results through their own libraries."""

import logging
from types import ModuleType


def import_nncf() -> ModuleType:
    """NNCF, its INFO log (each ignored node's name, one per line, on stdout mid-build) turned down to warnings:
    the console shows edgekit's own progress, and a user's JSON on stdout stays parseable."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    return nncf
