"""The recovery ladder's last rung: quantization-aware training (edgekit.quantize.qat, NNCF's PyTorch QAT).

One attempt: the backend's INT8 built from the Q/DQ ONNX that QAT wrote (QuantizationSettings.qdq_model),
where the backend takes one (Backend.takes_qdq_onnx); trained on --train (Rejected.train), or without it
on the calibration samples (the validation samples that decide acceptance are never trained on), for
Rejected.qat_epochs epochs within the ladder's time left (Rejected.deadline). Skipped, the ladder's record
saying why, without torch/NNCF, for a backend that cannot take a Q/DQ model, or when the model cannot be
turned into a PyTorch module.

The QAT model is trained once per model, data and settings: cached by the build cache (stage "qat") and
shared by every backend of the build. Its file is named by that key, so the export cache, keyed by the
settings, never serves an artifact of another training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit import backends
from edgekit.console import note
from edgekit.errors import EdgekitError
from edgekit.pipeline.recovery import Attempt

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.pipeline.recovery import Rejected

DEFAULT_EPOCHS = 3
MAX_TRAIN_SAMPLES = 2000  # a short fine-tune: more samples than this are a longer one (a seeded subset)
SEED = 0


def qat_rung(r: Rejected) -> Iterator[Attempt]:
    """One attempt built from QAT's Q/DQ ONNX. Where the rung cannot run (no torch/NNCF, a backend that takes no
    Q/DQ ONNX, a model with no PyTorch module) it raises EdgekitError saying why: the ladder records that in its
    table and goes on without an attempt."""
    ap, q = r.plan, r.plan.quantization
    if q is None or q.qdq_model:
        return
    backend = backends.get(ap.backend)
    if not backend.takes_qdq_onnx:
        raise EdgekitError(f"{ap.backend} cannot take a quantization-aware-trained model: its INT8 is made by its own "
                           "quantizer from the FP32 model, not read from a Q/DQ ONNX (Backend.takes_qdq_onnx)")
    missing = [m for m in ("torch", "nncf") if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgekitError(f"quantization-aware training needs {' and '.join(missing)}: "
                           "pip install 'edgekit[torch,openvino]'")
    train, source = _training_data(r)
    if train is None:
        raise EdgekitError("quantization-aware training has no training or calibration samples")
    epochs = r.qat_epochs or DEFAULT_EPOCHS
    budget = max(1.0, r.deadline - time.monotonic()) if r.deadline is not None else None  # the ladder's time left
    note(f"{ap.backend} int8 rejected; quantization-aware training ({epochs} epoch(s) on {source})")
    path, result = _train(r, train, epochs, budget)  # EdgekitError (NotConvertible included): recorded, no attempt
    stopped = f" (time budget: {result['epochs']} of {epochs})" if result["epochs"] < epochs else ""
    setting = (f"QAT ({result['library']}), {result['epochs']} epoch(s){stopped}, {result['steps']} steps on {source}; "
               f"loss {result['loss_first']:.4g} -> {result['loss_last']:.4g}")
    why = (f"quantization-aware training: {setting}; INT8 from its Q/DQ model meets the budgets that post-training "
           f"INT8 missed ({'; '.join(r.verification.failures)})")
    yield Attempt(dataclasses.replace(q, qdq_model=str(path)), f"qat-{ap.backend}-int8", why, setting=setting)


def _training_data(r: Rejected) -> tuple[Dataset | None, str]:
    """--train (images folder or .npz, loaded like the calibration data), else the calibration samples."""
    from edgekit.data import open_source

    path = r.train
    if not path:
        cal = r.data.calibration
        return (cal, f"the {len(cal)} calibration samples (no --train given)") if cal is not None and len(cal) \
            else (None, "")
    preprocess = getattr(r.data.calibration, "preprocess", None)  # how the calibration images were read
    src = open_source(path, r.spec, preprocess, "training")
    idx = np.arange(src.count)
    if src.count > MAX_TRAIN_SAMPLES:
        idx = np.sort(np.random.default_rng(SEED).permutation(src.count)[:MAX_TRAIN_SAMPLES])
    data = src.load(idx, r.spec, "training")
    labelled = " with labels" if data.labels is not None else ""
    return data, f"{len(data)} training samples from {path}{labelled}"


def _train(r: Rejected, train: Dataset, epochs: int, budget_s: float | None) -> tuple[Path, dict[str, Any]]:
    """The QAT model of (model, data, epochs), from the build cache when it was trained before; else trained
    and cached (unless the time budget cut it short: that one depends on the machine's speed)."""
    from edgekit.cache import digest

    stages = r.verifier.stages
    calibration = r.data.calibration if r.data.calibration is not None and len(r.data.calibration) else train
    key = digest("qat", r.spec.sha256, stages.data(train), stages.data(calibration), epochs, SEED,
                 {m: metadata.version(m) for m in ("torch", "nncf", "onnx")})
    folder = r.work / "qat"
    name, record = f"{key[:16]}.onnx", folder / f"{key[:16]}.json"
    if record.is_file() and (folder / name).is_file():  # trained in this build already (another backend's rung)
        return folder / name, json.loads(record.read_text())
    meta = stages.cache.get_tree("qat", key, folder, "quantization-aware training")
    if meta is not None and (folder / name).is_file():
        return folder / name, meta
    from edgekit.quantize.qat import quantization_aware_training

    folder.mkdir(parents=True, exist_ok=True)
    res = quantization_aware_training(r.spec, train, calibration, epochs, folder / name, seed=SEED,
                                      budget_s=budget_s, threads=r.verifier.threads)
    meta = {k: v for k, v in dataclasses.asdict(res).items() if k != "qdq_onnx"}
    record.write_text(json.dumps(meta))
    if res.epochs == epochs:
        stages.cache.put_tree("qat", key, folder, [name], meta)
    return folder / name, meta
