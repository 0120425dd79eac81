"""`edgekit inspect MODEL`: inputs, outputs, parameters, MACs per layer, and op support per backend."""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from rich.table import Table

from edgekit import backends
from edgekit.cli.args import model_args, model_of
from edgekit.console import emit, out

VERB = "inspect"
ORDER = 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="inputs, outputs, parameters, MACs per layer, op support")
    model_args(i)
    i.add_argument("--target", help="check op support against this target's backends")
    i.add_argument("--all-layers", action="store_true", help="list every node, not only those with MACs")


def run(args: argparse.Namespace) -> int:
    from edgekit.ingest import ingest, parse_input_shapes
    from edgekit.targets import load_target

    target = load_target(args.target) if args.target else None
    with tempfile.TemporaryDirectory(prefix="edgekit-inspect-") as work:
        spec = ingest(model_of(args), work, parse_input_shapes(args.input_shape), args.weights)
        out.print(f"[bold]{spec.source}[/bold]  opset {spec.source_opset}"
                  + (f" -> {spec.opset}" if spec.opset != spec.source_opset else "")
                  + f"  ·  {spec.params:,} parameters  ·  {spec.macs / 1e6:,.2f} M MACs  ·  {len(spec.layers)} nodes")
        for n in spec.notes:
            out.print(f"  [dim]{n}[/dim]")
        io = Table(title="inputs and outputs")
        for col in ("", "name", "shape", "dtype"):
            io.add_column(col)
        for kind, tensors in (("input", spec.inputs), ("output", spec.outputs)):
            for t in tensors:
                io.add_row(kind, t.name, str(t.shape), t.dtype)
        out.print(io)
        layers = Table(title="layers" + ("" if args.all_layers else " with MACs"))
        for col in ("node", "op", "output shape", "params", "MACs", "% of MACs"):
            layers.add_column(col, justify="right" if col in ("params", "MACs", "% of MACs") else "left")
        for c in spec.layers:
            if args.all_layers or c.macs:
                layers.add_row(c.name, c.op_type, str(c.output_shape), f"{c.params:,}", f"{c.macs:,}",
                               f"{100 * c.macs / spec.macs:.1f}" if spec.macs else "–")
        layers.add_row("[bold]total", "", "", f"[bold]{spec.params:,}", f"[bold]{spec.macs:,}", "100")
        out.print(layers)
        table, support = _op_support_table(spec, target.backends if target else backends.names(),
                                           target.name if target else None)
        out.print(table)
        emit({**{k: v for k, v in spec.to_dict(layers=True).items() if k != "onnx_path"}, "op_support": support})
    return 0


def _op_support_table(spec: Any, backend_names: list[str], target: str | None
                      ) -> tuple[Table, dict[str, dict[str, str]]]:
    model = spec.load()
    table = Table(title="op support" + (f" on {target}" if target else ""))
    table.add_column("op")
    table.add_column("count", justify="right")
    verdicts: dict[str, dict[str, str]] = {}
    for name in backend_names:
        table.add_column(name)
        if name not in backends.names():
            verdicts[name] = {}
            continue
        backend = backends.get(name)
        missing = backend.missing()
        bad = {i.op_type: i.reason for i in backend.unsupported_nodes(model)} if not missing else {}
        verdicts[name] = {op: ("[red]no: " + bad[op]) if op in bad else "[green]yes" for op in spec.op_counts}
        if missing:
            verdicts[name] = dict.fromkeys(spec.op_counts, "[yellow]not installed")
    for op, count in sorted(spec.op_counts.items()):
        table.add_row(op, str(count), *[verdicts[n].get(op, "[dim]backend not in edgekit yet") for n in backend_names])
    plain = {n: {op: v.split("]", 1)[-1] for op, v in verdicts[n].items()} for n in backend_names}
    return table, plain
