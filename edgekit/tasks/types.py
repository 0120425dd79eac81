"""Boxes: one image's detections or ground truth in one pixel frame."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Boxes:
    """One image's boxes in one pixel frame: detections (with scores) or ground truth (scores None)."""

    xyxy: np.ndarray  # [K, 4] float64, x1 y1 x2 y2 in pixels
    classes: np.ndarray  # [K] int64
    scores: np.ndarray | None = None  # [K] float64

    def __post_init__(self) -> None:
        # Normalise dtypes and shapes once so every consumer can rely on them (an empty list becomes [0, 4]).
        self.xyxy = np.asarray(self.xyxy, dtype=np.float64).reshape(-1, 4)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = len(self.xyxy)
        if len(self.classes) != n or (self.scores is not None and len(self.scores) != n):
            raise ValueError(f"Boxes: {n} boxes, {len(self.classes)} classes, "
                             f"{'no' if self.scores is None else len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.xyxy)

    @staticmethod
    def empty(with_scores: bool = True) -> Boxes:
        return Boxes(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0) if with_scores else None)

    def take(self, idx: np.ndarray | list[int] | slice) -> Boxes:
        """The boxes at `idx` (indices, a boolean mask or a slice), as a new Boxes."""
        return Boxes(self.xyxy[idx], self.classes[idx], None if self.scores is None else self.scores[idx])

    def scaled(self, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> Boxes:
        """x * sx + dx, y * sy + dy: moving boxes between pixel frames (model input <-> original image)."""
        xyxy = self.xyxy * np.array([sx, sy, sx, sy]) + np.array([dx, dy, dx, dy])
        return Boxes(xyxy, self.classes.copy(), None if self.scores is None else self.scores.copy())
