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


@pytest.mark.parametrize("ratio", [0.15, 0.25, 0.3])
def test_kept_channels_are_the_nearest_multiple_not_the_one_below(ratio: float) -> None:
    """Torch-Pruning rounds what it keeps down to the multiple: at 16 (AVX-512's fp32 lanes) a 15 % prune took
    half of each 32-channel layer. edgekit keeps the multiple nearest to what the ratio keeps (one at least)."""
    from edgekit.zoo.defectdet import defectdet

    model = defectdet(num_classes=3)
    report = prune(model, torch.zeros(1, 3, 160, 160), PruneSettings(ratio=ratio, round_to=16))
    changed = [la for la in report.layers if la.channels_after != la.channels_before]
    assert changed, "nothing was pruned"
    for la in changed:
        wanted = la.channels_before * (1 - ratio)
        nearest = min(range(16, la.channels_before + 1, 16), key=lambda m: (abs(m - wanted), -m))
        assert la.channels_after == nearest, (la, wanted)
    assert model(torch.zeros(2, 3, 160, 160)).shape == (2, 7, 525)


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


def test_global_ranking_gives_each_layer_its_own_ratio() -> None:
    """Uniform pruning removes the same share of every layer; global ranking compares channels across
    layers (BatchNorm scales here, as network slimming does), so the layers lose different shares
    while the network as a whole still loses about half its channels."""
    def ratios(global_ranking: bool) -> tuple[list[float], float]:
        report = prune(_bundled(), torch.zeros(1, 3, 96, 96),
                       PruneSettings(ratio=0.5, importance="bn", global_ranking=global_ranking))
        convs = [la for la in report.layers if la.kind == "conv"]
        total = sum(la.channels_after for la in convs) / sum(la.channels_before for la in convs)
        return [la.channels_after / la.channels_before for la in convs], total

    (uniform, uniform_total), (ranked, ranked_total) = ratios(False), ratios(True)
    assert max(uniform) == min(uniform) == 0.5
    assert max(ranked) - min(ranked) >= 0.1, ranked
    assert uniform_total == 0.5 and ranked_total == pytest.approx(0.5, abs=0.05)


def test_taylor_ranking_leaves_batchnorm_statistics_alone() -> None:
    """Taylor importance needs gradients, not a training step: the kept channels' BatchNorm running
    statistics must come out exactly as they went in (a train-mode pass would move them)."""
    from models import mobilenet_like

    model = mobilenet_like().eval()
    before = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
              for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    x = torch.randn(16, 3, 64, 64)
    prune(model, x[:1], PruneSettings(ratio=0.5, importance="taylor", steps=2),
          loss_batches=[(x[:8], torch.arange(8)), (x[8:], torch.arange(8))], loss_fn=nn.functional.cross_entropy)
    pruned = 0
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            mean, var, tracked = before[n]
            assert int(m.num_batches_tracked) == tracked
            assert bool(torch.isin(m.running_mean, mean).all()) and bool(torch.isin(m.running_var, var).all()), n
            pruned += len(m.running_mean) < len(mean)
    assert pruned >= 4


def test_kd_loss_t_squared_keeps_the_gradient_scale() -> None:
    """Softened KL's gradient shrinks as 1/T^2 (Hinton et al.); kd_loss multiplies by T^2, so its
    gradient keeps one scale across temperatures while the bare KL's falls fourfold from T=4 to T=8."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(64, 10, generator=g) * 0.5, torch.randn(64, 10, generator=g) * 0.5

    def grad_norm(loss_of: object, t: float) -> float:
        s = student.clone().requires_grad_(True)
        loss_of(s, t).backward()  # type: ignore[operator]
        return float(s.grad.norm())

    def bare(s: torch.Tensor, t: float) -> torch.Tensor:
        return nn.functional.kl_div(nn.functional.log_softmax(s / t, 1), nn.functional.softmax(teacher / t, 1),
                                    reduction="batchmean")

    def scaled(s: torch.Tensor, t: float) -> torch.Tensor:
        return kd_loss(s, teacher, t)

    assert grad_norm(scaled, 8.0) / grad_norm(scaled, 4.0) == pytest.approx(1.0, abs=0.05)
    assert grad_norm(bare, 4.0) / grad_norm(bare, 8.0) == pytest.approx(4.0, rel=0.05)
    assert grad_norm(scaled, 4.0) / grad_norm(bare, 4.0) == pytest.approx(16.0, rel=1e-4)


def _trained_tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = _Tiny()
    x, y = _toy_data(256, 0)
    xv, yv = _toy_data(96, 1)
    train_student(teacher, None, x, y, xv, yv, DistillSettings(epochs=3, labels_only=True, augment="none"))
    return teacher, x, y, xv, yv


def test_early_stop_time_budget_and_determinism() -> None:
    teacher, x, y, xv, yv = _trained_tiny()
    # A student already equal to the teacher cannot beat 100% agreement: patience ends the run early
    # and the starting weights (the best) are kept.
    student = copy.deepcopy(teacher)
    run = train_student(student, teacher, x, None, xv, None, DistillSettings(epochs=10, patience=2, augment="none"))
    assert run.epochs_run == 2 and run.stopped == "no better teacher_agreement for 2 epochs" and run.best_epoch == 0
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=0, atol=0)
    # A time budget shorter than one epoch stops after the first.
    run = train_student(copy.deepcopy(teacher), None, x, y, xv, yv,
                        DistillSettings(epochs=20, time_budget_s=1e-3, labels_only=True))
    assert run.epochs_run == 1 and run.stopped == "time budget 0.001 s"

    # The same seed gives the same weights; another seed other weights (shuffles, flips).
    def trained(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        student = _Tiny(width=8)  # from scratch: training surely moves it past its start
        run = train_student(student, teacher, x, y, xv, yv, DistillSettings(epochs=2, seed=seed, lr=1e-2, batch=32))
        assert run.best_epoch > 0
        return student.state_dict()

    a, b, c = trained(3), trained(3), trained(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class _Hidden(nn.Module):
    """Features -> a hidden Linear -> classes: a hint on a Linear layer."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Linear(width, 64)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(self.features(x))))


class _FullyConv(nn.Module):
    """A classifier without any Linear layer (1x1 conv head, global pool): RKD has no classifier input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 3, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)


@pytest.mark.parametrize("factory,settings", [
    (_Hidden, {"hint_layers": [["hidden", "hidden"]]}),  # a Linear adapter, 32 -> 64 features
    (_FullyConv, {"relation_weight": 5.0}),  # RKD on the pooled outputs
])
def test_linear_hints_and_rkd_without_linear_layers_train(factory: type, settings: dict) -> None:
    torch.manual_seed(0)
    teacher = factory().eval()
    x, _ = _toy_data(128, 0)
    xv, _ = _toy_data(64, 1)
    student = copy.deepcopy(teacher)
    prune(student, x[:1], PruneSettings(ratio=0.5))

    def losses(extra: dict) -> list[float]:
        s = copy.deepcopy(student)
        run = train_student(s, teacher, x, None, xv, None, DistillSettings(epochs=2, augment="none", **extra))
        return [h["loss"] for h in run.history]

    plain, with_term = losses({}), losses(settings)
    assert all(np.isfinite(with_term)) and with_term[0] > plain[0]  # the extra term is there, and trains


def test_compress_fine_tunes_between_pruning_steps_on_a_class_balanced_taylor_sample(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Iterative Taylor pruning through the stage: the ranking sees every class (labels arrive sorted
    by class, as from an image folder), and each step but the last is followed by a short hard-label
    fine-tune whose accuracy the report keeps."""
    from models import export_dynamic, tiny_resnet

    import edgekit.compress.prune as prune_module
    from edgekit.compress.stage import CompressOptions, compress
    from edgekit.data import Dataset
    from edgekit.ingest import ingest
    from edgekit.targets import load_target

    model = tiny_resnet()
    spec = ingest(str(export_dynamic(model, tmp_path / "res.onnx", opset=17, size=32)), tmp_path / "ingest",
                  {"images": [1, 3, 32, 32]})
    # Five classes a small network learns in a few steps: one channel's mean raised or lowered.
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (400,), generator=g)
    x = torch.randn(400, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(400), y % 3] += torch.where(y < 3, 1.0, -1.0)[:, None, None]
    order = torch.argsort(y[:320], stable=True)  # the training part sorted by class, as an image folder loads
    train = Dataset({"images": x[order].numpy()}, y[order].numpy())
    val = Dataset({"images": x[320:].numpy()}, y[320:].numpy())
    seen: list[torch.Tensor] = []
    real_prune = prune_module.prune

    def spy(*args: object, **kwargs: object) -> object:
        seen.extend(b[1] for b in args[3])  # type: ignore[index, union-attr]
        return real_prune(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prune_module, "prune", spy)
    opts = CompressOptions(prune=0.5, importance="taylor", steps=2, epochs=8, round_to=8, augment="none")
    (tmp_path / "out").mkdir()
    report = compress(spec, load_target("host-cpu"), opts, train, val, tmp_path / "out").report
    assert len(seen) == 4 and all(len(torch.unique(b)) == 5 for b in seen)  # every batch holds every class
    first, last = report["prune_steps"]
    assert first["finetune"] == "hard labels" and first["epochs"] == 2  # 25% of 8 epochs, one gap
    assert first["finetuned"] > first["pruned"]  # the fine-tune recovered accuracy before the next ranking
    assert "finetuned" not in last and last["macs"] < first["macs"]
    assert last["pruned"] == report["accuracy"]["pruned"]
    assert report["prune"]["macs_ratio"] < 0.45


def test_importance_sample_spans_the_classes() -> None:
    from edgekit.compress.stage import importance_sample

    labels = torch.arange(4).repeat_interleave(500)  # sorted by class, as an image folder loads
    pick = importance_sample(labels, 2000, 128, seed=0)
    assert torch.bincount(labels[pick], minlength=4).tolist() == [32, 32, 32, 32]
    assert all(len(torch.unique(labels[pick[i:i + 32]])) == 4 for i in range(0, 128, 32))
    unlabelled = importance_sample(None, 2000, 128, seed=0)
    assert len(set(unlabelled.tolist())) == 128 and int(unlabelled.max()) > 500  # shuffled, not the first 128
    assert torch.equal(unlabelled, importance_sample(None, 2000, 128, seed=0))


def test_onnx_path_prunes_exactly_like_the_batchnorm_folded_pytorch_source(tmp_path: Path) -> None:
    """The bundled ONNX has BatchNorm folded into its convs. Converted to torch and pruned, it must
    behave exactly as the PyTorch source with BatchNorm folded the same way (torch.fx fuse): same
    weights, same coupled groups, same channels kept. (Magnitude ranking on folded weights keeps other
    channels than on conv + BatchNorm, which is why the accuracy right after pruning differs from
    the PyTorch path's; the converter adds nothing to that.)"""
    from torch.fx.experimental.optimization import fuse

    from edgekit.compress.onnx_to_torch import onnx_to_torch
    from edgekit.ingest import ingest

    spec = ingest(str(REPO / "examples" / "defects" / "defectnet.onnx"), tmp_path / "ingest", {})
    converted, folded = onnx_to_torch(spec.load()), fuse(_bundled())
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    reports = [prune(m, x[:1], PruneSettings(ratio=0.5, importance="l1", round_to=16)) for m in (converted, folded)]
    # Layer names and order differ (ONNX node names, node order); the widths and the work do not.
    widths = [sorted(la.channels_after for la in r.layers) for r in reports]
    assert widths[0] == widths[1] and reports[0].macs_after == reports[1].macs_after
    with torch.no_grad():
        torch.testing.assert_close(converted(x), folded(x), atol=1e-4, rtol=1e-4)
