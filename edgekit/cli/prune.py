"""`edgekit prune MODEL --target T --out DIR`: remove channels (Torch-Pruning), aligned to the target;
writes DIR/model.onnx and compress.json (the run is edgekit/cli/compressing.py, shared with distill)."""

from __future__ import annotations

import argparse

from edgekit.cli.args import compress_args, model_args, task_args
from edgekit.cli.compressing import compress_timing_args, run_compress

VERB = "prune"
ORDER = 70


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove channels (Torch-Pruning), aligned to the target; writes a model")
    model_args(p)
    p.add_argument("--target", required=True)
    p.add_argument("--precision", default="fp32",
                   help="the precisions you will build (comma list, or 'all'): channels are rounded to a multiple "
                   "all of them like on the target")
    p.add_argument("--val", help="labelled data to report accuracy before/after")
    p.add_argument("--preprocess")
    p.add_argument("--out", required=True, help="folder for model.onnx, pruned.pt, compress.json")
    p.add_argument("--force", action="store_true")
    compress_timing_args(p)
    compress_args(p, build=False)
    task_args(p)


def run(args: argparse.Namespace) -> int:
    return run_compress(args, teacher=None, distill=False)
