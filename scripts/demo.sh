#!/usr/bin/env bash
# README command 1: set up, generate the bundled defect data, build the bundled model for this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m edgekit.zoo.defects_data calibration/defects
exec .venv/bin/edgekit build examples/defects/defectnet.onnx \
  --target host-cpu --precision fp32,fp16,int8 \
  --calib calibration/defects/calib --val calibration/defects/val \
  --preprocess examples/defects/preprocess.yaml \
  --out build/defectnet-host-cpu --force "$@"
