"""Per-group pruning sensitivity, and per-layer ratios that follow it.

Torch-Pruning's dependency graph gives the groups (a conv with everything tied to its output channels:
its BatchNorm, the next layer's inputs, the other convs feeding the same residual Add). Each group is
pruned alone, by the planned ratio and with the same importance criterion, on a copy of the model,
and the copy is measured on validation data without any fine-tuning: the drop in accuracy (labels)
or in agreement with the original's top-1 / outputs says how much that group's channels matter. With a task
guide (`--task detect|segment`) the task's own metric measures it: the cosine of a detector's whole output is
its pixel box rows, and ratios spread by it left a 15 % prune of the bundled detector at mAP50-95 1.5.
Results are cached by model hash, data and settings, like the INT8 sensitivity.

The planner then spreads a global ratio unevenly: the most sensitive quarter of the groups is pruned
at half the ratio, the least sensitive quarter at one and a half times it (at most `max_ratio`), the
rest at the ratio itself; so the MACs removed stay close to a uniform prune while the layers that
carry the accuracy keep more channels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.console import progress
from edgekit.data import Dataset
from edgekit.home import cache_dir
from edgekit.ingest import ModelSpec

if TYPE_CHECKING:
    from edgekit.compress.stage import TaskGuide

CACHE_SCHEMA = "edgekit-prune-sensitivity/1"


@dataclass
class GroupSensitivity:
    module: str  # the group's root module (torch name): what `layer_ratios` keys
    channels: int
    macs_share: float  # the root layer's share of the model's MACs
    metric: float  # accuracy (labels), top-1 agreement with the original or the task metric (a fraction), after
    # pruning this group alone
    drop_points: float  # original metric minus that, in points
    cosine: float  # output cosine vs the original model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_cache_dir() -> Path:
    return cache_dir("prune-sensitivity")


def group_sensitivity(spec: ModelSpec, validation: Dataset, ratio: float, importance: str = "l1",
                      max_samples: int = 256, cache_dir: Path | None = None,
                      guide: TaskGuide | None = None) -> list[GroupSensitivity]:
    """Sensitivity of every prunable group to losing `ratio` of its channels, most sensitive first."""
    import torch
    import torch_pruning as tp

    from edgekit.compress.prune import _importance, default_ignored
    from edgekit.compress.stage import source_module

    (x_all,) = validation.inputs.values()
    n = min(len(x_all), max_samples)
    x = torch.from_numpy(np.ascontiguousarray(x_all[:n], np.float32))
    labels = validation.labels[:n] if validation.labels is not None else None
    key = _cache_key(spec, x, labels, ratio, importance, guide.key if guide and guide.scorer_for else "")
    cache = (cache_dir or default_cache_dir()) / f"{spec.sha256[:16]}-{key[:24]}.json"
    cached = _read(cache, key)
    if cached is not None:
        return cached

    model = source_module(spec).eval()
    example = torch.zeros(*spec.inputs[0].shape)
    with torch.no_grad():
        reference = _batched(model, x)
    scorer = guide.scorer_for([reference.numpy()]) if guide is not None and guide.scorer_for else None
    metric = (lambda out: scorer([out.numpy()])[1]) if scorer else (lambda out: _metric(out, reference, labels))
    base = metric(reference)
    ignored = set(default_ignored(model, example))
    modules = dict(model.named_modules())
    names = {m: name for name, m in modules.items()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    roots = []
    for group in graph.get_all_groups(ignored_layers=[modules[i] for i in ignored],
                                      root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        root = group[0].dep.target.module
        if names.get(root) and names[root] not in roots:
            roots.append(names[root])
    macs, _params, layer_macs, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    results = []
    with progress() as bar:
        task = bar.add_task("pruning sensitivity per group", total=len(roots))
        for name in roots:
            trial = copy.deepcopy(model)
            tm = dict(trial.named_modules())
            width = getattr(tm[name], "out_channels", None) or getattr(tm[name], "out_features", 0)
            pruner = tp.pruner.MetaPruner(
                trial, example, importance=_importance(importance), pruning_ratio=0.0,
                pruning_ratio_dict={tm[name]: ratio}, ignored_layers=[tm[i] for i in ignored if i in tm])
            pruner.step()
            with torch.no_grad():
                out = _batched(trial.eval(), x)
            value = metric(out)
            cos = float(torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).mean())
            results.append(GroupSensitivity(name, int(width), round(float(layer_macs.get(modules[name], 0)) / macs, 5),
                                            round(value, 5), round((base - value) * 100, 3), round(cos, 6)))
            bar.advance(task)
    results.sort(key=lambda g: (g.drop_points, -g.cosine), reverse=True)
    _write(cache, key, results)
    return results


def ratios_from_sensitivity(groups: list[GroupSensitivity], ratio: float, max_ratio: float = 0.8) -> dict[str, float]:
    """Per-layer ratios around `ratio`: half for the most sensitive quarter, 1.5x for the least."""
    n = len(groups)
    quarter = max(1, n // 4) if n >= 4 else 0
    out = {}
    for i, g in enumerate(groups):  # most sensitive first
        if i < quarter:
            out[g.module] = round(ratio / 2, 4)
        elif i >= n - quarter:
            out[g.module] = round(min(ratio * 1.5, max_ratio), 4)
        else:
            out[g.module] = round(ratio, 4)
    return out


def _batched(model: Any, x: Any, batch: int = 64) -> Any:
    import torch

    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    outs = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
    return torch.cat(outs)


def _metric(out: Any, reference: Any, labels: np.ndarray | None) -> float:
    """Accuracy with labels; else top-1 agreement with the original (classifier outputs), else cosine."""
    if out.dim() == 2:
        pred = out.argmax(1).numpy()
        truth = labels if labels is not None else reference.argmax(1).numpy()
        return float((pred == truth).mean())
    import torch

    return float(torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).mean())


def _cache_key(spec: ModelSpec, x: Any, labels: np.ndarray | None, ratio: float, importance: str,
               task: str = "") -> str:
    import torch_pruning as tp

    h = hashlib.sha256(json.dumps({"schema": CACHE_SCHEMA, "model": spec.sha256, "ratio": ratio,
                                   "importance": importance, "torch_pruning": getattr(tp, "__version__", "?"),
                                   **({"task": task} if task else {})},
                                  sort_keys=True).encode())
    h.update(x.numpy().tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()


def _read(path: Path, key: str) -> list[GroupSensitivity] | None:
    try:
        d = json.loads(path.read_text())
        return [GroupSensitivity(**g) for g in d["groups"]] if d.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, key: str, groups: list[GroupSensitivity]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "key": key, "groups": [g.to_dict() for g in groups]}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time
