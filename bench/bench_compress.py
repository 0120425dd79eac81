"""Benchmark: pruning + distillation of the bundled DefectNet on this CPU. Writes
bench/results/defectnet-compress-host-cpu.json, one entry per source under "runs" (a run from one
source leaves the other's entry as it was).

original / pruned / pruned + fine-tuned (hard labels) / pruned + distilled / pruned + distilled + INT8
on every backend: MACs, bytes, latency and accuracy. Latencies come from one interleaved run inside the
build (the original FP32 model, the compressed FP32 model and every artifact side by side).

`--source onnx` (the default: users bring ONNX) starts from examples/defects/defectnet.onnx, which
edgekit converts to torch itself; `--source pytorch` from the factory and its state_dict.

    .venv/bin/python bench/bench_compress.py [--source onnx|pytorch] [--prune 0.5] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFECTS = REPO / "examples" / "defects"
# The acceptance this benchmark checks (host-cpu, ONNX Runtime FP32, same threads, side by side).
MAX_MACS_RATIO = 0.55
MIN_SPEEDUP = 1.5
MAX_DROP_POINTS = 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["onnx", "pytorch"], default="onnx",
                    help="start from the bundled ONNX (default) or from the PyTorch factory + weights")
    ap.add_argument("--prune", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per artifact, at least")
    ap.add_argument("--data", default=str(REPO / "calibration" / "defects"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "defectnet-compress-host-cpu.json"))
    args = ap.parse_args(argv)

    from edgekit.compress.stage import CompressOptions
    from edgekit.pipeline.build import build
    from edgekit.pipeline.options import BuildOptions
    from edgekit.profiling.timing import ProfileSettings
    from edgekit.zoo.defects_data import generate

    data_dir = generate(Path(args.data))
    model = (dict(model=str(DEFECTS / "defectnet.onnx")) if args.source == "onnx" else
             dict(model="edgekit.zoo.defectnet:defectnet", weights=str(DEFECTS / "defectnet.pt"),
                  input_shapes=["image=1,3,96,96"]))
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        result = build(BuildOptions(
            **model, target="host-cpu", out=str(Path(tmp) / "pkg"), backend="all",
            precisions=["fp32", "int8"], calib=str(data_dir / "calib"), val=str(data_dir / "val"),
            preprocess=str(DEFECTS / "preprocess.yaml"),
            profile=ProfileSettings(seconds=args.seconds, min_runs=100), memory=False,
            compress=CompressOptions(prune=args.prune, distill=True, train=str(data_dir / "train"),
                                     epochs=args.epochs, augment="dihedral", precision="fp32,int8"),
        ))
    run = _summary(result.manifest, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    runs = previous.get("runs", {})
    runs[args.source] = run
    report = {"benchmark": "defectnet-compress-host-cpu",
              "acceptance": {"macs_ratio_at_most": MAX_MACS_RATIO, "speedup_fp32_at_least": MIN_SPEEDUP,
                             "accuracy_drop_points_at_most": MAX_DROP_POINTS},
              "runs": dict(sorted(runs.items()))}
    out.write_text(json.dumps(report, indent=2) + "\n")
    json.dump({k: run[k] for k in ("macs_ratio", "speedup_fp32", "accuracy", "accepted")}, sys.stdout, indent=1)
    print(f"\nwrote {out} (runs.{args.source})")
    return 0 if run["accepted"]["all"] else 1


def _summary(m: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    c = m["compression"]
    before, after = c["latency_before_ms"]["p50"], c["latency_after_ms"]["p50"]
    acc = c["accuracy"]
    rows = {
        "original": {"macs": c["macs_before"], "params": c["params_before"], "p50_ms": before,
                     "bytes": (DEFECTS / "defectnet.onnx").stat().st_size,
                     "accuracy": acc["original"], "speedup_vs_original_fp32": 1.0},
        "pruned": {"macs": c["macs_after"], "params": c["params_after"], "p50_ms": after,
                   "bytes": next(a["bytes"] for a in m["artifacts"] if a["key"] == "onnxruntime-fp32"),
                   "accuracy": acc.get("pruned"), "speedup_vs_original_fp32": round(before / after, 4)},
        "pruned+finetuned": {"accuracy": acc.get("fine-tuned (hard labels)")},
        "pruned+distilled": {"macs": c["macs_after"], "p50_ms": after, "accuracy": acc.get("distilled"),
                             "speedup_vs_original_fp32": round(before / after, 4)},
    }
    for a in m["artifacts"]:
        v = a["verification"]
        rows[f"pruned+distilled {a['key']}"] = {
            "bytes": a["bytes"], "p50_ms": a["latency_ms"]["p50"],
            "speedup_vs_original_fp32": round(before / a["latency_ms"]["p50"], 4),
            "accuracy": v["accuracy"], "cosine_vs_compressed_fp32": round(v["cosine_min"], 6), "passed": v["passed"],
        }
    accepted = {"macs": c["macs_ratio"] <= MAX_MACS_RATIO, "speedup": c["speedup_fp32"] >= MIN_SPEEDUP,
                "accuracy": c["accuracy_drop_points"] <= MAX_DROP_POINTS}
    return {
        "command": f".venv/bin/python bench/bench_compress.py --source {args.source} --prune {args.prune} "
                   f"--epochs {args.epochs}",
        "source": m["source"]["path"],
        "settings": {"prune": args.prune, "epochs": args.epochs, "importance": c["prune"]["settings"]["importance"],
                     "round_to": c["prune"]["round_to"], "round_to_reason": c["prune"]["round_to_reason"]},
        "macs_ratio": c["macs_ratio"], "speedup_fp32": c["speedup_fp32"],
        "accuracy": {stage: acc.get(stage) for stage in ("original", "pruned", "fine-tuned (hard labels)",
                                                          "distilled")},
        "accuracy_drop_points": c["accuracy_drop_points"], "accepted": accepted | {"all": all(accepted.values())},
        "finetune_history": [h.get("accuracy") for h in c["finetune"]["history"]],
        "distill_history": [h.get("accuracy") for h in c["distill"]["history"]],
        "distill_stopped": c["distill"]["stopped"], "threads": c["latency_after_ms"]["threads"],
        "method": "original and compressed FP32 and every artifact timed block-interleaved in one process",
        "toolchain": m["toolchain"], "results": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
