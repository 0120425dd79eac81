"""Structured pruning with Torch-Pruning (DepGraph): whole channels go, so the model really runs faster.

Torch-Pruning finds the coupled layers (a residual Add ties every conv that feeds it) and removes the
same channels from all of them; edgekit chooses the importance criterion, the ratios, the ignored
layers (by default the classifier: its outputs are the classes) and rounds every remaining channel
count to the target's preferred multiple for the chosen precision, so the pruned model stays aligned
to the device's SIMD lanes / tensor cores. Iterative steps call `between_steps` (fine-tuning).

The pruned structure is saved with Torch-Pruning's own `tp.state_dict` (tensors and plain metadata,
loadable with `torch.load(weights_only=True)`) and re-applied to a fresh module by `load_pruned`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from edgekit.errors import BadInput

IMPORTANCES = ("l1", "l2", "bn", "taylor", "random")


@dataclass
class PruneSettings:
    ratio: float = 0.5  # fraction of channels removed per prunable group
    importance: str = "l1"  # l1 | l2 | bn (BatchNorm scale) | taylor (needs batches with a loss)
    global_ranking: bool = False  # rank channels across layers instead of a uniform ratio per layer
    steps: int = 1  # iterative pruning: the ratio is reached in this many steps
    round_to: int | None = None  # channel multiple (from the target and precision)
    layer_ratios: dict[str, float] = field(default_factory=dict)  # module name -> its own ratio
    ignored_layers: list[str] = field(default_factory=list)  # module names kept whole
    max_layer_ratio: float = 0.9  # with global ranking, never strip a layer to nothing

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise BadInput(f"--prune {self.ratio}: give the fraction of channels to remove, 0 <= r < 1")
        if self.importance not in IMPORTANCES:
            raise BadInput(f"unknown importance '{self.importance}': use one of {', '.join(IMPORTANCES)}")
        if self.steps < 1:
            raise BadInput("pruning steps must be >= 1")


@dataclass
class LayerChange:
    name: str
    kind: str
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    macs_before: int = 0
    macs_after: int = 0


@dataclass
class PruneReport:
    settings: dict[str, Any]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: list[LayerChange]

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["macs_ratio"] = round(self.macs_ratio, 4)
        d["params_ratio"] = round(self.params_after / self.params_before, 4) if self.params_before else 1.0
        return d


def _importance(name: str) -> Any:
    imp = tp.importance
    return {"l1": lambda: imp.GroupMagnitudeImportance(p=1), "l2": lambda: imp.GroupMagnitudeImportance(p=2),
            "bn": imp.BNScaleImportance, "taylor": imp.GroupTaylorImportance, "random": imp.RandomImportance}[name]()


_WEIGHTED = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


def default_ignored(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Layers whose output channels are the model's outputs (a classifier's classes, a detector's
    box coordinates): pruning them would change what the model means."""
    with torch.no_grad():
        outputs = model(example)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    widths = {o.shape[1] for o in outputs if o.dim() >= 2}
    leaves = [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    # The last weighted layers whose width is an output width feed the outputs directly.
    out_layers = []
    for n, m in reversed(leaves):
        width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if width in widths:
            out_layers.append(n)
            widths.discard(width)
        if not widths:
            break
    return list(dict.fromkeys([*out_layers, *_feeding_outputs(model, example)]))


def _feeding_outputs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Trainable weighted layers that reach a model output through no other trainable weighted layer: a detector's
    last head convs (YOLOv8's 64 = 4 x 16 box bins and nc class maps) are reshaped and concatenated into one
    [1, 4+nc, N] output, so no width matches, and pruning them breaks the reshape. A frozen layer (Ultralytics' DFL
    1x1 conv, requires_grad False) is a fixed operation, walked through."""
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception:  # an untraceable model: the width rule alone, as before
        return []
    names = {m: n for n, m in model.named_modules()}

    def trainable(m: Any) -> bool:
        return isinstance(m, _WEIGHTED) and bool(m.weight.requires_grad)

    def reaches_output(node: Any, seen: set[int]) -> bool:
        if not node.outputs:
            return True
        for o in node.outputs:
            if id(o) not in seen and not trainable(o.module):
                seen.add(id(o))
                if reaches_output(o, seen):
                    return True
        return False

    return [names[m] for m, node in graph.module2node.items()
            if trainable(m) and m in names and reaches_output(node, set())]


def _widths(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            out[n] = ("conv", m.out_channels, sum(p.numel() for p in m.parameters(recurse=False)))
        elif isinstance(m, nn.Linear):
            out[n] = ("linear", m.out_features, sum(p.numel() for p in m.parameters(recurse=False)))
    return out


def nearest_multiple_ratios(model: nn.Module, example: torch.Tensor, settings: PruneSettings,
                            ignored: list[nn.Module]) -> dict[nn.Module, float]:
    """Per-group ratios whose kept channels are the multiple of round_to nearest to what the ratio keeps.
    Torch-Pruning rounds the kept count down: 15 % of a 32-channel layer at a multiple of 16 (AVX-512's fp32
    lanes) removes half of it, and a 15 % prune of the bundled detector removed 40 % of its MACs. A layer
    narrower than one multiple, or grouped, keeps Torch-Pruning's own rule (its ratio, rounded down)."""
    step = int(settings.round_to or 1)
    names = {m: n for n, m in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    out: dict[nn.Module, float] = {}
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        root = group[0].dep.target.module
        ratio = settings.layer_ratios.get(names.get(root, ""), settings.ratio)
        width = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        if width < step or getattr(root, "groups", 1) != 1:
            out[root] = ratio
            continue
        keep = min(width, max(step, round(width * (1 - ratio) / step) * step))
        # half a channel below: Torch-Pruning keeps int(width * (1 - ratio)), and a float a hair under `keep`
        # would become keep - 1 and then round down a whole multiple
        out[root] = min(settings.max_layer_ratio, max(0.0, (width - keep - 0.5) / width))
    return out


def prune(model: nn.Module, example: torch.Tensor, settings: PruneSettings,
          loss_batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
          loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
          between_steps: Callable[[int], None] | None = None) -> PruneReport:
    """Prune `model` in place. Taylor importance needs `loss_batches` (and `loss_fn(output, target)`;
    without labels a distillation-style loss against the unpruned outputs works too)."""
    settings.check()
    model.eval()
    modules = dict(model.named_modules())
    unknown = [n for n in [*settings.ignored_layers, *settings.layer_ratios] if n not in modules]
    if unknown:
        raise BadInput(f"no layer named {unknown[0]} in the model (names as in model.named_modules())")
    ignored_names = settings.ignored_layers or default_ignored(model, example)
    macs0, params0, layer_macs0, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    before = _widths(model)
    ratios = {modules[n]: r for n, r in settings.layer_ratios.items()}
    if settings.round_to and settings.steps == 1 and not settings.global_ranking:
        ratios = nearest_multiple_ratios(model, example, settings, [modules[n] for n in ignored_names])
    pruner = tp.pruner.MetaPruner(
        model, example, importance=_importance(settings.importance), global_pruning=settings.global_ranking,
        pruning_ratio=settings.ratio, pruning_ratio_dict=ratios,
        max_pruning_ratio=settings.max_layer_ratio, iterative_steps=settings.steps,
        ignored_layers=[modules[n] for n in ignored_names], round_to=settings.round_to,
    )
    batches = list(loss_batches) if loss_batches is not None else None  # reused at every step
    for step in range(settings.steps):
        if settings.importance == "taylor":
            if batches is None or loss_fn is None:
                raise BadInput("Taylor importance needs data with a loss: pass --train (or --calib) data")
            _taylor_gradients(model, batches, loss_fn)
        pruner.step()
        model.zero_grad(set_to_none=True)
        if between_steps is not None:
            between_steps(step)
    macs1, params1, layer_macs1, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    after = _widths(model)
    modules = dict(model.named_modules())  # the same module objects before and after: Torch-Pruning edits in place
    layers = [LayerChange(n, kind, c0, after[n][1], p0, after[n][2], int(layer_macs0.get(modules[n], 0)),
                          int(layer_macs1.get(modules[n], 0)))
              for n, (kind, c0, p0) in before.items() if n in after]
    recorded = asdict(settings) | {"ignored_layers": ignored_names}
    return PruneReport(recorded, int(macs0), int(macs1), int(params0), int(params1), layers)


def _taylor_gradients(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                      loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
    """Accumulate the loss gradients Taylor importance reads, leaving the model as it was: in eval
    mode (a train-mode pass moves BatchNorm's running statistics, so ranking would change the model),
    and every buffer restored in case some layer writes one even in eval mode."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.zero_grad()
    model.eval()
    with torch.enable_grad():
        for x, y in batches:
            loss_fn(model(x), y).backward()  # gradients accumulate over the batches
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "num_channels", "num_groups", "normalized_shape", "embed_dim")


def save_pruned(model: nn.Module, path: str) -> None:
    """The pruned structure (each layer's width attributes) and its weights, as plain tensors and
    numbers: loadable with torch.load(weights_only=True), unlike a pickled module."""
    attrs = {}
    for name, m in model.named_modules():
        found = {a: getattr(m, a) for a in _SHAPE_ATTRS if isinstance(getattr(m, a, None), (int, tuple))}
        if found:
            attrs[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in found.items()}
    torch.save({"format": "edgekit-pruned/1", "attributes": attrs, "state_dict": model.state_dict()}, path)


def load_pruned(fresh: nn.Module, path: str) -> nn.Module:
    """Re-apply a saved pruned structure and its weights to a freshly built (unpruned) module."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != "edgekit-pruned/1":
        raise BadInput(f"{path} is not an edgekit pruned model (made by `edgekit prune`)")
    modules = dict(fresh.named_modules())
    for name, attrs in saved["attributes"].items():
        if name not in modules:
            raise BadInput(f"{path} does not fit this model: it has no layer {name}")
        for a, v in attrs.items():
            setattr(modules[name], a, tuple(v) if isinstance(v, list) else v)
    for key, tensor in saved["state_dict"].items():
        owner, _, leaf = key.rpartition(".")
        m = modules[owner]
        if leaf in m._parameters and m._parameters[leaf] is not None:
            m._parameters[leaf] = nn.Parameter(tensor.clone(), requires_grad=m._parameters[leaf].requires_grad)
        elif leaf in m._buffers:
            m._buffers[leaf] = tensor.clone()
    fresh.load_state_dict(saved["state_dict"])
    return fresh
