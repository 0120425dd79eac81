"""Raw detector outputs -> candidate boxes per image (before NMS), in model-input pixels.

A decoder is `decoder(outputs, input_hw) -> list[Boxes]`: `outputs` are the model's outputs in ModelSpec order
with images on the first axis, `input_hw` is the model input's (H, W). Each returned Boxes holds every anchor
(scores = the box's confidence, classes = its argmax class); nms.nms() filters and suppresses afterwards.

Built-ins: "yolov8" (Ultralytics YOLOv8/11 export), "yolov5" and "yolox". A user's own decoder is named
"package.module:function" or "path/to/file.py:function" and returns, per image, a Boxes or a tuple
(xyxy [K, 4], scores [K], classes [K]).

Notes: when a built-in finds score values outside [0, 1] it takes them for logits and applies a sigmoid.
It says so through decoder_notes(), which returns (and clears) the notes recorded since its last call, so
the caller can put them in a report once per evaluation rather than once per batch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BadInput
from edgekit.tasks.types import Boxes

Decoder = Callable[[list[np.ndarray], tuple[int, int]], list[Boxes]]

YOLOX_STRIDES = (8, 16, 32)
_NOTES: dict[str, None] = {}  # insertion-ordered set: the same note from every batch is said once


def decoder_notes() -> list[str]:
    """Notes the decoders recorded since the last call (e.g. 'logits: sigmoid applied'), then forgets them."""
    notes = list(_NOTES)
    _NOTES.clear()
    return notes


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so that exp never overflows on large logits.
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _probabilities(scores: np.ndarray, decoder: str, what: str) -> np.ndarray:
    """Scores as probabilities: values outside [0, 1] mean the export left the sigmoid out (logits)."""
    finite = scores[np.isfinite(scores)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        _NOTES[f"{decoder}: {what} outside [0, 1] (min {finite.min():.3g}, max {finite.max():.3g}) were taken "
               "for logits and passed through a sigmoid"] = None
        return _sigmoid(scores)
    return scores


def _one_output(outputs: Sequence[np.ndarray], decoder: str, expected: str) -> np.ndarray:
    if len(outputs) != 1:
        shapes = [list(np.shape(o)) for o in outputs]
        raise BadInput(f"decoder {decoder} takes a model with one output {expected}, this one has {len(outputs)}: "
                       f"{shapes}; name a decoder that reads them (--decoder module:function)")
    out = np.asarray(outputs[0], dtype=np.float64)
    if out.ndim != 3:
        raise BadInput(f"decoder {decoder}: output shape {list(out.shape)}, expected {expected}")
    return out


def _xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    c, half = xywh[..., :2], xywh[..., 2:4] / 2
    return np.concatenate([c - half, c + half], axis=-1)


def _per_image(xyxy: np.ndarray, cls_scores: np.ndarray, obj: np.ndarray | None = None) -> list[Boxes]:
    """[N, A, 4] boxes and [N, A, nc] class scores (times [N, A] objectness) -> N Boxes of all A anchors."""
    classes = cls_scores.argmax(axis=-1)
    conf = np.take_along_axis(cls_scores, classes[..., None], axis=-1)[..., 0]
    if obj is not None:
        conf = conf * obj  # argmax of obj * cls equals argmax of cls: obj is one number per anchor
    return [Boxes(xyxy[i], classes[i], conf[i]) for i in range(len(xyxy))]


def decode_yolov8(outputs: list[np.ndarray], input_hw: tuple[int, int]) -> list[Boxes]:
    """Ultralytics export: [N, 4 + nc, A] (cx, cy, w, h in input pixels, then sigmoided class scores); the
    transposed [N, A, 4 + nc] too (the longer axis is the anchors)."""
    out = _one_output(outputs, "yolov8", "[N, 4 + classes, anchors]")
    if out.shape[1] < out.shape[2]:
        out = out.transpose(0, 2, 1)  # -> [N, A, 4 + nc]
    if out.shape[2] < 5:
        raise BadInput(f"decoder yolov8: output shape {list(np.shape(outputs[0]))}, expected [N, 4 + classes, anchors] "
                       "with at least one class")
    cls = _probabilities(out[..., 4:], "yolov8", "class scores")
    return _per_image(_xywh_to_xyxy(out[..., :4]), cls)


def decode_yolov5(outputs: list[np.ndarray], input_hw: tuple[int, int]) -> list[Boxes]:
    """YOLOv5 export: [N, A, 5 + nc] (cx, cy, w, h in input pixels, objectness, class scores);
    confidence = objectness * class score."""
    out = _one_output(outputs, "yolov5", "[N, anchors, 5 + classes]")
    if out.shape[2] < 6 or out.shape[2] > out.shape[1]:
        raise BadInput(f"decoder yolov5: output shape {list(out.shape)}, expected [N, anchors, 5 + classes] "
                       "(anchors the longer axis, at least one class)")
    scores = _probabilities(out[..., 4:], "yolov5", "objectness/class scores")
    return _per_image(_xywh_to_xyxy(out[..., :4]), scores[..., 1:], scores[..., 0])


def yolox_grid(input_hw: tuple[int, int], strides: Sequence[int] = YOLOX_STRIDES,
               ceil: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX's anchor points: ([A, 2] grid (x, y), [A, 1] stride), level by level, rows then columns (x
    fastest), as yolo_head.decode_outputs builds them."""
    h, w = input_hw
    grids, strides_out = [], []
    for s in strides:
        hs, ws = (-(-h // s), -(-w // s)) if ceil else (h // s, w // s)
        yv, xv = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
        grids.append(np.stack([xv, yv], axis=-1).reshape(-1, 2))
        strides_out.append(np.full((hs * ws, 1), float(s)))
    return np.concatenate(grids).astype(np.float64), np.concatenate(strides_out)


def decode_yolox(outputs: list[np.ndarray], input_hw: tuple[int, int]) -> list[Boxes]:
    """YOLOX export with decode_in_inference off: [N, A, 5 + nc] raw head output; xy = (p + grid) * stride,
    wh = exp(p) * stride over strides 8, 16, 32; objectness and class scores already sigmoided."""
    out = _one_output(outputs, "yolox", "[N, anchors, 5 + classes]")
    if out.shape[2] < 6:
        raise BadInput(f"decoder yolox: output shape {list(out.shape)}, expected [N, anchors, 5 + classes]")
    grid, stride = yolox_grid(input_hw)
    if len(grid) != out.shape[1]:
        # YOLOX's stride-2 convolutions round up: an input that is no multiple of 32 has ceil(H / s) rows.
        ceil_grid, ceil_stride = yolox_grid(input_hw, ceil=True)
        if len(ceil_grid) != out.shape[1]:
            h, w = input_hw
            raise BadInput(f"decoder yolox: output shape {list(out.shape)} has {out.shape[1]} anchors, but a "
                           f"{h}x{w} input has {len(grid)} (sum of (H//s)*(W//s) over strides {YOLOX_STRIDES}): "
                           "check the input size, or whether the export already decodes boxes (then use yolov5)")
        grid, stride = ceil_grid, ceil_stride
    with np.errstate(over="ignore"):  # exp of a wild regression value is inf: a box NMS drops, not a crash
        xywh = np.concatenate([(out[..., :2] + grid) * stride, np.exp(out[..., 2:4]) * stride], axis=-1)
    scores = _probabilities(out[..., 4:], "yolox", "objectness/class scores")
    return _per_image(_xywh_to_xyxy(xywh), scores[..., 1:], scores[..., 0])


DECODERS: dict[str, Decoder] = {"yolov8": decode_yolov8, "yolov5": decode_yolov5, "yolox": decode_yolox}


def guess_decoder(output_shapes: list[list[int]], input_hw: tuple[int, int] | None = None) -> str | None:
    """The built-in decoder these output shapes can only mean, else None.

    [N, 4 + nc, A] (channels before anchors) is Ultralytics' layout alone. [N, A, C] could be a transposed
    YOLOv8, a YOLOv5 or a YOLOX; given `input_hw`, 3 anchors per grid cell of strides 8/16/32 is YOLOv5's.
    Symbolic (<= 0) dimensions give no answer."""
    if len(output_shapes) != 1 or len(output_shapes[0]) != 3:
        return None
    _, a, b = output_shapes[0]
    if not (isinstance(a, int) and isinstance(b, int)) or a <= 0 or b <= 0:
        return None
    if 5 <= a < b:
        return "yolov8"
    if input_hw is not None and b >= 6:
        cells = sum((input_hw[0] // s) * (input_hw[1] // s) for s in YOLOX_STRIDES)
        if a == 3 * cells:
            return "yolov5"
    return None


def get_decoder(name: str) -> Decoder:
    """A built-in by name, or the user's `package.module:function` / `path/to/file.py:function`."""
    if name in DECODERS:
        return DECODERS[name]
    choices = ", ".join(DECODERS)
    if ":" not in name:
        raise BadInput(f"unknown decoder {name!r}: choose one of {choices}, or name your own as "
                       "package.module:function or path/to/file.py:function")
    where, _, func_name = name.rpartition(":")
    if not where or not func_name.isidentifier():
        raise BadInput(f"decoder {name!r}: write it as package.module:function or path/to/file.py:function "
                       f"(built-ins: {choices})")
    module = _import_user_module(where, name)
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise BadInput(f"decoder {name!r}: {where} has no function {func_name}")
    return _checked(fn, name)


def _import_user_module(where: str, name: str) -> Any:
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise BadInput(f"decoder {name!r}: no file {path}")
        # A name of its own per path: two user decoders called decode.py must not replace each other.
        mod_name = "edgekit_user_decoder_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise BadInput(f"decoder {name!r}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise BadInput(f"decoder {name!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise BadInput(f"decoder {name!r}: cannot import module {where} ({e}); is it on PYTHONPATH?") from e
    except Exception as e:
        raise BadInput(f"decoder {name!r}: importing {where} failed: {type(e).__name__}: {e}") from e


def _checked(fn: Callable[..., Any], name: str) -> Decoder:
    """Wrap a user's decoder: call it, then turn each image's result into Boxes or say what is wrong."""

    def decode(outputs: list[np.ndarray], input_hw: tuple[int, int]) -> list[Boxes]:
        n = len(outputs[0]) if len(outputs) else 0
        try:
            result = fn(outputs, input_hw)
        except BadInput:
            raise
        except Exception as e:
            raise BadInput(f"decoder {name} raised {type(e).__name__}: {e}") from e
        if isinstance(result, (Boxes, tuple, np.ndarray)) or not isinstance(result, Sequence):
            raise BadInput(f"decoder {name} returned {type(result).__name__}; it must return a list with one "
                           "Boxes or (xyxy, scores, classes) tuple per image")
        if len(result) != n:
            raise BadInput(f"decoder {name} returned {len(result)} results for {n} images; return one per image")
        return [_to_boxes(r, name, i) for i, r in enumerate(result)]

    decode.__name__ = f"user_decoder[{name}]"
    return decode


def _to_boxes(r: Any, name: str, i: int) -> Boxes:
    if isinstance(r, Boxes):
        xyxy, scores, classes = r.xyxy, r.scores, r.classes
        if scores is None:
            raise BadInput(f"decoder {name}: image {i}: Boxes without scores; detections need a confidence each")
    elif isinstance(r, (tuple, list)) and len(r) == 3:
        xyxy, scores, classes = r
    else:
        raise BadInput(f"decoder {name}: image {i}: got {type(r).__name__}; return a Boxes or a tuple "
                       "(xyxy [K, 4], scores [K], classes [K])")
    try:
        xyxy = np.asarray(xyxy, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
        classes_f = np.asarray(classes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BadInput(f"decoder {name}: image {i}: values are not numeric arrays ({e})") from None
    if xyxy.size == 0:
        xyxy = xyxy.reshape(0, 4)
    k = len(xyxy) if xyxy.ndim else -1
    if xyxy.ndim != 2 or xyxy.shape[1] != 4 or scores.shape != (k,) or classes_f.shape != (k,):
        raise BadInput(f"decoder {name}: image {i}: shapes xyxy {list(xyxy.shape)}, scores {list(scores.shape)}, "
                       f"classes {list(classes_f.shape)}; expected [K, 4], [K], [K]")
    if k and (not np.all(np.isfinite(classes_f)) or np.any(classes_f != np.round(classes_f))
              or classes_f.min() < 0):
        raise BadInput(f"decoder {name}: image {i}: classes must be non-negative integers")
    return Boxes(xyxy, classes_f.astype(np.int64), scores)
