"""Classify images with a package's NCNN artifact: python run_ncnn.py PACKAGE IMAGE... [--artifact KEY]"""

import edgekit_package as ek
import ncnn
import numpy as np

args = ek.parse_args("ncnn")
manifest = ek.load_manifest(args.package)
artifact = ek.pick_artifact(manifest, "ncnn", args.artifact)
ek.check_runtime(manifest, artifact, "ncnn", ncnn.__version__)
details, precision = artifact["details"], artifact["precision"]

net = ncnn.Net()
# Options before loading. ncnn turns on fp16/bf16 storage and arithmetic where the CPU has them, so
# compute what edgekit verified: fp16 storage only for FP16 artifacts, then the artifact's own options
# (INT8: use_int8_inference).
net.opt.use_vulkan_compute = False
net.opt.use_bf16_storage = False
net.opt.use_fp16_storage = net.opt.use_fp16_packed = precision == "fp16"
net.opt.use_fp16_arithmetic = False
net.opt.use_int8_inference = precision == "int8"
for option, value in details.get("runtime_options", {}).items():
    setattr(net.opt, option, value)
param = ek.artifact_path(args.package, artifact)
if net.load_param(str(param)) != 0 or net.load_model(str(param).replace(".param", ".bin")) != 0:
    raise SystemExit(f"ncnn could not load {param}")

for image in args.images:
    x = ek.preprocess(image, manifest)[0]  # ncnn has no batch axis
    # clone(): a Mat wrapped around a numpy array packs its channels back to back; ncnn aligns each to 16 bytes
    # and some layers (Crop) read it so: without the copy, odd sizes (a 31x15 input) come out shifted.
    ex = net.create_extractor()
    ex.input(details["input_blobs"][0], ncnn.Mat(x).clone())
    ret, out = ex.extract(details["output_blobs"][0])
    if ret != 0:
        raise SystemExit(f"ncnn could not compute {details['output_blobs'][0]} (error {ret})")
    ek.report(manifest, artifact, image, np.array(out))
