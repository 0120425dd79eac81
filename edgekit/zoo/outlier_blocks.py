"""OutlierBlocks: a small classifier that post-training INT8 cannot keep, built to show what QAT recovers.

Each of `blocks` blocks is conv (3x3) -> ReLU -> conv "hostile<k>" (1x1) -> ReLU. The 3x3 conv's first two output
channels are `gain` times larger than the rest and vary with the input (massive activations, as transformers and
some detectors have): the per-tensor INT8 scale of its ReLU output is set by them. The hostile conv ignores them (zero
weights), so FP32 does not depend on them, but post-training INT8 at that scale rounds the useful channels to a few
levels. No calibrator can tell that the clipped channels do not matter (entropy trades some range away, and loses
the rest to clipping); keeping a block in float fixes that block only, and every block is hostile, so the float rung's
cap (a quarter of the layers) leaves most of them broken. Quantization-aware training learns ranges that clip the
ignored channels. The labels are the FP32 model's own top-1 (it is right by construction: a teacher), so accuracy is
the task metric and NNCF's accuracy control has its validation function.

    python -m edgekit.zoo.outlier_blocks DIR   # DIR/outlier_blocks.onnx, DIR/{train,calib,val}.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CHANNELS = 16
CLASSES = 10
SIZE = 16


def _he(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)


def outlier_blocks_onnx(path: Path, blocks: int = 4, gain: float = 300.0, seed: int = 0) -> Path:
    """Write the model (input `x` [1, 3, 16, 16], output `logits` [1, 10]) to `path`. The classifier's rows are
    standardised on random inputs (each logit zero-mean, unit-variance) so that every class is some input's top-1."""
    import onnx

    model = _graph(blocks, gain, seed, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    x = np.random.default_rng(seed + 100).standard_normal((256, 3, SIZE, SIZE)).astype(np.float32)
    logits = _run(path, x)
    onnx.save(_graph(blocks, gain, seed, (logits.mean(0), logits.std(0) + 1e-6)), path)
    return path


def _run(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": v[None]})[0] for v in x])


def _graph(blocks: int, gain: float, seed: int, standardise: tuple[np.ndarray, np.ndarray] | None):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = {"w_stem": _he(rng, (CHANNELS, 3, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["a0"], name="stem", pads=[1] * 4),
             helper.make_node("Relu", ["a0"], ["r0"], name="stem_relu")]
    prev = "r0"
    for k in range(1, blocks + 1):
        w, w_hostile = _he(rng, (CHANNELS, CHANNELS, 3, 3)), _he(rng, (CHANNELS, CHANNELS, 1, 1))
        w[:2] *= gain
        w_hostile[:, :2] = 0.0
        inits |= {f"w{k}": w, f"b{k}": np.zeros(CHANNELS, np.float32), f"w_hostile{k}": w_hostile}
        nodes += [helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", pads=[1] * 4),
                  helper.make_node("Relu", [f"c{k}"], [f"rc{k}"], name=f"relu{k}"),
                  helper.make_node("Conv", [f"rc{k}", f"w_hostile{k}"], [f"h{k}"], name=f"hostile{k}"),
                  helper.make_node("Relu", [f"h{k}"], [f"rh{k}"], name=f"hostile_relu{k}")]
        prev = f"rh{k}"
    fc, fcb = _he(rng, (CLASSES, CHANNELS * SIZE * SIZE)), np.zeros(CLASSES, np.float32)
    if standardise is not None:
        mean, std = standardise
        fc, fcb = (fc / std[:, None]).astype(np.float32), (-mean / std).astype(np.float32)
    inits |= {"fc": fc, "fcb": fcb}
    nodes += [helper.make_node("Flatten", [prev], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "outlier_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_data(root: Path, blocks: int = 4, train: int = 512, calib: int = 128, val: int = 256,
               margin: float = 1.0) -> Path:
    """The model and its three splits as .npz (`x` and `labels`), seeded: the same files on every run. Only inputs
    the FP32 model is sure of are kept (top-1 logit at least `margin` above the second, in logit standard
    deviations), as on a real data set where the model is confident: a coin-flip sample's label would flip under
    any change of arithmetic, and accuracy would measure that noise rather than the quantization."""
    model = outlier_blocks_onnx(root / "outlier_blocks.onnx", blocks)
    for seed, (name, n) in enumerate((("train", train), ("calib", calib), ("val", val)), start=1):
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        while sum(len(x) for x in xs) < n:
            x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
            logits = _run(model, x)
            top2 = np.sort(logits, axis=1)[:, -2:]
            sure = top2[:, 1] - top2[:, 0] >= margin
            xs.append(x[sure])
            ys.append(logits[sure].argmax(1))
        np.savez(root / f"{name}.npz", x=np.concatenate(xs)[:n], labels=np.concatenate(ys)[:n].astype(np.int64))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--blocks", type=int, default=4)
    a = p.parse_args()
    print(write_data(a.out, a.blocks))


if __name__ == "__main__":
    main()
