"""A PyTorch factory (module:function + weights) -> ONNX: the TorchScript and torch.export exporters, the
exported graph checked against the module on sample inputs, failures condensed to one line naming the op
and the Python module it comes from."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import version_converter

from edgekit.errors import BadInput
from edgekit.ingest.spec import CANONICAL_OPSET, _default_opset, log
from edgekit.quantize.ops import WEIGHTED_OPS


def _looks_like_factory(source: str) -> bool:
    module, sep, attr = source.partition(":")
    return bool(sep and module and attr and not source.endswith(".onnx"))


def load_torch_module(factory: str, weights: str | None) -> Any:
    """The user's module from `package.module:factory`, with a state_dict loaded safely."""
    try:
        import torch
    except ImportError:
        raise BadInput("a PyTorch model needs torch: pip install 'edgekit[torch]'") from None
    module_name, _, attr = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise BadInput(f"cannot import {factory}: {e}") from None
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"{factory} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise BadInput(f"weights file not found: {weights}")
        try:
            # weights_only: never unpickle arbitrary objects from a user-supplied file.
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"{weights} is not a loadable state_dict ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise BadInput(f"{weights} does not fit {factory}: {first}") from None
    return model


# The exported ONNX must compute what the module does before anything is built from it: per output,
# max |ONNX - PyTorch| / max |PyTorch| over a few seeded inputs (float32 rounding of a deep net is ~1e-6).
EXPORT_TOLERANCE = 1e-3

EXPORT_CHECK_INPUTS = 3

TORCH_EXPORT_OPSET = 18  # the torch.export-based exporter's lowest; converted down to CANONICAL_OPSET after

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _ExportMismatch(Exception):
    """The exporter finished, but its ONNX does not compute what the module computes."""


def _export_torch(
    factory: str, weights: str | None, input_shapes: dict[str, list[int]], out: Path
) -> tuple[onnx.ModelProto, list[str]]:
    """The module exported to ONNX and checked against itself. The TorchScript exporter first (scoped node
    names such as /blocks/blocks.1/conv/Conv; the exporter every bundled and tested model goes through), then
    the torch.export-based one (dynamo=True, needs onnxscript), which inlines custom torch.autograd.Functions
    (memory-efficient activations) the TorchScript exporter leaves as prim::PythonOp or traces wrongly."""
    if not input_shapes:
        raise BadInput(f"a PyTorch model needs its input shape: --input-shape input=1,3,224,224 ({factory})")
    model = load_torch_module(factory, weights)
    import torch

    model.eval()
    args = tuple(torch.zeros(*shape) for shape in input_shapes.values())
    checks = _check_inputs(input_shapes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            n_out = len(_flat_outputs(model(*args)))
            expected = [[t.numpy() for t in _flat_outputs(model(*map(torch.from_numpy, feed.values())))]
                        for feed in checks]
        except Exception as e:
            raise BadInput(f"{factory} fails on inputs of shape {_shape_list(input_shapes)}: "
                           f"{type(e).__name__}: {_first_line(str(e))}") from None
    names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    failures: dict[str, str] = {}
    for exporter in ("TorchScript", "torch.export"):
        try:
            exported = _run_exporter(exporter, model, args, list(input_shapes), names, out)
            error = _compare_exported(out, checks, expected)
        except _ExportMismatch as e:
            failures[exporter] = str(e)
            continue
        except Exception as e:  # every exporter failure ends here: one line, never the exporter's graph dump
            log.debug("%s exporter failed on %s", exporter, factory, exc_info=True)
            failures[exporter] = _condense(e)
            continue
        notes = [f"exported from PyTorch {factory} (weights {weights or 'none'}) to ONNX with the {exporter} "
                 f"exporter; matches the module on {len(checks)} inputs (max relative error {error:.1e})"]
        if failures:
            notes.append(f"the TorchScript exporter failed ({failures['TorchScript']})")
        return exported, notes
    raise BadInput(_export_failure(factory, model, args, failures))


def _shape_list(input_shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in input_shapes.items())


def _check_inputs(input_shapes: dict[str, list[int]]) -> list[dict[str, np.ndarray]]:
    """Seeded inputs the export is checked on: images in [0, 1], standard normal, and [-1, 1]."""
    rng = np.random.default_rng(0)
    draws = [lambda s: rng.uniform(0, 1, s), rng.standard_normal, lambda s: rng.uniform(-1, 1, s)]
    return [{k: draw(v).astype(np.float32) for k, v in input_shapes.items()} for draw in draws[:EXPORT_CHECK_INPUTS]]


def _flat_outputs(result: Any) -> list[Any]:
    """The tensors of a forward's result in the order the exporters flatten them (tuples, lists, dicts)."""
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flat_outputs(r)]
    return []


def _run_exporter(exporter: str, model: Any, args: tuple, input_names: list[str], output_names: list[str],
                  out: Path) -> onnx.ModelProto:
    import torch

    with torch.no_grad(), warnings.catch_warnings(), _silenced():
        warnings.simplefilter("ignore")
        if exporter == "TorchScript":
            torch.onnx.export(model, args, str(out), dynamo=False, opset_version=CANONICAL_OPSET,
                              input_names=input_names, output_names=output_names, do_constant_folding=True)
        else:
            if importlib.util.find_spec("onnxscript") is None:
                raise BadInput("it needs onnxscript: pip install onnxscript (or 'edgekit[torch]')")
            torch.onnx.export(model, args, str(out), dynamo=True, opset_version=TORCH_EXPORT_OPSET,
                              input_names=input_names, output_names=output_names, external_data=False,
                              verbose=False, report=False, optimize=True)
    model_proto = onnx.load(str(out))
    if exporter == "torch.export":
        model_proto = _tidy_torch_export(model_proto)
        onnx.save(model_proto, str(out))
    python_ops = sorted({n.op_type for n in model_proto.graph.node
                         if n.op_type in ("PythonOp", "ATen") or n.domain.startswith("org.pytorch")})
    if python_ops:
        raise _ExportMismatch(f"left {', '.join(python_ops)} nodes that no runtime executes")
    return model_proto


def _tidy_torch_export(model: onnx.ModelProto) -> onnx.ModelProto:
    """The torch.export ONNX in the form the TorchScript exporter gives: local functions inlined, the canonical
    opset where the converter can reach it, and node names from the module hierarchy (/stem/stem.0/Conv,
    not node_Conv_201), with the per-node stack traces (local file paths) removed."""
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    inits = {i.name for i in model.graph.initializer}
    used: dict[str, int] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        paths = _scope_paths(meta.get("pkg.torch.onnx.name_scopes", ""))
        weight = node.input[1] if node.op_type in WEIGHTED_OPS and len(node.input) > 1 else ""
        if weight in inits and weight.endswith(".weight"):
            # A Conv with its BatchNorm folded in carries the BatchNorm's scope: named after its own weights.
            module = weight.removesuffix(".weight")
            if paths and module != paths[-1] and module.rpartition(".")[0] == (paths[-2] if len(paths) > 1 else ""):
                paths[-1] = module
        base = "/" + "/".join([*_scope_names(paths), node.op_type])
        count = used.get(base, 0)
        used[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"
        del node.metadata_props[:]
        node.doc_string = ""
    return _down_to_canonical_opset(model)  # after the renaming: the converter drops the nodes' metadata


def _down_to_canonical_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Opset 18 -> CANONICAL_OPSET where ONNX's converter gets it right; else the model stays at 18, which
    every backend here reads. The converter moves Reduce* axes back to an attribute but leaves
    noop_with_empty_axes (opset 18 only) behind: removed where it is the default."""
    try:
        converted = version_converter.convert_version(model, CANONICAL_OPSET)
        for node in converted.graph.node:
            if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
                keep = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
                del node.attribute[:]
                node.attribute.extend(keep)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as e:
        log.info("torch.export ONNX kept at opset %d (%s)", _default_opset(model), _first_line(str(e)))
        return model
    return converted


def _scope_paths(raw: str) -> list[str]:
    """"['', 'blocks', 'blocks.0', 'blocks.0.conv', 'conv2d']" -> the modules' qualified names; the last
    entry is the aten op, not a module."""
    import ast

    try:
        return [p for p in ast.literal_eval(raw)[:-1] if isinstance(p, str) and p] if raw else []
    except (ValueError, SyntaxError):
        return []


def _scope_names(paths: list[str]) -> list[str]:
    """[blocks, blocks.0, blocks.0.body, blocks.0.body.1] -> the TorchScript exporter's scope names [blocks,
    blocks.0, body, body.1]: each module by its attribute name, a numbered child by its parent's and its index."""
    names: list[str] = []
    parent = ""
    for path in paths:
        local = path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path
        names.append(f"{names[-1].rsplit('.', 1)[0]}.{local}" if local.isdigit() and names else local)
        parent = path
    return names


def _compare_exported(path: Path, checks: list[dict[str, np.ndarray]], expected: list[list[np.ndarray]]) -> float:
    """The largest relative error of the exported model over the check inputs; _ExportMismatch past the
    tolerance (an exporter that traced Python code into constants, or dropped a branch)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ignored = sorted(set(checks[0]) - {i.name for i in session.get_inputs()})
    if ignored:
        raise _ExportMismatch(f"the ONNX does not read input {', '.join(ignored)}: the trace froze what the "
                              "module computes from it into constants")
    worst = 0.0
    for feed, want in zip(checks, expected):
        got = session.run(None, feed)
        if len(got) != len(want):
            raise _ExportMismatch(f"the ONNX has {len(got)} outputs, the module returns {len(want)} tensors")
        for name, g, w in zip(names, got, want):
            if g.shape != w.shape:
                raise _ExportMismatch(f"output {name} is {list(g.shape)} in the ONNX, {list(w.shape)} in PyTorch")
            error = _relative_error(g, w)
            if error > EXPORT_TOLERANCE:
                raise _ExportMismatch(f"the ONNX disagrees with the module: output {name} max relative error "
                                      f"{error:.3g} (tolerance {EXPORT_TOLERANCE:g})")
            worst = max(worst, error)
    return worst


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if not np.issubdtype(want.dtype, np.floating):  # indices, masks: the share of elements that differ
        return float(np.mean(got != want)) if want.size else 0.0
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w)
    if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(g[~finite], w[~finite], equal_nan=True):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(np.abs(w[finite]).max())
    error = float(np.abs(g[finite] - w[finite]).max())
    return error / scale if scale > 0 else error


def _first_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _condense(e: Exception) -> str:
    """An exporter's exception in one line: torch.export's own summary line where it writes one (its message
    opens with advice, and may hold the whole traced graph), else the first line."""
    text = _ANSI.sub("", str(e))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    line = _first_line(text)
    line = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", line)
    line = line.removeprefix("ONNX export failed: ")
    return line or type(e).__name__


def _custom_functions(model: Any, args: tuple) -> list[tuple[str, str, str]]:
    """(Function, module calling it, its Python module) for each torch.autograd.Function the forward applies:
    what the TorchScript exporter calls prim::PythonOp. Found by one forward with Function.apply wrapped."""
    import torch

    stack: list[Any] = []
    found: dict[type, Any] = {}
    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(lambda m, _i: stack.append(m)),
                                                    m.register_forward_hook(lambda _m, _i, _o: stack.pop()))]
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *a: Any, **k: Any) -> Any:
        found.setdefault(cls, stack[-1] if stack else None)
        return original.__func__(cls, *a, **k)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*args)
    except Exception:  # naming only: the export failure is what gets reported
        pass
    finally:
        torch.autograd.Function.apply = original
        for h in hooks:
            h.remove()
    return [(fn.__name__, type(caller).__name__ if caller is not None else "", (type(caller) if caller is not None
             else fn).__module__) for fn, caller in found.items()]


def _export_failure(factory: str, model: Any, args: tuple, failures: dict[str, str]) -> str:
    """One line: what neither exporter could turn into ONNX, and what to do."""
    functions = _custom_functions(model, args)
    tried = "; ".join(f"{k}: {v}" for k, v in failures.items())
    if functions:
        fn, caller, module = functions[0]
        where = f"in {caller}, module {module}" if caller else f"module {module}"
        more = f" (and {len(functions) - 1} more)" if len(functions) > 1 else ""
        return (f"cannot export {factory} to ONNX: prim::PythonOp {fn} (a custom torch.autograd.Function {where})"
                f"{more} ({tried}); give {caller or fn} a plain tensor forward for export (e.g. nn.SiLU or "
                "nn.Hardswish for a memory-efficient activation), or export ONNX yourself and pass the .onnx file")
    return (f"cannot export {factory} to ONNX ({tried}); make the forward traceable (no Python on tensor values), "
            "or export ONNX yourself and pass the .onnx file")


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """The exporters write graph dumps (thousands of lines), tracebacks and warnings straight to the process's
    stdout and stderr, even when they then raise: caught at the file descriptors, kept for -v."""
    import sys
    import tempfile

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            log.debug("exporter output (tail): %s", sink.read()[-4000:].decode(errors="replace"))
