"""`edgekit debug MODEL --target T --backend B`: the first layer where an artifact diverges from FP32."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from edgekit.cli.args import data_args, model_args, model_of
from edgekit.console import emit, out
from edgekit.verify.verifier import Thresholds

VERB = "debug"
ORDER = 40


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("debug", help="name the first layer where an artifact diverges from the FP32 model")
    model_args(g)
    g.add_argument("--target", required=True)
    g.add_argument("--backend", required=True)
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    g.add_argument("--package", help="debug this package's artifact instead of building a new one")
    data_args(g, calib="calibration data (to build an INT8 artifact)",
              val="samples to compare on (default: held out of --calib)", preprocess=None)
    g.add_argument("--samples", type=int, default=4, help="validation samples to compare (default 4)")
    g.add_argument("--min-cosine", type=float, default=Thresholds().min_cosine, help="per-layer agreement threshold")
    g.add_argument("--out", help="folder for layers.json and report.md (default build/debug-MODEL-BACKEND-PRECISION)")
    g.add_argument("--emulate", action="store_true", help="compare the blobs the target's own CPU computes (an ARM "
                   "board's runtime under qemu-user with its CPU model) instead of this host's")


def run(args: argparse.Namespace) -> int:
    from edgekit.verify.localise import run_debug

    loc, out_dir = run_debug(
        model=model_of(args), target=args.target, backend=args.backend, precision=args.precision,
        package=args.package, calib=args.calib, val=args.val, preprocess=args.preprocess,
        input_shapes=args.input_shape, weights=args.weights, samples=args.samples, threshold=args.min_cosine,
        out=args.out, emulate=args.emulate,
    )
    if loc.verdict_line():
        out.print(loc.verdict_line(), markup=False)
    if loc.toolkit_table is not None:
        return _toolkit_table(loc, out_dir)
    table = Table(title=f"{loc.backend} {loc.precision} vs FP32, layer by layer ({loc.compared} matched tensors)")
    for col in ("node", "op", "matched by", "cosine", "SNR dB", "max |err|"):
        table.add_column(col, justify="right" if col in ("cosine", "SNR dB", "max |err|") else "left")
    first = loc.first_divergence["tensor"] if loc.first_divergence else None
    for la in loc.layers:
        style = "bold red" if la.tensor == first else ("red" if la.cosine < loc.threshold else "")
        table.add_row(la.node, la.op_type, la.matched_by, f"{la.cosine:.5f}", f"{la.snr_db:.1f}",
                      f"{la.max_abs_error:.4g}", style=style)
    return _finish(loc, out_dir, table)


def _toolkit_table(loc: Any, out_dir: Any) -> int:
    """The runtime's own per-layer comparison (rknn-toolkit2's accuracy_analysis: simulator vs float)."""
    table = Table(title=f"{loc.backend} {loc.precision}: the toolkit's per-layer accuracy analysis (simulator vs "
                        "float)")
    for col in ("layer", "op", "cosine through the model", "cosine alone", "euclidean alone"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    first = loc.first_divergence["node"] if loc.first_divergence else None
    for r in loc.toolkit_table:
        style = "bold red" if r["layer"] == first else ""
        table.add_row(r["layer"], r["op"], *(("–" if r[k] is None else f"{r[k]:.5f}")
                                             for k in ("entire_cos", "single_cos", "single_euc")), style=style)
    return _finish(loc, out_dir, table)


def _finish(loc: Any, out_dir: Any, table: Table) -> int:
    """The table, the verdict line and the JSON result; exit 1 when a layer diverges."""
    out.print(table)
    out.print(loc.summary(), markup=False)
    out.print(f"per-layer table: {out_dir / 'layers.json'}")
    code = 1 if loc.first_divergence else 0
    emit({"ok": code == 0, "exit_code": code, "out": str(out_dir), **loc.to_dict()})
    return code
