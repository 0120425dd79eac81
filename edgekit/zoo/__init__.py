"""Bundled example models and their synthetic data sets (the default model is DefectNet)."""
