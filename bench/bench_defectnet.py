"""Benchmark: the bundled DefectNet on this CPU, every backend and precision, and the planner's choice.
Writes bench/results/defectnet-host-cpu.json.

Every figure is a ratio measured side by side in one interleaved run (these machines are shared and
noisy): edgekit's artifacts vs FP32 ONNX Runtime, and vs what a user gets from each library's defaults
(onnxruntime.quantization.quantize_static, nncf.quantize + openvino.save_model, pnnx with its default
fp16 storage), all verified on the same held-out images. The planner's choice (`edgekit build` with no
precision: plan first, then build what it chose) is timed in the same run against uniform FP32, uniform
INT8 and the libraries' defaults.

    .venv/bin/python bench/bench_defectnet.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _library_defaults(spec: Any, batches: list[dict], tmp: Path) -> dict[str, Any]:
    """Artifacts as a user gets them from each library with nothing but the calibration data set."""
    import nncf
    import openvino as ov
    import pnnx
    from onnxruntime.quantization import quantize_static

    from edgekit.backends.base import Artifact
    from edgekit.backends.ncnn.backend import _io_blobs

    class Reader:
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    arts = {}
    root = tmp / "ort-default-int8"
    root.mkdir()
    quantize_static(spec.onnx_path, str(root / "model.onnx"), Reader())
    arts["ort-default-int8"] = Artifact("onnxruntime", "int8", str(root), ["model.onnx"], "model.onnx")

    root = tmp / "nncf-default-int8"
    root.mkdir()
    ov.save_model(nncf.quantize(ov.convert_model(spec.onnx_path), nncf.Dataset(batches)), root / "model.xml")
    arts["nncf-default-int8"] = Artifact("openvino", "int8", str(root), ["model.xml", "model.bin"], "model.xml")

    root = tmp / "pnnx-default"
    root.mkdir()
    shutil.copyfile(spec.onnx_path, root / "m.onnx")
    shape = "[" + ",".join(str(d) for d in spec.inputs[0].shape) + "]"
    subprocess.run([pnnx.EXEC_PATH, "m.onnx", f"inputshape={shape}"], cwd=root, check=True, capture_output=True)
    for f in root.iterdir():
        if f.name not in ("m.ncnn.param", "m.ncnn.bin"):
            f.unlink()
    inputs, outputs = _io_blobs(root / "m.ncnn.param")
    arts["pnnx-default-fp16"] = Artifact("ncnn", "fp16", str(root), ["m.ncnn.param", "m.ncnn.bin"], "m.ncnn.param",
                                         {"input_blobs": inputs, "output_blobs": outputs,
                                          "output_shapes": [o.shape for o in spec.outputs]})
    return arts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per artifact, at least")
    ap.add_argument("--data", default=str(REPO / "calibration" / "defects"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "defectnet-host-cpu.json"))
    args = ap.parse_args(argv)

    from edgekit import backends
    from edgekit.backends.base import Artifact
    from edgekit.data import Preprocess, prepare_data
    from edgekit.ingest import ingest
    from edgekit.pipeline.build import build
    from edgekit.pipeline.options import BuildOptions
    from edgekit.profiling.timing import ProfileSettings, time_artifacts
    from edgekit.verify.verifier import Thresholds, run_all
    from edgekit.verify.verifier import verify_outputs as compare
    from edgekit.zoo.defects_data import generate

    data_dir = generate(Path(args.data))
    model = REPO / "examples" / "defects" / "defectnet.onnx"
    preprocess = REPO / "examples" / "defects" / "preprocess.yaml"
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        pkg = Path(tmp) / "pkg"
        result = build(BuildOptions(
            model=str(model), target="host-cpu", out=str(pkg), backend="all", precisions=["fp32", "fp16", "int8"],
            calib=str(data_dir / "calib"), val=str(data_dir / "val"), preprocess=str(preprocess),
            profile=ProfileSettings(seconds=0.2, min_runs=10), memory=False,
        ))
        manifest = result.manifest
        planned = build(BuildOptions(
            model=str(model), target="host-cpu", out=str(Path(tmp) / "planned"),
            calib=str(data_dir / "calib"), val=str(data_dir / "val"), preprocess=str(preprocess),
            profile=ProfileSettings(seconds=0.5, min_runs=20), memory=False,
        ))
        (choice,) = planned.manifest["artifacts"]
        spec = ingest(str(model), Path(tmp) / "work")
        data = prepare_data(spec, str(data_dir / "calib"), str(data_dir / "val"), Preprocess.from_file(preprocess))
        assert data.calibration is not None
        threads = manifest["artifacts"][0]["latency_ms"]["threads"]
        arts = {a["key"]: Artifact(a["backend"], a["precision"], str(result.path / Path(a["entry"]).parent),
                                   [Path(f["path"]).name for f in a["files"]], Path(a["entry"]).name, a["details"])
                for a in manifest["artifacts"]}
        defaults = _library_defaults(spec, data.calibration.batches(spec), Path(tmp))
        arts |= defaults
        arts["planner-choice"] = Artifact(choice["backend"], choice["precision"],
                                          str(planned.path / Path(choice["entry"]).parent),
                                          [Path(f["path"]).name for f in choice["files"]], Path(choice["entry"]).name,
                                          choice["details"])
        val = data.validation.batches(spec)
        labels = data.validation.batch_labels(spec)
        names = [o.name for o in spec.outputs]
        ref_out = run_all(backends.get("onnxruntime").load(arts["onnxruntime-fp32"], threads), val)
        quality = {k: compare(ref_out, run_all(backends.get(a.backend).load(a, threads), val), names, labels,
                              Thresholds()) for k, a in arts.items()}
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
        "method": "all sessions timed block-interleaved in one process; ratios vs onnxruntime-fp32 from the same run",
        "results": rows,
        "edgekit_vs_library_defaults": {
            f"{mine} vs {theirs}": {
                "speedup": round(lat[theirs].p50 / lat[mine].p50, 4),
                "bytes_ratio": round(sizes[mine] / sizes[theirs], 4),
                "accuracy_points": round((quality[mine].accuracy - quality[theirs].accuracy) * 100, 3),
                "cosine": [round(quality[mine].cosine_min, 6), round(quality[theirs].cosine_min, 6)],
            }
            for mine, theirs in [("onnxruntime-int8", "ort-default-int8"), ("openvino-int8", "nncf-default-int8"),
                                 ("ncnn-fp16", "pnnx-default-fp16")]
        },
        "planner": {
            "choice": choice["key"],
            "reason": planned.manifest["plan_reasons"][-1],
            "candidates": len(planned.manifest.get("candidates", [])),
            "vs": {
                other: {
                    "speedup": round(lat[other].p50 / lat["planner-choice"].p50, 4),
                    "bytes_ratio": round(sizes["planner-choice"] / sizes[other], 4),
                    "accuracy_points": round((quality["planner-choice"].accuracy - quality[other].accuracy) * 100, 3),
                }
                for other in ("onnxruntime-fp32", "onnxruntime-int8", "openvino-int8", "ncnn-int8",
                              "ort-default-int8", "nncf-default-int8")
            },
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
