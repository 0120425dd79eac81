"""Arguments shared by several verbs: how a model is named on the command line."""

from __future__ import annotations

import argparse

from edgekit.errors import BadInput


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="an .onnx file (or package.module:factory)")
    p.add_argument("--model", help="PyTorch factory package.module:factory (or an .onnx path)")
    p.add_argument("--weights", help="state_dict file for --model (loaded with weights_only=True)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,..",
                   help="fix an input's dimensions (repeatable)")


def model_of(args: argparse.Namespace) -> str:
    model = args.model or args.model_path
    if not model:
        raise BadInput("give a model: MODEL.onnx or --model package.module:factory")
    return model
