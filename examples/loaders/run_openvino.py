"""Classify images with a package's OpenVINO artifact: python run_openvino.py PACKAGE IMAGE... [--artifact KEY]"""

import edgekit_package as ek
import openvino as ov

args = ek.parse_args("openvino")
manifest = ek.load_manifest(args.package)
artifact = ek.pick_artifact(manifest, "openvino", args.artifact)
ek.check_runtime(manifest, artifact, "openvino", ov.__version__)

# The precision hint edgekit verified with: without it a CPU with bf16 (AMX, AVX512_BF16) computes in bf16.
config = {"PERFORMANCE_HINT": "LATENCY",
          "INFERENCE_PRECISION_HINT": artifact["details"].get("inference_precision_hint", "f32")}
compiled = ov.Core().compile_model(str(ek.artifact_path(args.package, artifact)), "CPU", config)
for image in args.images:
    scores = compiled(ek.preprocess(image, manifest))[compiled.output(0)]
    ek.report(manifest, artifact, image, scores)
