"""Convert one ONNX model with rknn-toolkit2 and run it on its simulator: `python worker.py REQUEST.json REPLY.json`.

Run by the isolated env's python (env.py), never imported by edgekit (the toolkit needs numpy 1.26): standard
library, numpy and rknn only (and onnx, a toolkit dependency, for graph names). The simulator runs only a model
built in the same RKNN session, so every step happens in this one process. The toolkit's chatter (Python and
C++) goes to REPLY.log; its files go to REPLY.json.work/, removed at the end unless keep_work.

Request: onnx (NCHW inputs, batch 1 or dynamic: fixed from the data), platform (PLATFORMS), precision (int8 |
fp16), out (.rknn), calibration (int8: .npz, one array per input keyed by input name, samples on axis 0, already
preprocessed: the toolkit gets mean 0 / std 1), validation (.npz, same layout; all samples run on the
simulator), outputs (.npz written: one array per model output, samples on axis 0), quantized_algorithm
(normal | mmse | kl_divergence), quantized_method (channel | layer), optimization_level (0-3), accuracy_analysis
(bool: the per-layer table on the first validation sample), float_layers (kept float16 by hybrid quantization:
a .quantization.cfg layer or an ONNX node/tensor leading to one), keep_work. Reply: ok, error (one line), versions,
seconds, inputs, outputs, layers (op, dtype, NPU/CPU per node), float_layers (requested -> layer, layers marked,
applied), float_between (layers marked as lying between float ones), accuracy_analysis (rows), warnings, log.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

PLATFORMS = ("rk3588", "rk3576", "rk3568", "rk3566")
PRECISIONS, METHODS, ALGORITHMS = ("int8", "fp16"), ("channel", "layer"), ("normal", "mmse", "kl_divergence")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Toolkit lines that say nothing about the model: left out of the reply's warnings (kept in the log).
BENIGN = re.compile(r"temperate env|(mean|std)_values is None|need to crop the model|Unkown op target: 0|"
                    r"map_name_to_file|The error analysis results save to|^rknn-toolkit2 version")
FUSED_UP = ("BatchNormalization", "Relu", "Clip")  # ops the toolkit folds into the op before them
LAYER_ROW = re.compile(r"^D RKNN: \[[^\]]*\]\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+\s+(\S+)\s+\S+\s+\S+\s+(.+?)\s*$")
MAX_WARNINGS = 40


class Failed(Exception):
    """A step failed; the message is the reply's one-line error."""


def one_line(text: object, limit: int = 400) -> str:
    return " ".join(str(text).split())[:limit]


class Log:
    """fds 1 and 2 point at the log file, so the toolkit's prints (C++ ones too) land there; since(mark) reads back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "w", buffering=1)  # noqa: SIM115 (open for the whole process)
        for fd in (1, 2):
            os.dup2(self.file.fileno(), fd)
        self.libc = ctypes.CDLL(None)

    def mark(self) -> int:
        for stream in (sys.stdout, sys.stderr, self.file):
            stream.flush()
        self.libc.fflush(None)  # C stdio buffers: the layer table is printed from C++
        return os.path.getsize(self.path)

    def since(self, mark: int) -> str:
        end = self.mark()
        with open(self.path, "rb") as f:
            f.seek(mark)
            return ANSI.sub("", f.read(end - mark).decode("utf-8", "replace"))


def toolkit_messages(text: str, level: str) -> list[str]:
    """The toolkit's W (or E) messages, each joined with its indented continuation lines."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(level + " "):
            more = [m.strip() for m in _block(lines[i + 1:]) if m.startswith((" ", "\t"))]
            msg = re.sub(r"^RKNN: \[[^\]]*\]\s*", "RKNN: ", one_line(" ".join([line[2:], *more]), 500))
            if msg and not BENIGN.search(msg):
                out.append(msg)
    return out


def _block(lines: list[str]) -> list[str]:
    """The lines up to the next toolkit message or blank line."""
    return list(itertools.takewhile(lambda line: line[:2] not in ("E ", "W ", "I ", "D ") and line.strip(), lines))


def failure_reason(text: str) -> str:
    """Why a step failed: the exception line of its last logged traceback, else its last E message."""
    lines, reason = text.splitlines(), ""
    for i, line in enumerate(lines):
        if line.startswith("E ") and line.rstrip().endswith("Traceback (most recent call last):"):
            reason = next((m for m in reversed(_block(lines[i + 1:])) if not m.startswith((" ", "\t"))), reason)
    errors = toolkit_messages(text, "E")
    return one_line(reason or (errors[-1] if errors else ""))


def parse_layer_table(text: str) -> list[dict]:
    """The build's last 'Network Layer Information Table': per op its type, dtype, NPU/CPU and node name."""
    start, rows = text.rfind("Network Layer Information Table"), []
    for line in text[start:].splitlines()[3:] if start >= 0 else []:
        if "Information Table" in line:
            break
        m = LAYER_ROW.match(line)
        if m:
            op_id, op, dtype, target, out_shape, full = m.groups()
            kind, _, node = full.partition(":")
            rows.append({"id": int(op_id), "op": op, "dtype": dtype.lower(), "target": target,
                         "output_shape": None if out_shape == "\\" else out_shape, "node": node, "node_op": kind})
    return rows


def _number(text: str) -> float | None:
    return float(text) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text) else None  # nan, inf: None


def parse_accuracy_table(path: Path) -> list[dict]:
    """error_analysis.txt -> rows: '[Op] layer' then 'cos | euc' pairs (entire, single); blank = fused away."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^\[([^\]]+)\]\s+(.*)$", line.strip())
        if m:
            pairs = list(re.finditer(r"(\S+)\s*\|\s*(\S+)", m.group(2)))
            name = m.group(2)[: pairs[0].start()] if pairs else m.group(2)
            vals = [_number(v) for p in pairs[:2] for v in p.groups()] + [None] * 4
            rows.append({"op": m.group(1), "layer": name.strip(), "entire_cos": vals[0], "entire_euc": vals[1],
                         "single_cos": vals[2], "single_euc": vals[3]})
    return rows


def read_request(path: Path) -> dict:
    """The request, checked and with defaults filled in; a mistake raises Failed naming the field."""
    try:
        req = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Failed(f"cannot read the request {path}: {one_line(e)}") from None
    if not isinstance(req, dict):
        raise Failed("the request must be a JSON object")

    def choice(key: str, options: tuple, default: object = None) -> Any:
        if req.get(key, default) not in options:
            raise Failed(f"request field {key!r} must be one of {', '.join(map(str, options))} (got {req.get(key)!r})")
        return req.get(key, default)

    def path_field(key: str, required: bool, what: str) -> Path | None:
        value = req.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise Failed(f"request field {key!r} ({what}) is missing or not a path")
        return Path(value).resolve()

    int8 = choice("precision", PRECISIONS) == "int8"
    r: dict[str, Any] = {
        "platform": choice("platform", PLATFORMS), "precision": req["precision"],
        "quantized_algorithm": choice("quantized_algorithm", ALGORITHMS, "normal"),
        "quantized_method": choice("quantized_method", METHODS, "channel"),
        "optimization_level": choice("optimization_level", (0, 1, 2, 3), 3),
        "onnx": path_field("onnx", True, "the ONNX model"), "out": path_field("out", True, "the .rknn to write"),
        "calibration": path_field("calibration", int8, "an .npz of samples, needed for int8"),
        "validation": path_field("validation", False, "an .npz"),
        "accuracy_analysis": bool(req.get("accuracy_analysis")), "keep_work": bool(req.get("keep_work")),
    }
    r["outputs"] = path_field("outputs", bool(r["validation"]), "the .npz of simulator outputs, with validation")
    floats = req.get("float_layers") or []
    if not isinstance(floats, list) or not all(isinstance(x, str) and x for x in floats):
        raise Failed("request field 'float_layers' must be a list of layer names")
    if floats and not int8:
        raise Failed("float_layers applies to int8 (hybrid quantization); fp16 is float throughout")
    r["float_layers"] = list(dict.fromkeys(floats))
    if r["accuracy_analysis"] and not r["validation"]:
        raise Failed("accuracy_analysis runs on the first validation sample: give 'validation'")
    for key in ("onnx", "calibration", "validation"):
        if r[key] and not r[key].is_file():
            raise Failed(f"request field {key!r}: no file {r[key]}")
    return r


def read_graph(path: Path) -> dict:
    """Inputs and outputs (name, dims; None = dynamic), nodes and opsets of the model, without its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g, inits = model.graph, {i.name for i in model.graph.initializer}

    def dims(v: Any) -> list[int | None]:
        return [d.dim_value if d.dim_value > 0 else None for d in v.type.tensor_type.shape.dim]

    return {"inputs": [(v.name, dims(v)) for v in g.input if v.name not in inits],
            "outputs": [(v.name, dims(v)) for v in g.output],
            "nodes": [(n.name, list(n.input), list(n.output), n.op_type) for n in g.node],
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}


def read_samples(path: Path, inputs: list, what: str) -> list[np.ndarray]:
    """One array per model input, samples on axis 0, checked against the model's input shapes."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if len(inputs) == 1 and len(arrays) == 1:
        arrays = {inputs[0][0]: next(iter(arrays.values()))}
    out = []
    for name, dims in inputs:
        if name not in arrays:
            raise Failed(f"{what} {path.name} has no array {name!r} (it has {sorted(arrays)})")
        a = arrays[name].astype(np.float32, copy=False) if arrays[name].dtype.kind == "f" else arrays[name]
        if a.ndim != len(dims) or a.shape[0] < 1 or any(d and d != s for d, s in zip(dims[1:], a.shape[1:])):
            raise Failed(f"{what} array {name!r} has shape {list(a.shape)}; the model takes "
                         f"{['?' if d is None else d for d in dims]} with samples on axis 0")
        out.append(np.ascontiguousarray(a))
    if len({a.shape[0] for a in out}) != 1:
        raise Failed(f"{what} arrays have different sample counts {sorted({a.shape[0] for a in out})}")
    return out


def write_dataset(arrays: list[np.ndarray], folder: Path) -> str:
    """The toolkit's dataset list: a line per sample, an .npy (NCHW, batch 1) per input; names relative to the cwd."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(arrays[0].shape[0]):
        for j, a in enumerate(arrays):
            np.save(folder / f"{i:06d}_{j}.npy", a[i:i + 1])
        lines.append(" ".join(f"{folder.name}/{i:06d}_{j}.npy" for j in range(len(arrays))))
    (folder.parent / f"{folder.name}.txt").write_text("\n".join(lines) + "\n")
    return f"{folder.name}.txt"


def resolve_float_layers(wanted: list[str], cfg_keys: list[str], graph: dict) -> tuple[list[dict], list[str]]:
    """Each name -> its .quantization.cfg layer (itself, or from an ONNX node/tensor downstream through single-consumer
    ops) and the outputs of the BN/Relu/Clip fused with it: each cfg tensor is quantized on its own (an int8 Relu after
    a float Conv keeps nothing float); and the layers computed from float ones, read only by float ones (a MaxPool)."""
    keys, nodes = set(cfg_keys), {n: (ins, op) for n, ins, _, op in graph["nodes"]}
    producer = {o: n for n, _, outs, _ in graph["nodes"] for o in outs}
    consumers: dict[str, list] = {}
    for n, ins, outs, _ in graph["nodes"]:
        for i in ins:
            consumers.setdefault(i, []).append((n, outs))
    node_outs = {n: outs for n, _, outs, _ in graph["nodes"] if n and outs}
    fuses = {ins[0] for _, ins, outs, op in graph["nodes"] if op in FUSED_UP and ins and outs and outs[0] in keys}
    resolved = []
    for name in wanted:
        tensor = name if name in keys or name in producer else (node_outs.get(name) or [None])[0]
        chain = [producer[tensor]] if tensor in producer else []
        while tensor is not None and len(consumers.get(tensor, [])) == 1 and len(chain) < 12 and (
                tensor not in keys or tensor in fuses):
            node, outs = consumers[tensor][0]
            chain.append(node)
            tensor = outs[0] if outs else None
        if tensor not in keys:
            raise Failed(f"float layer {name!r} is not a layer of the toolkit's quantization config, nor an ONNX "
                         f"node or tensor that fuses into one; layers are e.g. {cfg_keys[:6]}")
        up = producer.get(tensor)
        while up in nodes and nodes[up][1] in FUSED_UP and len(chain) < 16:  # the Conv a BN/Relu fuses into
            ins = nodes[up][0]
            up = producer.get(ins[0]) if ins and len(consumers.get(ins[0], [])) == 1 else None
            chain += [up] if up else []
        layers = list(dict.fromkeys(o for n in chain for o in node_outs.get(n, []) if o in keys)) or [tensor]
        resolved.append({"requested": name, "layer": tensor, "layers": layers, "onnx_nodes": [*dict.fromkeys(chain)]})
    fnodes = {n for r in resolved for n in r["onnx_nodes"]}
    reach, only = {t for r in resolved for t in r["layers"]}, set(fnodes)  # downstream of / read only by float ones
    for _, ins, outs, _ in graph["nodes"]:
        reach |= set(outs) if reach.intersection(ins) else set()
    for n, _, outs, _ in reversed(graph["nodes"]):
        only |= {n} if outs and all(consumers.get(o) and {m for m, _ in consumers[o]} <= only for o in outs) else set()
    return resolved, [o for n, _, outs, _ in graph["nodes"] if n in only - fnodes for o in outs if o in reach & keys]


def quantization_cfg_keys(text: str) -> list[str]:
    """Layer names of a .quantization.cfg (the keys under quantize_parameters), unquoted."""
    keys, inside = [], False
    for line in text.splitlines():
        if line.startswith("quantize_parameters:"):
            inside = True
        elif inside and line and not line.startswith(" "):
            break
        elif inside and re.match(r"^ {4}\S", line) and line.rstrip().endswith(":"):
            key = line.strip()[:-1]
            if len(key) > 1 and key[0] == key[-1] == "'":
                key = key[1:-1].replace("''", "'")
            elif len(key) > 1 and key[0] == key[-1] == '"':
                key = json.loads(key)
            keys.append(key)
    return keys


def mark_float(text: str, layers: list[str]) -> str:
    """The cfg with custom_quantize_layers set to float16 for layers (JSON strings are valid YAML scalars)."""
    block = "custom_quantize_layers:\n" + "".join(f"    {json.dumps(n)}: float16\n" for n in layers)
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("custom_quantize_layers:"):
            out.append(block)
            skipping = True
        elif not (skipping and (line.startswith(" ") or not line.strip())):
            skipping = False
            out.append(line)
    if block not in out:
        raise Failed("the toolkit's .quantization.cfg has no custom_quantize_layers section")
    return "".join(out)


class Session:
    """Runs each toolkit step timed, its printout read back for errors and warnings."""

    def __init__(self, log: Log, reply: dict) -> None:
        self.log, self.reply, self.text = log, reply, {}

    def step(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        mark, t0 = self.log.mark(), time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # the toolkit raises after logging an 'E' line and its traceback
            self.text[name] = self.log.since(mark)
            raise Failed(f"{name} failed: {failure_reason(self.text[name]) or one_line(repr(e))}") from e
        finally:
            self.reply["seconds"][name] = round(time.monotonic() - t0, 3)
        self.text[name] = text = self.log.since(mark)
        if isinstance(result, int) and result != 0:
            raise Failed(f"{name} failed: {failure_reason(text) or 'see the log'}")
        self.reply["warnings"] += [{"step": name, "text": w} for w in toolkit_messages(text, "W")]
        self.reply["warnings"] += [{"step": name, "text": "E " + e} for e in toolkit_messages(text, "E")]
        return result


def fixed_sizes(inputs: list, given: list[np.ndarray] | None) -> list[list[int]]:
    """Each input's shape with batch 1 and any dynamic dimension taken from the data."""
    for name, dims in inputs:
        if dims and dims[0] not in (None, 1):
            raise Failed(f"model input {name!r} has a fixed batch of {dims[0]}; the simulator is fed one sample "
                         "at a time: export the model with batch 1 (or a dynamic batch)")
    if given is None:
        if any(d is None for _, dims in inputs for d in dims):
            raise Failed("the model has dynamic input dimensions and no calibration or validation data fixes them")
        return [dims for _, dims in inputs]
    return [[1, *[d or a.shape[k + 1] for k, d in enumerate(dims[1:])]] for (_, dims), a in zip(inputs, given)]


def simulate(s: Session, rknn: Any, valid: list[np.ndarray], names: list[str], path: Path) -> dict:
    """Every validation sample through the simulator; outputs stacked on axis 0 into path (.npz)."""
    s.step("init_runtime", rknn.init_runtime)
    t0, got = time.monotonic(), []
    for i in range(valid[0].shape[0]):
        outs = s.step("inference", rknn.inference, inputs=[a[i:i + 1] for a in valid],
                      data_format=["nchw"] * len(valid))
        if outs is None or len(outs) != len(names):
            raise Failed(f"inference on validation sample {i} gave {0 if outs is None else len(outs)} outputs; "
                         f"the model has {len(names)}")
        got.append([np.asarray(o) for o in outs])
    s.reply["seconds"]["inference"] = round(time.monotonic() - t0, 3)
    stacked = {n: np.concatenate([o[k] for o in got]) if got[0][k].ndim and got[0][k].shape[0] == 1
               else np.stack([o[k] for o in got]) for k, n in enumerate(names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".tmp"), "wb") as f:
        np.savez(f, **stacked)
    os.replace(path.with_name(path.name + ".tmp"), path)
    return stacked


def convert(req: dict, log: Log, reply: dict, work: Path) -> None:
    s = Session(log, reply)
    graph = s.step("read_onnx", read_graph, req["onnx"])
    inputs, names = graph["inputs"], [n for n, _ in graph["outputs"]]
    calib = read_samples(req["calibration"], inputs, "calibration") if req["calibration"] else None
    valid = read_samples(req["validation"], inputs, "validation") if req["validation"] else None
    sizes = fixed_sizes(inputs, calib or valid)
    dynamic = [any(d is None for d in dims) for _, dims in inputs]
    reply["inputs"] = [{"name": n, "shape": sz, "was_dynamic": dyn} for (n, _), sz, dyn in zip(inputs, sizes, dynamic)]
    reply["outputs"] = [{"name": n, "shape": dims} for n, dims in graph["outputs"]]
    reply["opset"] = graph["opset"]

    RKNN = s.step("import_rknn", importlib.import_module, "rknn.api").RKNN  # after the fd redirect: it prints
    reply["versions"].update({p: importlib.metadata.version(p)
                              for p in ("rknn-toolkit2", "numpy", "onnx", "onnxruntime", "torch")})
    rknn, int8 = RKNN(verbose=True), req["precision"] == "int8"
    s.step("config", rknn.config, mean_values=None, std_values=None, target_platform=req["platform"],
           quantized_dtype="w8a8", quantized_algorithm=req["quantized_algorithm"], float_dtype="float16",
           quantized_method=req["quantized_method"], optimization_level=req["optimization_level"])
    fixed = {"inputs": [n for n, _ in inputs], "input_size_list": sizes} if any(dynamic) else {}
    s.step("load_onnx", rknn.load_onnx, model=str(req["onnx"]), **fixed)
    dataset = write_dataset(calib, work / "calibration") if int8 else None
    resolved: list[dict] = []
    if req["float_layers"]:
        s.step("hybrid_quantization_step1", rknn.hybrid_quantization_step1, dataset=dataset, proposal=False)
        cfgs = sorted(work.glob("*.quantization.cfg"))
        if len(cfgs) != 1:
            raise Failed(f"hybrid_quantization_step1 wrote {len(cfgs)} .quantization.cfg files; expected one")
        stem, text = cfgs[0].name.removesuffix(".quantization.cfg"), cfgs[0].read_text()
        resolved, reply["float_between"] = resolve_float_layers(req["float_layers"], quantization_cfg_keys(text), graph)
        edited, marked = work / "float_layers.cfg", [t for r in resolved for t in r["layers"]] + reply["float_between"]
        edited.write_text(mark_float(text, list(dict.fromkeys(marked))))
        rknn.release()
        rknn = RKNN(verbose=True)
        s.step(built := "hybrid_quantization_step2", rknn.hybrid_quantization_step2,
               model_input=f"{work / stem}.model", data_input=f"{work / stem}.data", model_quantization_cfg=str(edited))
    else:
        built = "build"
        s.step(built, rknn.build, do_quantization=int8, dataset=dataset)
    reply["layers"] = parse_layer_table(s.text[built])
    reply["versions"]["librknnc"] = (re.findall(r"librknnc version: (\S+ \([^)]*\))", s.text[built]) or [None])[0]
    float16 = [row["node"] for row in reply["layers"] if row["dtype"].startswith("float")]
    quantized = {row["node"] for row in reply["layers"]} - set(float16)  # applied: no node of it left int8
    reply["float_layers"] = [{**r, "applied": not quantized & set(r["onnx_nodes"]) and any(f.startswith(
        r["layer"] + "__cvt_float16") or any(f == n or f.startswith((n + "_", n + "#")) for n in r["onnx_nodes"])
        for f in float16)} for r in resolved]
    req["out"].parent.mkdir(parents=True, exist_ok=True)
    s.step("export_rknn", rknn.export_rknn, str(req["out"]))
    reply["rknn"] = {"path": str(req["out"]), "bytes": req["out"].stat().st_size}
    if valid is not None:
        stacked = simulate(s, rknn, valid, names, req["outputs"])
        reply["outputs"] = [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in stacked.items()]
        reply["outputs_npz"] = str(req["outputs"])
    if req["accuracy_analysis"]:
        (work / "accuracy_input").mkdir()
        paths = [str(work / "accuracy_input" / f"{j}.npy") for j in range(len(valid))]
        for p, a in zip(paths, valid):
            np.save(p, a[:1])
        s.step("accuracy_analysis", rknn.accuracy_analysis, inputs=paths, output_dir=str(work / "snapshot"))
        reply["accuracy_analysis"] = parse_accuracy_table(work / "snapshot" / "error_analysis.txt")
    rknn.release()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: python worker.py REQUEST.json REPLY.json\n")
        return 2
    reply_path = Path(argv[2]).resolve()
    reply_path.parent.mkdir(parents=True, exist_ok=True)
    reply: dict[str, Any] = {"ok": False, "error": None, "seconds": {}, "warnings": [], "float_layers": [],
                             "accuracy_analysis": None, "versions": {"python": sys.version.split()[0]},
                             "log": str(reply_path.with_suffix(".log"))}
    work, log = reply_path.with_name(reply_path.name + ".work"), Log(reply_path.with_suffix(".log"))
    req, t0 = {}, time.monotonic()
    try:
        req = read_request(Path(argv[1]))
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        os.chdir(work)  # hybrid_quantization_step1 writes its files to the cwd
        convert(req, log, reply, work)
        reply["ok"] = True
    except Failed as e:
        reply["error"] = one_line(e)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: a reply is always written
        reply["error"] = one_line(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        reply["seconds"]["total"] = round(time.monotonic() - t0, 3)
        unique = list({(w["step"], w["text"]): w for w in reply["warnings"]}.values())
        reply["warnings"] = unique[:MAX_WARNINGS] + ([{"step": "", "text": f"{len(unique) - MAX_WARNINGS} more "
                                                       "warnings in the log"}] if len(unique) > MAX_WARNINGS else [])
        log.mark()
        os.chdir(reply_path.parent)
        if req.get("keep_work"):
            reply["work"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        reply_path.with_name(reply_path.name + ".tmp").write_text(json.dumps(reply, indent=1, default=str))
        os.replace(reply_path.with_name(reply_path.name + ".tmp"), reply_path)
    return 0 if reply["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
