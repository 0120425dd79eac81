"""Structured pruning (Torch-Pruning) and distillation on real models, checked by ONNX Runtime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import REPO
from torch import nn

from edgekit.compress.distill import DistillSettings, evaluate, kd_loss, rkd_loss, train_student
from edgekit.compress.prune import PruneSettings, load_pruned, prune, save_pruned
from edgekit.errors import BadInput
from edgekit.zoo.defectnet import defectnet


def _bundled() -> nn.Module:
    m = defectnet()
    m.load_state_dict(torch.load(REPO / "examples" / "defects" / "defectnet.pt", weights_only=True))
    return m.eval()


def _onnx_agrees(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=1e-3)


def test_bundled_model_pruned_by_half_is_aligned_and_smaller(tmp_path: Path) -> None:
    model = _bundled()
    x = torch.randn(2, 3, 96, 96)
    report = prune(model, x[:1], PruneSettings(ratio=0.5, importance="l1", round_to=8))
    assert report.macs_ratio <= 0.55 and report.params_after < report.params_before
    assert report.settings["ignored_layers"] == ["fc"]  # the classes are not pruned
    convs = [la for la in report.layers if la.kind == "conv"]
    assert all(la.channels_after % 8 == 0 and la.channels_after < la.channels_before for la in convs)
    assert all(0 < la.macs_after < la.macs_before for la in convs)  # per-layer MACs before/after
    assert model(x).shape == (2, 4)
    _onnx_agrees(model, x[:1], tmp_path / "pruned.onnx")
    save_pruned(model, str(tmp_path / "pruned.pt"))
    again = load_pruned(defectnet(), str(tmp_path / "pruned.pt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize("importance", ["l2", "bn", "taylor"])
def test_depthwise_se_network_prunes_without_breaking_shapes(importance: str, tmp_path: Path) -> None:
    from models import mobilenet_like

    model = mobilenet_like().eval()
    x = torch.randn(4, 3, 64, 64)
    batches = [(x, torch.tensor([0, 1, 2, 3]))]
    report = prune(model, x[:1], PruneSettings(ratio=0.4, importance=importance, steps=2, round_to=4),
                   loss_batches=batches, loss_fn=nn.functional.cross_entropy)
    assert report.macs_after < report.macs_before
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw)  # depthwise stays depthwise
    assert model(x).shape == (4, 10)
    _onnx_agrees(model, x[:1], tmp_path / "m.onnx")


def test_residual_network_with_per_layer_ratio_and_ignored_layer() -> None:
    model = _bundled()
    settings = PruneSettings(ratio=0.25, layer_ratios={"stages.3.conv1.0": 0.5}, ignored_layers=["fc", "stem.0.0"])
    report = prune(model, torch.zeros(1, 3, 96, 96), settings)
    widths = {la.name: (la.channels_before, la.channels_after) for la in report.layers}
    assert widths["stem.0.0"] == (16, 16)  # ignored
    assert widths["stages.3.conv1.0"] == (160, 80)  # its own ratio
    assert widths["stages.2.conv1.0"] == (128, 96)  # the global one


def test_bad_prune_settings_are_refused() -> None:
    with pytest.raises(BadInput, match="fraction"):
        prune(_bundled(), torch.zeros(1, 3, 96, 96), PruneSettings(ratio=1.5))
    with pytest.raises(BadInput, match="Taylor importance needs data"):
        prune(_bundled(), torch.zeros(1, 3, 96, 96), PruneSettings(importance="taylor"))
    with pytest.raises(BadInput, match="no layer named"):
        prune(_bundled(), torch.zeros(1, 3, 96, 96), PruneSettings(ignored_layers=["nope"]))


def test_distillation_losses() -> None:
    logits = torch.randn(8, 5)
    assert float(kd_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 5)
    # T^2 scaling keeps the soft loss comparable across temperatures
    assert float(kd_loss(other, logits, 1.0)) > 0 and float(kd_loss(other, logits, 8.0)) > 0
    emb = torch.randn(6, 16)
    assert float(rkd_loss(emb, emb)) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd_loss(emb * 3.0, emb)) == pytest.approx(0.0, abs=1e-5)  # scale-free distances and angles
    assert float(rkd_loss(torch.randn(6, 16), emb)) > 0.01


class _Tiny(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[:, 0] += (y == 0).float()[:, None, None]  # each class brightens one channel
    x[:, 1] += (y == 1).float()[:, None, None]
    x[:, 2] += (y == 2).float()[:, None, None]
    return x, y


def test_distillation_from_unlabelled_data_recovers_the_teacher_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = _Tiny()
    x, y = _toy_data(512, 0)
    xv, yv = _toy_data(128, 1)
    train_student(teacher, None, x, y, xv, yv, DistillSettings(epochs=6, labels_only=True, augment="none"))
    assert evaluate(teacher, xv, yv, None)[1] > 0.9
    student = copy.deepcopy(teacher)
    prune(student, x[:1], PruneSettings(ratio=0.5, importance="l1"))
    start = evaluate(student, xv, None, teacher)[1]
    settings = DistillSettings(epochs=3, augment="none", relation_weight=0.5, lr=1e-2,
                               hint_layers=[["features.3", "features.3"]])
    ck = tmp_path / "ck.pt"
    first = train_student(student, teacher, x, None, xv, None, settings, checkpoint=ck)  # no labels at all
    assert first.metric == "teacher_agreement" and first.epochs_run == 3 and ck.exists()
    settings.epochs = 8
    resumed = train_student(student, teacher, x, None, xv, None, settings, checkpoint=ck)
    assert [h["epoch"] for h in resumed.history][:4] == [1, 2, 3, 4]  # continued, not restarted
    assert resumed.best_metric >= 0.95 > start


def test_low_rank_factorisation_keeps_outputs_and_shrinks_layers(tmp_path: Path) -> None:
    from edgekit.compress.lowrank import factorise

    torch.manual_seed(0)
    low_rank = torch.randn(256, 16) @ torch.randn(16, 512)  # rank 16: SVD at 0.999 energy finds it
    model = nn.Sequential(nn.Conv2d(512, 256, 1), nn.ReLU(), nn.Flatten(), nn.Linear(256 * 4, 10)).eval()
    with torch.no_grad():
        model[0].weight.copy_(low_rank[:, :, None, None] / 50)
    x = torch.randn(2, 512, 2, 2)
    with torch.no_grad():
        before = model(x)
    changed = factorise(model, energy=0.999)
    names = [c.name for c in changed]
    assert "0" in names and changed[names.index("0")].rank <= 16
    assert all(c.params_after < c.params_before for c in changed)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-3, rtol=1e-3)
    _onnx_agrees(model, x[:1], tmp_path / "lr.onnx")
