"""RKNN (Rockchip NPUs): backend.py registers it; env.py makes rknn-toolkit2's isolated environment; worker.py
runs there (JSON in and out)."""
