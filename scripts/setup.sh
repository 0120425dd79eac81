#!/usr/bin/env bash
# Creates .venv and installs edgekit with every backend that installs here. Idempotent: a second run
# only re-checks. torch is pinned to 2.13.0 in the `torch` extra (the CPU build; see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edgekit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[all]"
  # Ultralytics' YOLOv8 definition for the public-detector test: without its dependencies (torchvision would
  # replace the CPU torch pin; the rest is in the `public` extra)
  .venv/bin/python -m pip install --quiet --no-deps "ultralytics==8.4.190"
  # NNCF compiles its PyTorch quantizer kernels on first use (about a minute): once here, not inside the
  # first quantization-aware training run. A machine without a compiler only loses the head start.
  .venv/bin/python -c "import nncf.torch; nncf.torch.force_build_cpu_extensions()" >/dev/null 2>&1 \
    || echo "setup: NNCF's CPU extensions were not prebuilt; the first QAT run builds them" >&2
  touch "$stamp"
fi
