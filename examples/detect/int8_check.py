"""How much uniform INT8 costs the bundled DefectDet: ONNX Runtime quantize_static, Q/DQ, per-channel weights,
MinMax calibration on the calib split, mAP on the val split; once for the whole model and once with the
decode head (every op after the last prediction convs, down to the final Concat) left in float.

    nice -n 10 python examples/detect/int8_check.py [--onnx examples/detect/defectdet.onnx]

Activations are uint8 asymmetric and weights int8 symmetric, as edgekit's ONNX Runtime backend does it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from detect_eval import coco_map, run_model  # noqa: E402
from train import load_preprocess, preprocess  # noqa: E402

from edgekit.zoo.defect_boxes import CLASSES, make_detection_arrays  # noqa: E402

CALIB_SEED, VAL_SEED = 1, 2


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.items = iter([{"images": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Every node downstream of the prediction convs (the Convs that feed a Reshape): the decode head."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: n for n in model.graph.node for o in n.output}
    starts = [n for n in model.graph.node if n.op_type == "Conv"
              and any(c.op_type == "Reshape" for c in consumers.get(n.output[0], []))]
    seen: dict[str, None] = {}
    frontier = [c for n in starts for c in consumers.get(n.output[0], [])]
    while frontier:
        node = frontier.pop()
        if node.name in seen:
            continue
        seen[node.name] = None
        frontier.extend(c for o in node.output for c in consumers.get(o, []))
    assert producer[model.graph.output[0].name].name in seen, "the output's Concat must be in the head"
    return list(seen)


def quantize(src: Path, dst: Path, calib: np.ndarray, exclude: list[str] | None) -> None:
    quantize_static(str(src), str(dst), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options={"WeightSymmetric": True})


def evaluate(path: Path, xv: np.ndarray, gts: list[np.ndarray]) -> tuple[float, float]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return coco_map(run_model(lambda b: sess.run(["output0"], {"images": b})[0], xv), gts, xv.shape[2:],
                    len(CLASSES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=HERE / "defectdet.onnx")
    parser.add_argument("--n-calib", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=200)
    args = parser.parse_args(argv)
    cfg = load_preprocess(HERE / "preprocess.yaml")
    size = cfg["size"][0]
    calib = preprocess(make_detection_arrays(args.n_calib, CALIB_SEED, size)[0], cfg)
    vimgs, vboxes = make_detection_arrays(args.n_val, VAL_SEED, size)
    xv = preprocess(vimgs, cfg)
    with tempfile.TemporaryDirectory(prefix="defectdet-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(args.onnx), str(pre))
        head = head_nodes(onnx.load(str(pre)))
        print(f"decode head: {len(head)} nodes ({', '.join(sorted({n.split('/')[-1] for n in head}))})")
        results = {"FP32": evaluate(args.onnx, xv, vboxes)}
        for label, exclude in (("INT8 whole model", None), ("INT8, head in float", head)):
            dst = Path(tmp) / "q.onnx"
            quantize(pre, dst, calib, exclude)
            results[label] = evaluate(dst, xv, vboxes)
    fp = results["FP32"]
    for label, (m5095, m50) in results.items():
        delta = f"  ({100 * (m5095 - fp[0]):+.1f} / {100 * (m50 - fp[1]):+.1f} points)" if label != "FP32" else ""
        print(f"{label:<22} mAP50-95 {m5095:.4f}  mAP50 {m50:.4f}{delta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
