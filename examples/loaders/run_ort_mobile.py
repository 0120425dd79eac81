"""Classify images with a package's ORT format (.ort, ONNX Runtime Mobile) artifact, as an Android/iOS
app does with onnxruntime-android / onnxruntime-objc: python run_ort_mobile.py PACKAGE IMAGE... [--artifact KEY]"""

import edgekit_package as ek
import onnxruntime as ort

args = ek.parse_args("ort-mobile")
manifest = ek.load_manifest(args.package)
artifact = ek.pick_artifact(manifest, "ort-mobile", args.artifact)
ek.check_runtime(manifest, artifact, "onnxruntime", ort.__version__)  # .ort files load in that version or newer

options = ort.SessionOptions()
options.add_session_config_entry("session.load_model_format", "ORT")
# session.enable_saved_runtime_optimizations=1: replay the CPU fusions saved in the file (INT8 runs
# Q/DQ in float without it); the same entries go into SessionOptions in Java/Kotlin/Swift.
for key, value in artifact["details"].get("runtime_options", {}).items():
    options.add_session_config_entry(key, str(value))
session = ort.InferenceSession(str(ek.artifact_path(args.package, artifact)), options,
                               providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
for image in args.images:
    scores = session.run(None, {name: ek.preprocess(image, manifest)})[0]
    ek.report(manifest, artifact, image, scores)
