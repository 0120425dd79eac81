"""NCNN: pnnx conversion and graph rewrites (backend.py), the param/bin format (param_bin.py), INT8
calibration and weight quantization in Python (int8.py)."""
