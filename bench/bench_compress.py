"""Benchmark: pruning + distillation of the bundled DefectNet on this CPU. Writes
bench/results/defectnet-compress-host-cpu.json.

original / pruned / pruned + fine-tuned (hard labels) / pruned + distilled / pruned + distilled + INT8
on every backend: MACs, bytes, latency and accuracy. Latencies come from one interleaved run inside the
build (the original FP32 model, the compressed FP32 model and every artifact side by side).

    .venv/bin/python bench/bench_compress.py [--prune 0.5] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prune", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per artifact, at least")
    ap.add_argument("--data", default=str(REPO / "calibration" / "defects"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "defectnet-compress-host-cpu.json"))
    args = ap.parse_args(argv)

    from edgekit.compress.stage import CompressOptions
    from edgekit.pipeline import BuildOptions, build
    from edgekit.profile import ProfileSettings
    from edgekit.zoo.defects_data import generate

    data_dir = generate(Path(args.data))
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        result = build(BuildOptions(
            model="edgekit.zoo.defectnet:defectnet", weights=str(REPO / "examples" / "defects" / "defectnet.pt"),
            input_shapes=["image=1,3,96,96"], target="host-cpu", out=str(Path(tmp) / "pkg"), backend="all",
            precisions=["fp32", "int8"], calib=str(data_dir / "calib"), val=str(data_dir / "val"),
            preprocess=str(REPO / "examples" / "defects" / "preprocess.yaml"),
            profile=ProfileSettings(seconds=args.seconds, min_runs=100), memory=False,
            compress=CompressOptions(prune=args.prune, distill=True, train=str(data_dir / "train"),
                                     epochs=args.epochs, augment="dihedral"),
        ))
    m = result.manifest
    c = m["compression"]
    before, after = c["latency_before_ms"]["p50"], c["latency_after_ms"]["p50"]
    rows = {
        "original": {"macs": c["macs_before"], "params": c["params_before"], "p50_ms": before,
                     "bytes": (REPO / "examples" / "defects" / "defectnet.onnx").stat().st_size,
                     "accuracy": c["accuracy"]["original"], "speedup_vs_original_fp32": 1.0},
        "pruned": {"macs": c["macs_after"], "params": c["params_after"], "p50_ms": after,
                   "bytes": next(a["bytes"] for a in m["artifacts"] if a["key"] == "onnxruntime-fp32"),
                   "accuracy": c["accuracy"].get("pruned"), "speedup_vs_original_fp32": round(before / after, 4)},
        "pruned+finetuned": {"accuracy": c["accuracy"].get("fine-tuned (hard labels)")},
        "pruned+distilled": {"macs": c["macs_after"], "p50_ms": after, "accuracy": c["accuracy"].get("distilled"),
                             "speedup_vs_original_fp32": round(before / after, 4)},
    }
    for a in m["artifacts"]:
        v = a["verification"]
        rows[f"pruned+distilled {a['key']}"] = {
            "bytes": a["bytes"], "p50_ms": a["latency_ms"]["p50"],
            "speedup_vs_original_fp32": round(before / a["latency_ms"]["p50"], 4),
            "accuracy": v["accuracy"], "cosine_vs_compressed_fp32": round(v["cosine_min"], 6), "passed": v["passed"],
        }
    report = {
        "benchmark": "defectnet-compress-host-cpu",
        "settings": {"prune": args.prune, "epochs": args.epochs, "importance": c["prune"]["settings"]["importance"],
                     "round_to": c["prune"]["round_to"]},
        "macs_ratio": c["macs_ratio"], "speedup_fp32": c["speedup_fp32"],
        "accuracy_drop_points": c["accuracy_drop_points"], "distill_stopped": c["distill"]["stopped"],
        "method": "original and compressed FP32 and every artifact timed block-interleaved in one process",
        "toolchain": m["toolchain"], "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report["results"], sys.stdout, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
