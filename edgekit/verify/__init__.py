"""Verification: an artifact against the FP32 reference (metrics, thresholds, the verifier) and
localisation of the first diverging layer."""
