"""Debug: find the first layer where an artifact stops agreeing with the FP32 reference.

The reference's intermediate tensors come from ONNX Runtime on the canonical FP32 ONNX, in
topological order. The backend's come from its own runtime (Session.run_intermediates), in its
execution order. They are matched by name where the converter kept ONNX tensor names (ONNX Runtime,
OpenVINO), else by order and shape (NCNN renames and fuses: Conv+ReLU gives one tensor), and compared
in topological order; the first matched tensor below the cosine or SNR threshold, with a clear drop
from its inputs, names the culprit. For a rejected artifact where no tensor crosses a threshold (the
output failed on another figure, or error built up slowly), the layer that adds the most error is
named instead, marked so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekit.backends.base import Artifact, Session
from edgekit.errors import EdgekitError
from edgekit.ingest import ModelSpec
from edgekit.quantize.ops import WEIGHTED_OPS
from edgekit.verify.verifier import Thresholds

LOOKAHEAD = 6  # reference tensors a renamed backend tensor may skip (fused ops produce no tensor)
SNR_CAP_DB = 200.0


@dataclass
class LayerAgreement:
    tensor: str  # reference (ONNX) tensor name
    node: str  # ONNX node producing it
    op_type: str
    backend_tensor: str
    matched_by: str  # name | order+shape
    cosine: float
    snr_db: float
    max_abs_error: float


@dataclass
class Localisation:
    backend: str
    precision: str
    threshold: float  # cosine
    compared: int
    # node, op_type, figures, neighbours, criterion ("threshold" | "most added error")
    first_divergence: dict[str, Any] | None
    layers: list[LayerAgreement] = field(default_factory=list)
    snr_threshold: float | None = None  # None: localised on cosine alone
    worst: dict[str, Any] | None = None  # the layer adding the most error, whether or not it crosses
    # --package: the verdict the build gave this artifact (passed, failures, the task metric it missed or met)
    package_verdict: dict[str, Any] | None = None
    # A runtime whose tensors edgekit cannot read compares them itself (rknn-toolkit2's accuracy_analysis): its rows
    # {op, layer, entire_cos, entire_euc, single_cos, single_euc}, simulator vs float, in execution order.
    toolkit_table: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _criteria(self) -> str:
        snr = f", SNR >= {self.snr_threshold} dB" if self.snr_threshold is not None else ""
        return f"cosine >= {self.threshold}{snr}"

    def verdict_line(self) -> str | None:
        """What the package's build decided for this artifact, task metric first: the reason to debug it."""
        v = self.package_verdict
        if v is None:
            return None
        task = v.get("task") or {}
        said = "verified" if v.get("passed") else "REJECTED"
        parts = []
        if task.get("metric") and task.get("value") is not None:
            ref = task.get("reference")
            drop = task.get("drop_points")
            parts.append(f"{task['metric']} {task['value']:.2f}" + (f" vs {ref:.2f} ({task.get('vs', 'fp32')})"
                         if ref is not None else "") + (f", drop {drop:.2f} points" if drop is not None else ""))
        parts += [f for f in v.get("failures", []) if not (task.get("metric") and f.startswith(task["metric"]))]
        return f"the package's verdict: {said}" + (f": {'; '.join(parts)}" if parts else "") + \
            ("; the layers below show where its tensors part from FP32" if self.first_divergence else "")

    def summary(self) -> str:
        d = self.first_divergence
        if self.toolkit_table is not None:
            if d is None:
                return (f"{self.backend} {self.precision}: every layer of the toolkit's table keeps cosine >= "
                        f"{self.threshold} on its own ({len(self.toolkit_table)} layers)")
            return (f"{self.backend} {self.precision}: first layer losing agreement on its own {d['node']} "
                    f"({d['op_type']}): cosine {d['single_cos']:.4f} with float inputs, {d['entire_cos']:.4f} through "
                    "the whole model (rknn-toolkit2 accuracy_analysis)")
        if d is None:
            return f"{self.backend} {self.precision}: all {self.compared} matched tensors agree ({self._criteria()})"
        seen = f" (observed at {d['observed_at']}, fused with it)" if d.get("observed_at") else ""
        what = ("first diverging layer" if d.get("criterion") != MOST_ADDED_ERROR else
                f"no matched tensor crosses the thresholds ({self._criteria()}); the layer adding the most error is")
        return (f"{self.backend} {self.precision}: {what} {d['node']} ({d['op_type']}){seen}: cosine "
                f"{d['cosine']:.4f}, SNR {d['snr_db']:.1f} dB (inputs {d['input_snr_db']:.1f} dB), max |err| "
                f"{d['max_abs_error']:.4g}; inputs from {', '.join(d['inputs_from']) or 'the model input'}; "
                f"feeds {', '.join(d['feeds']) or 'the output'}")


def reference_session(spec: ModelSpec) -> Session:
    """The reference backend's session on the canonical FP32 ONNX (one thread)."""
    from edgekit import backends

    ref = backends.get(backends.REFERENCE_BACKEND)
    path = Path(spec.onnx_path)
    return ref.load(Artifact(ref.name, "fp32", str(path.parent), [path.name], path.name), 1)


def reference_intermediates(spec: ModelSpec, feeds: dict[str, np.ndarray], session: Session | None = None
                            ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every node output of the FP32 canonical model, by ONNX tensor name, in topological order."""
    got = (session or reference_session(spec)).run_intermediates(feeds)
    return {names[0]: arr for names, arr in got}, [names[0] for names, _ in got]


def localise(spec: ModelSpec, artifact: Artifact, session: Session, feeds: dict[str, np.ndarray],
             threshold: float | Thresholds = 0.99, name_worst: bool = True,
             reference: Session | None = None) -> Localisation:
    """session.run_intermediates(feeds) gives [(names, array)] in the backend's execution order.

    threshold: a cosine alone, or the verification Thresholds (the artifact's precision's cosine, and
    SNR): a layer diverges where a figure the output failed on first fails, with a clear drop.
    name_worst: the artifact was rejected, so when no layer crosses a threshold, first_divergence names
    the layer that adds the most error (`edgekit debug` on a possibly healthy artifact passes False).
    reference: the reference session (reference_session), when the caller localises several samples."""
    if isinstance(threshold, Thresholds):
        cosine, snr = threshold.cosine_for(artifact.precision), threshold.min_snr_db
    else:
        cosine, snr = threshold, None
    if not callable(getattr(session, "run_intermediates", None)):
        raise EdgekitError(f"a {artifact.backend} session cannot expose intermediate tensors (no run_intermediates)")
    model = spec.load()
    ref, order = reference_intermediates(spec, feeds, reference)
    got = session.run_intermediates(feeds)
    producer = {out: n for n in model.graph.node for out in n.output}
    layers = _match(ref, order, got, producer)
    compared = {la.tensor: la for la in layers}
    first = next((la for la in layers if _breaks(la, compared, producer, cosine, snr)), None)
    worst = max(layers, key=lambda la: _added_error(la, compared, producer), default=None)
    loc = Localisation(artifact.backend, artifact.precision, cosine, len(layers),
                       _describe(first, model, producer, compared, "threshold") if first else None, layers, snr,
                       _describe(worst, model, producer, compared, MOST_ADDED_ERROR) if worst else None)
    if loc.first_divergence is None and name_worst:
        loc.first_divergence = loc.worst
    return loc


# A layer breaks agreement when its output is below a threshold AND its SNR drops by at least this
# much from its inputs'. INT8 error accumulates ~0.5-2 dB per layer; an edited or mis-converted layer
# drops tens of dB at once.
BREAK_DB = 3.0
MOST_ADDED_ERROR = "most added error"


def _compared_inputs(tensor: str, compared: dict[str, LayerAgreement], producer: dict[str, onnx.NodeProto],
                     fused: list[onnx.NodeProto] | None = None) -> list[LayerAgreement]:
    """The nearest compared tensors upstream of `tensor`'s node; nodes passed on the way (fused away
    by the backend, so never observed) are collected in `fused`."""
    node = producer.get(tensor)
    found: list[LayerAgreement] = []
    for name in node.input if node else []:
        if name in compared:
            found.append(compared[name])
        elif name in producer:
            if fused is not None:
                fused.append(producer[name])
            found += _compared_inputs(name, compared, producer, fused)
    return found


def _breaks(la: LayerAgreement, compared: dict[str, LayerAgreement], producer: dict[str, onnx.NodeProto],
            threshold: float, snr_threshold: float | None) -> bool:
    """Agreement breaks here: below a threshold with a clear drop from its inputs. (INT8 error
    accumulates slowly through a network; that drift alone names no culprit.)"""
    if la.cosine >= threshold and (snr_threshold is None or la.snr_db >= snr_threshold):
        return False
    return la.snr_db <= _input_snr(la, compared, producer) - BREAK_DB


def _input_snr(la: LayerAgreement, compared: dict[str, LayerAgreement], producer: dict[str, onnx.NodeProto]) -> float:
    """The SNR of the noisiest compared input (the model input is exact: the cap)."""
    inputs = _compared_inputs(la.tensor, compared, producer)
    return min((i.snr_db for i in inputs), default=SNR_CAP_DB)


def _added_error(la: LayerAgreement, compared: dict[str, LayerAgreement], producer: dict[str, onnx.NodeProto]) -> float:
    """Relative error power this layer adds to what came in (1/SNR out - 1/SNR in, linear): a first
    layer going from exact input to 35 dB adds less than a later one going from 35 to 25 dB."""
    return 10 ** (-la.snr_db / 10) - 10 ** (-_input_snr(la, compared, producer) / 10)


# Candidates for a renamed backend tensor agreeing within this many dB are a tie (an op that changes nothing
# on this input, e.g. a ReLU after a conv whose outputs are all positive): the later one, the fused chain's end.
TIE_DB = 0.01


def _match(ref: dict[str, np.ndarray], order: list[str], got: list[tuple[list[str], np.ndarray]],
           producer: dict[str, onnx.NodeProto]) -> list[LayerAgreement]:
    rows: dict[str, LayerAgreement] = {}
    position = {name: i for i, name in enumerate(order)}
    cursor = 0
    for names, arr in got:
        known = next((n for n in names if n in ref and ref[n].size == arr.size), None)
        if known is not None:
            rows[known] = _row(known, producer, known, "name", ref[known], arr)
            cursor = max(cursor, position[known] + 1)
            continue
        name = names[0]
        # Renamed tensor: among the next few unmatched reference tensors of the same size, take the one whose
        # values agree best, scale included (a fused Conv+ReLU matches the ReLU output, not the Conv one; a
        # fused HardSwish x*relu6(x+3)/6 matches the Div output, not the Mul one six times larger, which points
        # the same way: direction alone cannot tell them apart).
        window = [r for r in order[cursor:cursor + LOOKAHEAD * 4] if ref[r].size == arr.size and r not in rows]
        window = window[:LOOKAHEAD]
        if not window:
            continue
        agreeing = [(_snr(ref[r], arr), r) for r in window if _cosine(ref[r], arr) >= 0.5]
        if agreeing:
            best = max(snr for snr, _ in agreeing)
            pick = [r for snr, r in agreeing if snr >= best - TIE_DB][-1]
        else:
            pick = window[0]  # nothing agrees: this is where it diverged
        rows[pick] = _row(pick, producer, name, "order+shape", ref[pick], arr)
        cursor = position[pick] + 1
    return sorted(rows.values(), key=lambda r: position[r.tensor])


def _snr(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - out|^2): how far the values are off, their scale included (capped)."""
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).reshape(-1)
    if not np.isfinite(o).all():
        return -SNR_CAP_DB
    noise, signal = float(((r - o) ** 2).sum()), float((r**2).sum())
    if noise == 0:
        return SNR_CAP_DB
    return float(np.clip(10 * np.log10(signal / noise), -SNR_CAP_DB, SNR_CAP_DB)) if signal > 0 else -SNR_CAP_DB


def _row(tensor: str, producer: dict[str, onnx.NodeProto], backend_tensor: str, how: str, ref: np.ndarray,
         out: np.ndarray) -> LayerAgreement:
    node = producer.get(tensor)
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).reshape(-1)
    if not np.isfinite(o).all():  # FP16 overflow: NaN would compare false with every threshold
        return LayerAgreement(tensor, node.name if node else tensor, node.op_type if node else "Input",
                              backend_tensor, how, -1.0, -SNR_CAP_DB, 1e30)
    snr = _snr(r, o)  # capped both ways: JSON has no infinity
    return LayerAgreement(tensor, node.name if node else tensor, node.op_type if node else "Input", backend_tensor,
                          how, round(_cosine(r, o), 6), round(float(snr), 2), float(np.abs(r - o).max()))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):  # an overflowed tensor (inf/NaN) agrees with nothing
        return -1.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def _describe(row: LayerAgreement, model: onnx.ModelProto, producer: dict[str, onnx.NodeProto],
              compared: dict[str, LayerAgreement], criterion: str) -> dict[str, Any]:
    """The culprit: the node that produced the first broken tensor, or, when the backend fused a
    weighted op into it (Conv+ReLU), that weighted op: an activation has no weights to be wrong."""
    fused: list[onnx.NodeProto] = []
    _compared_inputs(row.tensor, compared, producer, fused)
    node = producer.get(row.tensor)
    culprit = node
    if node is not None and node.op_type not in WEIGHTED_OPS:
        culprit = next((n for n in fused if n.op_type in WEIGHTED_OPS), node)
    inputs_from = [producer[i].name for i in (culprit.input if culprit else []) if i in producer]
    feeds = [n.name for n in model.graph.node if culprit and set(culprit.output) & set(n.input)]
    described = {**asdict(row), "inputs_from": inputs_from, "feeds": feeds, "criterion": criterion,
                 "input_snr_db": round(_input_snr(row, compared, producer), 2)}
    if culprit is not node and culprit is not None:
        described.update(node=culprit.name, op_type=culprit.op_type, observed_at=row.node,
                         fused_with=[n.name for n in fused if n is not culprit] + [row.node])
    return described


def run_debug(model: str, target: str, backend: str, precision: str, package: str | None, calib: str | None,
              val: str | None, preprocess: str | None, input_shapes: list[str], weights: str | None,
              samples: int, threshold: float, out: str | None,
              snr_threshold: float | None = None, emulate: bool = False) -> tuple[Localisation, Path]:
    """`edgekit debug`: localise on a package's artifact, or on one built here for the purpose. The
    artifact may be healthy: a divergence is named only where a tensor crosses a threshold (cosine,
    and SNR when snr_threshold is given); the layer adding the most error is reported either way."""
    import tempfile

    from edgekit import backends
    from edgekit.data import Preprocess, prepare_data
    from edgekit.errors import BadInput
    from edgekit.ingest import ingest, parse_input_shapes
    from edgekit.packaging.manifest import write_json
    from edgekit.planning.select import default_plan, resolve_backends, resolve_precisions
    from edgekit.targets import load_target

    t = load_target(target)
    (chosen,) = resolve_backends(t, backend, [])
    resolve_precisions(t, chosen, [precision], bool(calib), [])
    pre = Preprocess.from_file(preprocess) if preprocess else None
    out_dir = Path(out or f"build/debug-{Path(model.split(':')[-1]).stem}-{backend}-{precision}")
    with tempfile.TemporaryDirectory(prefix="edgekit-debug-") as work:
        spec = ingest(model, work, parse_input_shapes(input_shapes), weights)
        data = prepare_data(spec, calib, val, pre, val_samples=samples)
        if package:
            from edgekit.packaging.model import load_package

            loaded = load_package(package)  # every path checked to stay inside the package
            rec = next((r for r in loaded.records if r.backend == backend and r.precision == precision), None)
            if rec is None:
                raise BadInput(f"{package} has no {backend} {precision} artifact")
            artifact = rec.to_artifact(loaded.path, check_sha256=False)
            ver = rec.verification
            verdict = None if ver is None else {"passed": ver.passed, "failures": list(ver.failures),
                                                "task": ver.task}
        else:
            verdict = None
            ap = default_plan(spec, t, backend, [precision]).artifacts[0]
            folder = Path(work) / "artifact"
            folder.mkdir()
            artifact = chosen.export(spec, ap, data.calibration, folder)
        session = backends.get(backend).load(artifact, 1)
        if callable(getattr(session, "layer_report", None)):  # the runtime compares its own layers
            loc = _toolkit_localisation(session, artifact, data.validation.batches(spec)[0], threshold)
            loc.package_verdict = verdict
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(out_dir / "layers.json", loc.to_dict())
            (out_dir / "report.md").write_text(_markdown(loc))
            return loc, out_dir
        if emulate:
            session = _emulated_session(t, chosen, artifact, spec, session, from_package=bool(package))
        reference = reference_session(spec)
        feeds_list = data.validation.batches(spec)[:samples]
        criteria: float | Thresholds = threshold if snr_threshold is None else Thresholds(
            min_cosine=threshold, min_snr_db=snr_threshold, min_cosine_fp16=threshold)
        locs = [localise(spec, artifact, session, feeds, criteria, name_worst=False, reference=reference)
                for feeds in feeds_list]
    # The sample whose divergence comes earliest in the graph is the one to show.
    order = {la.tensor: i for i, la in enumerate(locs[0].layers)}
    loc = min(locs, key=lambda lc: order.get(lc.first_divergence["tensor"], 1 << 30) if lc.first_divergence
              else 1 << 31)
    loc.package_verdict = verdict
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "layers.json", loc.to_dict())
    (out_dir / "report.md").write_text(_markdown(loc))
    return loc, out_dir


def _toolkit_localisation(session: Any, artifact: Artifact, feeds: dict[str, np.ndarray],
                          threshold: float) -> Localisation:
    """The runtime's own per-layer table (entire: through the quantized model so far; single: this layer alone on
    float inputs); the first layer whose single cosine falls below the threshold is the one to keep in float."""
    rows = session.layer_report(feeds)
    first = next((r for r in rows if r.get("single_cos") is not None and r["single_cos"] < threshold), None)
    described = None if first is None else {"node": first["layer"], "op_type": first["op"], "criterion": "toolkit",
                                            "single_cos": first["single_cos"], "entire_cos": first["entire_cos"]}
    return Localisation(artifact.backend, artifact.precision, threshold, len(rows), described, toolkit_table=rows)


def _emulated_session(target: Any, backend: Any, artifact: Artifact, spec: ModelSpec, host: Session,
                      from_package: bool) -> Session:
    """The artifact run on the target's CPU under qemu (debug --emulate). One built here for the purpose runs in
    the backend's fastest mode there (ncnn FP16: fp16 arithmetic); a package's as it ships."""
    from edgekit.console import note
    from edgekit.emulate import ensure_emulator, qemu_cpu
    from edgekit.emulate.session import EmulatedSession
    from edgekit.errors import BadInput

    cpu = target.emulated_cpu
    if cpu is None:
        raise BadInput(f"--emulate: target {target.name} computes as this host does (no isa.cpu of another "
                       "architecture in its target file): debug without --emulate")
    if not backend.verifies_under_emulation:
        raise BadInput(f"--emulate: {backend.name} artifacts do not run under qemu here; debug without --emulate")
    model, stand_in = qemu_cpu(cpu)
    emulator = ensure_emulator(list(backend.runtime_distributions), backend.emulation_fallbacks)
    if not from_package:
        label, options = backend.emulation_variants(artifact, list(target.cpu.get("isa", [])))[0]
        artifact.details["runtime_options"] = {**(artifact.details.get("runtime_options") or {}), **options}
        note(f"debug on qemu-aarch64 {model}: {label}")
    if stand_in:
        note(stand_in)
    inputs = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in spec.inputs]
    return EmulatedSession(emulator, model, artifact, inputs, list(backend.runtime_distributions), host)


def _markdown(loc: Localisation) -> str:
    verdict = loc.verdict_line()
    lines = [f"# {loc.backend} {loc.precision}: layer-by-layer agreement with FP32", "",
             *([verdict, ""] if verdict else []), loc.summary(), ""]
    w = loc.worst
    if w is not None and loc.first_divergence is not w:
        lines += [f"Layer adding the most error: {w['node']} ({w['op_type']}), SNR {w['snr_db']:.1f} dB from "
                  f"{w['input_snr_db']:.1f} dB at its inputs.", ""]
    if loc.toolkit_table is not None:
        lines += ["| layer | op | cosine through the model | cosine alone | euclidean alone |", "|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['op']} | {_num(r['entire_cos'])} | {_num(r['single_cos'])} | "
                  f"{_num(r['single_euc'])} |" for r in loc.toolkit_table]
        return "\n".join(lines) + "\n"
    lines += ["| node | op | matched by | cosine | SNR dB | max abs err |", "|---|---|---|---|---|---|"]
    lines += [f"| {la.node} | {la.op_type} | {la.matched_by} | {la.cosine:.5f} | {la.snr_db:.1f} | "
              f"{la.max_abs_error:.4g} |" for la in loc.layers]
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.5f}"
