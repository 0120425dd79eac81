"""Classify images with a package's ONNX Runtime artifact:
python run_onnxruntime.py PACKAGE IMAGE... [--artifact KEY]"""

import edgekit_package as ek
import onnxruntime as ort

args = ek.parse_args("onnxruntime")
manifest = ek.load_manifest(args.package)
artifact = ek.pick_artifact(manifest, "onnxruntime", args.artifact)
ek.check_runtime(manifest, artifact, "onnxruntime", ort.__version__)

session = ort.InferenceSession(str(ek.artifact_path(args.package, artifact)), providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
for image in args.images:
    scores = session.run(None, {name: ek.preprocess(image, manifest)})[0]
    ek.report(manifest, artifact, image, scores)
