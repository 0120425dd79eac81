"""The detector distillation loss: scores everywhere, boxes only where the teacher sees an object."""

from __future__ import annotations

import pytest
import torch

from edgekit.compress.detect_distill import detection_kd_loss, giou, scores_are_logits


def _teacher(anchors: int = 50, classes: int = 3, seed: int = 0) -> torch.Tensor:
    """A yolov8-layout [2, 4 + nc, A] output: boxes in pixels, a few confident anchors, the rest background."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(2, 2, anchors, generator=gen) * 160
    wh = 4 + torch.rand(2, 2, anchors, generator=gen) * 60
    scores = torch.rand(2, classes, anchors, generator=gen) * 0.002  # a trained detector's background
    scores[:, 1, :5] = 0.9  # five objects of class 1 per image
    return torch.cat([xy, wh, scores], 1)


def test_giou_is_one_for_the_same_box_and_negative_far_apart() -> None:
    a = torch.tensor([[50.0, 50, 20, 10]])
    assert torch.allclose(giou(a, a), torch.ones(1))
    assert float(giou(a, torch.tensor([[150.0, 150, 20, 10]]))) < -0.5


def test_background_boxes_teach_nothing_and_object_boxes_do() -> None:
    t = _teacher()
    base = float(detection_kd_loss(t.clone(), t, "yolov8"))
    background = t.clone()
    background[:, :4, 20:] += 30  # anchors the teacher scores ~0: their boxes move far
    moved_object = t.clone()
    moved_object[:, :4, :5] += 30  # the confident anchors' boxes move as far
    from_background = float(detection_kd_loss(background, t, "yolov8")) - base
    from_objects = float(detection_kd_loss(moved_object, t, "yolov8")) - base
    # 45 background anchors moved cost under 2 % of what 5 object anchors moved the same distance cost
    assert 0 <= from_background < 0.02 * from_objects and from_objects > 5 * base
    wrong_class = t.clone()
    wrong_class[:, 4:, :5] = wrong_class[:, 4:, :5].roll(1, dims=1)  # the objects' score on another class
    assert float(detection_kd_loss(wrong_class, t, "yolov8")) > 2 * base


def test_the_loss_is_least_at_the_teacher_in_every_layout() -> None:
    t = _teacher()
    student = (t + torch.randn_like(t) * torch.tensor([3.0] * 4 + [0.05] * 3)[None, :, None]).clamp_min(0)
    student[:, 4:] = student[:, 4:].clamp(0, 1)
    student.requires_grad_(True)
    for layout, s, ref in (("yolov8", student, t), ("yolov8", student.transpose(1, 2), t.transpose(1, 2)),
                           ("yolov5", torch.cat([student[:, :4], student[:, 5:6], student[:, 4:]], 1).transpose(1, 2),
                            torch.cat([t[:, :4], t[:, 5:6], t[:, 4:]], 1).transpose(1, 2))):
        at_teacher = float(detection_kd_loss(ref.clone(), ref, layout))
        assert float(detection_kd_loss(s.detach(), ref, layout)) > at_teacher, layout
    loss = detection_kd_loss(student, t, "yolov8")
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_logit_scores_are_read_as_logits() -> None:
    t = _teacher()
    logit = torch.cat([t[:, :4], torch.logit(t[:, 4:].clamp(1e-4, 1 - 1e-4))], 1)
    assert scores_are_logits(logit, "yolov8") and not scores_are_logits(t, "yolov8")
    s = t.clone()
    s[:, :4] += 2
    s_logit = torch.cat([s[:, :4], torch.logit(s[:, 4:].clamp(1e-4, 1 - 1e-4))], 1)
    assert float(detection_kd_loss(s_logit, logit, "yolov8", logits=True)) == pytest.approx(
        float(detection_kd_loss(s, t, "yolov8")), rel=0.02)
    with pytest.raises(ValueError):
        detection_kd_loss(s, t, "yolox")


def test_a_detectors_pruning_sensitivity_is_measured_by_its_map(tmp_path) -> None:
    """--task detect: each group's sensitivity is the mAP50-95 (on the labels) it loses pruned alone, not the
    cosine of the whole output (its pixel box rows). The guide's scorer judges the unpruned model at its own mAP."""
    import subprocess
    import sys

    import numpy as np
    from conftest import REPO

    from edgekit.compress.group_sensitivity import group_sensitivity
    from edgekit.data import Preprocess, open_source
    from edgekit.ingest import ingest, parse_input_shapes
    from edgekit.pipeline.stages import task_guide
    from edgekit.tasks.evaluator import TaskSettings

    data = tmp_path / "boxes"
    subprocess.run([sys.executable, "-m", "edgekit.zoo.defect_boxes", str(data), "--train", "0", "--calib", "0",
                    "--val", "24"], check=True, cwd=REPO, capture_output=True)
    detect = REPO / "examples" / "detect"
    # from its PyTorch source, as the planner prunes it (Torch-Pruning fails on the ONNX -> torch conversion of it)
    spec = ingest("edgekit.zoo.defectdet:defectdet", tmp_path / "m", parse_input_shapes(["images=1,3,160,160"]),
                  str(detect / "defectdet.pt"))
    source = open_source(str(data / "val"), spec, Preprocess.from_file(str(detect / "preprocess.yaml")), "validation")
    val = source.load(np.arange(source.count), spec, "validation")
    guide = task_guide(spec, val, TaskSettings(task="detect"))
    assert guide is not None and guide.layout == "yolov8"  # guessed from the [1, 7, 525] output
    by_map = group_sensitivity(spec, val, 0.5, cache_dir=tmp_path / "c-map", guide=guide)
    by_cosine = group_sensitivity(spec, val, 0.5, cache_dir=tmp_path / "c-cos")
    assert len(by_map) == len(by_cosine) > 10
    drops = [g.drop_points for g in by_map]
    assert drops == sorted(drops, reverse=True) and drops[0] > 5  # mAP points lost, most sensitive first
    assert all(0 <= g.metric <= 1 for g in by_map)
    # the two figures disagree on which groups matter: the cosine's ranking is not the mAP's
    assert [g.module for g in by_map[:5]] != [g.module for g in by_cosine[:5]]
