"""TensorRT: the backend (backend.py) and the engine builder copied into packages (build_engine.py,
run with TensorRT's Python API where the GPU is)."""
