"""`edgekit distill STUDENT --teacher MODEL --out DIR`: train a (pruned) student from the original model;
writes DIR/model.onnx and compress.json (the run is edgekit/cli/compressing.py, shared with prune)."""

from __future__ import annotations

import argparse

from edgekit.cli.args import compress_args, task_args
from edgekit.cli.compressing import compress_timing_args, run_compress

VERB = "distill"
ORDER = 80


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("distill", help="train a (pruned) student from the original model; writes a model")
    d.add_argument("student", help="the student ONNX (e.g. OUT/model.onnx of `edgekit prune`)")
    d.add_argument("--teacher", required=True, help="the original model: .onnx or package.module:factory")
    d.add_argument("--weights", help="state_dict for a --teacher factory")
    d.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,..")
    d.add_argument("--target", default="host-cpu")
    d.add_argument("--val", help="validation data (default: 20%% of --train held out)")
    d.add_argument("--preprocess")
    d.add_argument("--out", required=True)
    d.add_argument("--force", action="store_true")
    compress_timing_args(d)
    compress_args(d, build=False)
    task_args(d)


def run(args: argparse.Namespace) -> int:
    return run_compress(args, teacher=args.teacher, distill=True)
