"""Compare two packages, and gate a new package against a baseline (`edgekit compare`, `edgekit check`).

Latency ratios are only meaningful from one interleaved run on one machine (shared machines are noisy,
and two builds were timed at different times, maybe on different hosts), so by default both packages'
artifacts are re-timed here side by side in one fresh process; the manifests' recorded figures are the
fallback (`--recorded`, or a backend that cannot run here) and are labelled as such.

Ratios are always B / A: in `check`, new / baseline.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.backends.base import Artifact
from edgekit.errors import BadInput
from edgekit.packaging.model import ArtifactRecord, Package, load_package
from edgekit.profiling.side_by_side import SideBySide, paired_ratio, time_side_by_side
from edgekit.profiling.timing import ProfileSettings

SIDE_BY_SIDE = "side by side"  # re-measured now, on this host, in one interleaved run
RECORDED = "recorded"  # the manifest's latency_ms, measured when (and where) the package was built or profiled
ESTIMATE = "estimate"  # the manifest's cost-model estimate (a backend that cannot run where it was built)

# Without labels, accuracy cannot be compared: a drop of the worst-output cosine vs the FP32 reference
# beyond this counts as worse (INT8 of the bundled model sits near 0.9995; noise between builds ~1e-4).
DEFAULT_MAX_COSINE_DROP = 0.001


# ---------------------------------------------------------------- packages


# Package and load_package live in packaging/model.py (the one loader); imported above, importable here.


def artifact_of(package: Package, record: ArtifactRecord | dict[str, Any], check_sha256: bool = True) -> Artifact:
    """The Artifact a backend loads, rebuilt from the package's record (ArtifactRecord.to_artifact)."""
    rec = record if isinstance(record, ArtifactRecord) else ArtifactRecord.from_dict(record)
    return rec.to_artifact(package.path, check_sha256)


def feeds_of(manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Seeded random inputs of the manifest's shapes (dynamic dims: 1): timing does not depend on the
    values for these models, and each package gets inputs of its own shapes."""
    rng = np.random.default_rng(0)
    feeds = {}
    for t in manifest.get("inputs") or []:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in t["shape"]]
        dtype = np.dtype(t.get("dtype") or "float32")
        feeds[t["name"]] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                            else np.zeros(shape, dtype))
    return feeds


def why_not_timed_here(backend: str) -> str | None:
    """None when this host can time the backend's artifacts; else why not."""
    from edgekit import backends

    if backend not in backends.names():
        return f"edgekit has no backend {backend}"
    b = backends.get(backend)
    return b.missing() or b.measure_here()


def default_threads(*packages: Package) -> int:
    """The threads the packages were timed with at build (the last package's first), at most this host's
    cores: both sides get the same, so the ratio compares artifacts, not thread counts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for p in reversed(packages):
        for lat in [(p.manifest.get("reference") or {}).get("latency_ms")] + \
                   [a.get("host_latency_ms") or a.get("latency_ms") for a in p.manifest["artifacts"]]:
            # the build host's timing: a device's (ssh://) threads or an estimate's say nothing about this host
            if isinstance(lat, dict) and str(lat.get("where", "")).startswith("local:") and lat.get("threads"):
                return max(1, min(int(lat["threads"]), cores))
    return cores


# ---------------------------------------------------------------- comparison


@dataclass
class CompareOptions:
    recorded: bool = False  # use the manifests' latencies instead of timing here
    keys: list[str] | None = None  # only these artifact keys (None: all)
    matched_only: bool = False  # time only artifacts both packages have (check)
    settings: ProfileSettings = field(default_factory=lambda: ProfileSettings(seconds=1.0, min_runs=200))
    threads: int | None = None
    names: tuple[str, str] = ("A", "B")  # what the notes call the two packages (check: baseline, new)


def compare(a: Package, b: Package, opts: CompareOptions | None = None) -> dict[str, Any]:
    """The whole comparison of B against A as one JSON-able document (ratios are B / A)."""
    opts = opts or CompareOptions()
    arts_a, arts_b = a.artifacts, b.artifacts
    keys = list(dict.fromkeys([*arts_a, *arts_b]))
    if opts.keys is not None:
        keys = [k for k in keys if k in opts.keys]
    measured, timing = _latencies(a, b, keys, opts)
    rows = []
    for k in keys:
        ra, rb = arts_a.get(k), arts_b.get(k)
        row: dict[str, Any] = {"key": k, "in": "both" if ra and rb else ("a" if ra else "b"),
                               "backend": (ra or rb)["backend"], "precision": (ra or rb)["precision"]}  # type: ignore[index]
        row["bytes"] = _pair(ra and ra["bytes"], rb and rb["bytes"])
        row["latency"] = _latency_row(k, ra, rb, measured)
        row["same_files"] = bool(ra and rb) and _fingerprint(ra)[:2] == _fingerprint(rb)[:2]
        row["identical_files"] = row["same_files"] and _fingerprint(ra) == _fingerprint(rb)  # and loaded alike
        va, vb = (ra or {}).get("verification") or {}, (rb or {}).get("verification") or {}
        row["accuracy"] = _pair(va.get("accuracy"), vb.get("accuracy"), ratio=False)
        if row["accuracy"]["a"] is not None and row["accuracy"]["b"] is not None:
            row["accuracy"]["change_points"] = round(100 * (row["accuracy"]["b"] - row["accuracy"]["a"]), 4)
        ta, tb = va.get("task") or {}, vb.get("task") or {}
        same = ta.get("metric") == tb.get("metric")  # accuracy and mAP do not subtract
        row["task"] = {**_pair(ta.get("value") if same else None, tb.get("value") if same else None, ratio=False),
                       "metric": ta.get("metric") or tb.get("metric")}
        row["cosine"] = _pair(va.get("cosine_min"), vb.get("cosine_min"), ratio=False)
        row["verdict"] = {"a": _verdict(ra), "b": _verdict(rb)}
        row["settings"] = _diff(_flat((ra or {}).get("details") or {}), _flat((rb or {}).get("details") or {})) \
            if ra and rb else {}
        rows.append(row)
    ma, mb = a.manifest, b.manifest
    sa, sb = ma.get("source") or {}, mb.get("source") or {}
    return {
        "a": _describe(a), "b": _describe(b),
        "source": {"same": bool(sa.get("sha256")) and sa.get("sha256") == sb.get("sha256"),
                   "same_canonical": bool(sa.get("canonical_sha256"))
                   and sa.get("canonical_sha256") == sb.get("canonical_sha256"),
                   "a": _pick(sa, "path", "sha256", "canonical_sha256", "params", "macs", "opset"),
                   "b": _pick(sb, "path", "sha256", "canonical_sha256", "params", "macs", "opset")},
        "target": {"same": ma.get("target") == mb.get("target"), "a": ma.get("target"), "b": mb.get("target")},
        "toolchain": _diff(ma.get("toolchain") or {}, mb.get("toolchain") or {}),
        "data": _diff(ma.get("data") or {}, mb.get("data") or {}),
        "inputs": _diff({t["name"]: t.get("shape") for t in ma.get("inputs") or []},
                        {t["name"]: t.get("shape") for t in mb.get("inputs") or []}),
        "thresholds": _diff(ma.get("thresholds") or {}, mb.get("thresholds") or {}),
        "plan": _plan_diff(a, b),
        "latency": timing,
        "artifacts": rows,
    }


def _latencies(a: Package, b: Package, keys: list[str],
               opts: CompareOptions) -> tuple[SideBySide | None, dict[str, Any]]:
    """Both packages' artifacts timed side by side here ("a:KEY", "b:KEY"), where they can be, and how."""
    timing: dict[str, Any] = {"mode": RECORDED if opts.recorded else SIDE_BY_SIDE}
    if opts.recorded:
        na, nb = opts.names
        timing["note"] = ("recorded latencies from the two manifests, measured at different times "
                          f"({na} built {a.manifest.get('created')}, {nb} built {b.manifest.get('created')}); "
                          "only ratios from one interleaved run are reliable on a shared machine")
        return None, timing
    groups: list[dict[str, tuple[Artifact, dict[str, np.ndarray]]]] = []
    skipped: dict[str, str] = {}
    feeds = {"a": feeds_of(a.manifest), "b": feeds_of(b.manifest)}
    for k in keys:
        recs = {side: p.artifacts[k] for side, p in (("a", a), ("b", b)) if k in p.artifacts}
        if opts.matched_only and len(recs) < 2:
            continue
        why = why_not_timed_here(next(iter(recs.values()))["backend"])
        if why:
            skipped[k] = why
            continue
        groups.append({f"{side}:{k}": (artifact_of(a if side == "a" else b, rec), feeds[side])
                       for side, rec in recs.items()})
    threads = opts.threads or default_threads(a, b)
    timing |= {"threads": threads, "seconds": opts.settings.seconds, "min_runs": opts.settings.min_runs}
    if skipped:
        timing["not_timed_here"] = skipped
    if not groups:
        timing["mode"] = RECORDED
        timing["note"] = ("nothing can be timed on this host; the manifests' figures are used (recorded "
                          "measurements or cost-model estimates, as labelled)")
        return None, timing
    measured = time_side_by_side(groups, opts.settings, threads)
    runs = min(v.runs for v in measured.latency.values())
    rounds = min(len(v) for v in measured.rounds.values())
    timing |= {"runs": runs, "rounds": rounds}
    timing["note"] = (f"re-measured side by side on this host in one interleaved run ({threads} threads, "
                      f"{runs}+ runs each in {rounds} rounds; the paired ratio is the median over rounds of "
                      f"{opts.names[1]}'s block median / {opts.names[0]}'s, with its 95% interval)")
    return measured, timing


def _latency_row(key: str, ra: dict[str, Any] | None, rb: dict[str, Any] | None,
                 measured: SideBySide | None) -> dict[str, Any]:
    sides: dict[str, Any] = {}
    sources: dict[str, str | None] = {}
    for side, rec in (("a", ra), ("b", rb)):
        timed = measured.latency.get(f"{side}:{key}") if measured else None
        lat = timed.to_dict() if timed else None
        if lat is not None:
            sources[side] = SIDE_BY_SIDE
        elif rec and isinstance(rec.get("latency_ms"), dict):
            lat = rec["latency_ms"]
            sources[side] = ESTIMATE if lat.get("where") == ESTIMATE else RECORDED
        else:
            lat, sources[side] = None, None
        sides[side] = _pick(lat, "p50", "p99", "runs", "threads", "where") if lat else None
    known = {s for s in sources.values() if s}
    row: dict[str, Any] = {"source": known.pop() if len(known) == 1 else ("mixed" if known else None),
                           "source_a": sources["a"], "source_b": sources["b"], "a": sides["a"], "b": sides["b"]}
    if sides["a"] and sides["b"]:
        for q in ("p50", "p99"):
            row[f"{q}_ratio"] = _ratio(sides["a"].get(q), sides["b"].get(q))
        if measured and f"a:{key}" in measured.rounds and f"b:{key}" in measured.rounds:
            row["paired"] = paired_ratio(measured.rounds[f"a:{key}"], measured.rounds[f"b:{key}"])
        row["comparable"], row["note"] = _comparable(row)
    return row


def _comparable(row: dict[str, Any]) -> tuple[bool, str]:
    """Whether the two latencies can be divided: one interleaved run, or two estimates, or two recordings
    from the same place (with the caveat that they were taken at different times)."""
    sa, sb, wa, wb = row["source_a"], row["source_b"], row["a"].get("where"), row["b"].get("where")
    if sa == sb == SIDE_BY_SIDE:
        return True, f"side by side, {row['a']['runs']}/{row['b']['runs']} runs"
    if sa == sb == ESTIMATE:
        return True, "both cost-model estimates (not measurements)"
    if sa == sb == RECORDED:
        if wa == wb:
            return True, f"recorded at different times, both {wa}"
        return False, f"recorded in different places ({wa} vs {wb})"
    return False, f"one is {sa}, the other {sb}"


def _describe(p: Package) -> dict[str, Any]:
    m = p.manifest
    return {"path": str(p.path), "target": m.get("target"), "created": m.get("created"), "edgekit": m.get("edgekit"),
            "passed": m.get("passed"), "source_sha256": (m.get("source") or {}).get("sha256"),
            "host": (m.get("host") or {}).get("model"), "artifacts": list(p.artifacts)}


def _plan_diff(a: Package, b: Package) -> dict[str, Any]:
    """What the plans that built the two packages did differently: reasons, per-artifact settings
    (quantization, nodes kept in float, options), the candidate chosen, budgets."""
    ra, rb = a.manifest.get("plan_reasons") or [], b.manifest.get("plan_reasons") or []
    pa, pb = a.plan or {}, b.plan or {}
    settings_a, settings_b = _plan_settings(pa), _plan_settings(pb)
    per_artifact = {}
    for k in dict.fromkeys([*settings_a, *settings_b]):
        if k in settings_a and k in settings_b:
            d = _diff(settings_a[k], settings_b[k])
            if d:
                per_artifact[k] = d
    return {
        "reasons": {"only_a": [r for r in ra if r not in rb], "only_b": [r for r in rb if r not in ra]},
        "artifacts": per_artifact,
        "chosen": {"a": _chosen(a, pa), "b": _chosen(b, pb)},
        "budgets": _diff(pa.get("budgets") or {}, pb.get("budgets") or {}),
        "compress": _diff(_flat(pa.get("compress") or {}), _flat(pb.get("compress") or {})),
    }


def _plan_settings(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for ap in plan.get("artifacts") or []:
        if isinstance(ap, dict) and "backend" in ap and "precision" in ap:
            out[f"{ap['backend']}-{ap['precision']}"] = _flat({
                "quantization": ap.get("quantization"), "keep_fp32": ap.get("keep_fp32"), "options": ap.get("options")})
    return out


def _chosen(p: Package, plan: dict[str, Any]) -> str | None:
    for c in (p.manifest.get("candidates") or []) + (plan.get("candidates") or []):
        if isinstance(c, dict) and c.get("chosen"):
            return c.get("key")
    return None


def _fingerprint(rec: dict[str, Any] | None) -> Any:
    """What decides how an artifact runs here: its files (by sha256) and the settings it is loaded with."""
    if not rec:
        return None
    return sorted((f.get("path"), f.get("sha256")) for f in rec["files"]), rec["entry"], \
        json.dumps(rec.get("details") or {}, sort_keys=True, default=str)


def _verdict(rec: dict[str, Any] | None) -> str | None:
    if not rec:
        return None
    return "passed" if (rec.get("verification") or {}).get("passed") else "rejected"


def _pair(x: Any, y: Any, ratio: bool = True) -> dict[str, Any]:
    d = {"a": x, "b": y}
    if ratio:
        d["ratio"] = _ratio(x, y)
    return d


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(y / x, 4) if x and y is not None and x > 0 else None


def _pick(d: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: d.get(n) for n in names}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted names, so a difference deep inside (runtime_config.X) is named."""
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out |= _flat(v, name)
        else:
            out[name] = v
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: {a, b}} for every name whose value differs (absent on one side: None)."""
    return {k: {"a": a.get(k), "b": b.get(k)} for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}


# ---------------------------------------------------------------- the regression gate


def parse_percent(text: str) -> float:
    """'5%' and '5' both mean five percent (returned as 0.05); '0.05' means 0.05 percent. One rule,
    so a value never silently means a hundred times more than the user meant."""
    s = str(text).strip()
    number = s[:-1].strip() if s.endswith("%") else s
    try:
        value = float(number)
    except ValueError:
        raise BadInput(f"'{text}' is not a percentage: write e.g. 5% or 5 (both five percent)") from None
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"'{text}' is not a percentage >= 0: write e.g. 5% or 5 (both five percent)")
    return value / 100


@dataclass
class RegressionLimits:
    latency: float  # largest p50 increase accepted, as a fraction (0.05: 5%)
    accuracy_points: float  # largest accuracy drop accepted, percentage points
    size: float | None = None  # largest bytes increase accepted, as a fraction; None: not checked
    cosine: float = DEFAULT_MAX_COSINE_DROP  # without labels: largest drop of the worst-output cosine


def check(package: str | Path, baseline: str | Path, limits: RegressionLimits, opts: CompareOptions | None = None
          ) -> dict[str, Any]:
    """`edgekit check`: compare(baseline, new) and the gate's checks; `passed` is False when the new
    package is worse on any matched artifact."""
    new, base = load_package(package), load_package(baseline)
    opts = opts or CompareOptions(matched_only=True)
    opts.matched_only, opts.names = True, ("baseline", "new")
    common = [k for k in base.artifacts if k in new.artifacts]
    if not common:
        raise BadInput(f"no artifact in common: the baseline has {', '.join(base.artifacts) or 'none'}, "
                       f"{package} has {', '.join(new.artifacts) or 'none'}")
    unknown = [k for k in opts.keys or [] if k not in base.artifacts]
    if unknown:
        raise BadInput(f"no artifact {', '.join(unknown)} in the baseline; it has {', '.join(base.artifacts)}")
    comparison = compare(base, new, opts)  # A = baseline, B = new: ratios are new / baseline
    checks = gate(comparison, limits)
    return {"passed": not any(x["status"] == "FAIL" for x in checks), "checks": checks,
            "comparison": comparison, "new": new.path, "baseline": base.path}


def gate(comparison: dict[str, Any], limits: RegressionLimits) -> list[dict[str, Any]]:
    """The checks of `edgekit check` on compare(baseline, new): one dict per artifact and figure, with
    the limit, the figure, and status PASS, FAIL or n/a (not comparable; never fails the gate)."""
    checks: list[dict[str, Any]] = []
    other_data = "validation" in comparison["data"]

    def add(key: str, what: str, limit: str, figure: str, status: str, value: float | None = None,
            note: str = "") -> None:
        checks.append({"artifact": key, "check": what, "limit": limit, "figure": figure, "value": value,
                       "status": status, "passed": status != "FAIL", **({"note": note} if note else {})})

    for row in comparison["artifacts"]:
        k = row["key"]
        if row["in"] == "b":  # new in the new package: nothing to regress against
            continue
        if row["in"] == "a":
            add(k, "present", "in the new package", "missing", "FAIL")
            continue
        _latency_check(row, limits, add)
        _accuracy_check(row, limits, add, other_data)
        if limits.size is not None:
            r = row["bytes"]["ratio"]
            add(k, "size", f"<= +{limits.size:.1%}",
                f"{r:.3f}x ({row['bytes']['b']:,} vs {row['bytes']['a']:,} bytes)",
                "FAIL" if r - 1 > limits.size else "PASS", r)
        va, vb = row["verdict"]["a"], row["verdict"]["b"]
        add(k, "verification", "no passed -> rejected", f"{va} -> {vb}",
            "FAIL" if va == "passed" and vb != "passed" else "PASS")
    return checks


def _latency_check(row: dict[str, Any], limits: RegressionLimits, add: Any) -> None:
    lat, k, limit = row["latency"], row["key"], f"<= +{limits.latency:.1%}"
    r = lat.get("p50_ratio")
    if r is None:
        add(k, "latency p50", limit, "no latency on one side", "n/a")
        return
    p50s = f"p50 {lat['b']['p50']:.3f} vs {lat['a']['p50']:.3f} ms = {r:.3f}x, {lat['note']}"
    if not lat["comparable"]:
        add(k, "latency p50", limit, p50s, "n/a", r, "not comparable: " + lat["note"])
        return
    paired = lat.get("paired")
    if not paired:  # recorded figures or estimates: their p50 ratio is all there is
        add(k, "latency p50", limit, p50s, "FAIL" if r - 1 > limits.latency else "PASS", r)
        return
    est, lo, hi = paired["ratio"], paired["low"], paired["high"]
    interval = f" [{lo:.3f}-{hi:.3f}]" if lo is not None else ""
    figure = f"{est:.3f}x{interval} paired over {paired['rounds']} rounds ({p50s})"
    if row["identical_files"]:  # same bytes, same runtime, same process: any difference is the machine's noise
        add(k, "latency p50", limit, figure, "PASS", est, "identical files: the difference is noise")
        return
    # A regression: the best estimate is over the limit and the slowdown is real (its 95% interval is
    # above 1), so noise on a shared machine does not fail a build by chance.
    worse = est - 1 > limits.latency and (lo is None or lo > 1)
    add(k, "latency p50", limit, figure, "FAIL" if worse else "PASS", est)


def _accuracy_check(row: dict[str, Any], limits: RegressionLimits, add: Any, other_data: bool) -> None:
    k, acc, cos, task = row["key"], row["accuracy"], row["cosine"], row.get("task") or {}
    caveat = "the packages were validated on different data" if other_data else ""
    if task.get("a") is not None and task.get("b") is not None and task.get("metric") != "accuracy":
        drop = round(task["a"] - task["b"], 4)  # the task metric that decided, in points (mAP50-95, mIoU)
        add(k, task["metric"], f"drop <= {limits.accuracy_points:g} points",
            f"{task['b']:.2f} vs {task['a']:.2f} ({-drop + 0.0:+.2f} points)",
            "FAIL" if drop > limits.accuracy_points + 1e-9 else "PASS", drop, caveat)
    elif acc["a"] is not None and acc["b"] is not None:
        drop = round(100 * (acc["a"] - acc["b"]), 4)
        add(k, "accuracy", f"drop <= {limits.accuracy_points:g} points",
            f"{acc['b']:.2%} vs {acc['a']:.2%} ({-drop + 0.0:+.2f} points)",
            "FAIL" if drop > limits.accuracy_points + 1e-9 else "PASS", drop, caveat)
    elif cos["a"] is not None and cos["b"] is not None:  # no labels: agreement with the FP32 reference
        drop = round(cos["a"] - cos["b"], 6)
        add(k, "cosine vs FP32", f"drop <= {limits.cosine:g}", f"{cos['b']:.5f} vs {cos['a']:.5f}",
            "FAIL" if drop > limits.cosine + 1e-12 else "PASS", drop,
            "; ".join(x for x in ("no labels: worst-output cosine vs each package's FP32 reference", caveat) if x))
    else:
        add(k, "accuracy", f"drop <= {limits.accuracy_points:g} points", "not recorded", "n/a")
