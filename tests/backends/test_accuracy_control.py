from __future__ import annotations

from pathlib import Path

from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS

from edgekit import backends
from edgekit.data import Preprocess, prepare_data
from edgekit.ingest import ingest
from edgekit.planning.types import ArtifactPlan, QuantizationSettings
from edgekit.verify.verifier import Thresholds, run_all
from edgekit.verify.verifier import verify_outputs as compare


def test_openvino_accuracy_control_keeps_accuracy(defects_data: Path, tmp_path: Path) -> None:
    """NNCF's quantize_with_accuracy_control, validated on the labelled calibration samples only."""
    spec = ingest(str(BUNDLED_ONNX), tmp_path / "w")
    data = prepare_data(spec, str(defects_data / "calib"), str(defects_data / "val"),
                        Preprocess.from_file(BUNDLED_PREPROCESS), val_samples=200)
    plan = ArtifactPlan("openvino", "int8", QuantizationSettings(accuracy_control=True),
                        options={"max_accuracy_drop": 0.5})
    (tmp_path / "a").mkdir()
    ovb = backends.get("openvino")
    art = ovb.export(spec, plan, data.calibration, tmp_path / "a")
    assert art.details["quantizer"] == "nncf.quantize_with_accuracy_control"
    ort = backends.get("onnxruntime")
    (tmp_path / "r").mkdir()
    ref = ort.export(spec, ArtifactPlan("onnxruntime", "fp32"), None, tmp_path / "r")
    val = data.validation.batches(spec)
    v = compare(run_all(ort.load(ref, 2), val), run_all(ovb.load(art, 2), val), ["logits"],
                data.validation.batch_labels(spec), Thresholds())
    assert (v.reference_accuracy - v.accuracy) * 100 <= 1.0
