"""Benchmark: the bundled DefectNet on this CPU. Writes bench/results/defectnet-host-cpu.json.

Every figure is a ratio measured side by side in one interleaved run (these machines are shared and
noisy): edgekit's artifacts vs the FP32 original, and vs what a user gets from the library's defaults
(onnxruntime.quantization.quantize_static with default settings).

    .venv/bin/python bench/bench_defectnet.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per model, at least")
    ap.add_argument("--data", default=str(REPO / "calibration" / "defects"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "defectnet-host-cpu.json"))
    args = ap.parse_args(argv)

    from onnxruntime.quantization import quantize_static

    from edgekit import backends
    from edgekit.backends.base import Artifact
    from edgekit.data import Preprocess, prepare_data
    from edgekit.ingest import ingest
    from edgekit.pipeline import BuildOptions, build
    from edgekit.profile import ProfileSettings, time_artifacts
    from edgekit.verify import Thresholds, compare, run_all
    from edgekit.zoo.defects_data import generate

    data_dir = generate(Path(args.data))
    model = REPO / "examples" / "defects" / "defectnet.onnx"
    preprocess = REPO / "examples" / "defects" / "preprocess.yaml"
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        pkg = Path(tmp) / "pkg"
        result = build(BuildOptions(
            model=str(model), target="host-cpu", out=str(pkg), precisions=["fp32", "fp16", "int8"],
            calib=str(data_dir / "calib"), val=str(data_dir / "val"), preprocess=str(preprocess),
            profile=ProfileSettings(seconds=0.2, min_runs=10), memory=False,
        ))
        manifest = result.manifest
        # The library's defaults, as a user would call them: same calibration data, nothing else set.
        spec = ingest(str(model), Path(tmp) / "work")
        data = prepare_data(spec, str(data_dir / "calib"), str(data_dir / "val"), Preprocess.from_file(preprocess))
        assert data.calibration is not None
        default_q = Path(tmp) / "ort_default_int8.onnx"
        batches = data.calibration.batches(spec)

        class Reader:
            def __init__(self) -> None:
                self.it = iter(batches)

            def get_next(self) -> dict | None:
                return next(self.it, None)

        quantize_static(spec.onnx_path, str(default_q), Reader())

        ort = backends.get("onnxruntime")
        threads = manifest["artifacts"][0]["latency_ms"]["threads"]
        arts = {a["key"]: Artifact(a["backend"], a["precision"], str(pkg), [a["entry"]], a["entry"])
                for a in manifest["artifacts"]}
        arts["ort-default-int8"] = Artifact("onnxruntime", "int8", tmp, [default_q.name], default_q.name)
        sessions = {k: ort.load(a, threads) for k, a in arts.items()}
        val = data.validation.batches(spec)
        labels = data.validation.batch_labels(spec)
        ref_out = run_all(sessions["onnxruntime-fp32"], val)
        quality = {k: compare(ref_out, run_all(s, val), [o.name for o in spec.outputs], labels, Thresholds())
                   for k, s in sessions.items()}
        del sessions
        lat = time_artifacts(arts, val[0], ProfileSettings(seconds=args.seconds, min_runs=100, max_runs=100000),
                             threads)
        sizes = {k: sum((Path(a.root) / f).stat().st_size for f in a.files) for k, a in arts.items()}

    base = "onnxruntime-fp32"
    rows = {}
    for k in arts:
        q = quality[k]
        rows[k] = {
            "bytes": sizes[k],
            "bytes_vs_fp32": round(sizes[k] / sizes[base], 4),
            "p50_ms": lat[k].p50,
            "p99_ms": lat[k].p99,
            "speedup_vs_fp32": round(lat[base].p50 / lat[k].p50, 4),
            "accuracy": q.accuracy,
            "accuracy_drop_points": round((q.reference_accuracy - q.accuracy) * 100, 3),
            "cosine": round(q.cosine_min, 6),
            "snr_db": round(q.snr_db_min, 2),
            "runs": lat[k].runs,
        }
    report = {
        "benchmark": "defectnet-host-cpu",
        "model": str(model.relative_to(REPO)),
        "host": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                 "python": platform.python_version()},
        "toolchain": manifest["toolchain"],
        "method": "all sessions timed round-robin in one process; ratios vs onnxruntime-fp32 from the same run",
        "results": rows,
        "edgekit_int8_vs_ort_default_int8": {
            "speedup": round(lat["ort-default-int8"].p50 / lat["onnxruntime-int8"].p50, 4),
            "accuracy_points": round((quality["onnxruntime-int8"].accuracy - quality["ort-default-int8"].accuracy)
                                     * 100, 3),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report["results"], sys.stdout, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
