"""Low-rank factorisation of large Linear and 1x1 conv layers (truncated SVD).

W (out x in) ~ U_r S_r V_r^T becomes two layers: in -> r (V_r^T, no bias) and r -> out (U_r S_r, the
bias). The rank keeps `energy` of the squared singular values; a layer is replaced only when the two
factors hold fewer weights than W, so the model gets smaller and its MACs drop by the same ratio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class Factorised:
    name: str
    shape: tuple[int, int]
    rank: int
    params_before: int
    params_after: int
    energy_kept: float


def _rank_for(s: torch.Tensor, energy: float) -> int:
    cumulative = torch.cumsum(s**2, 0) / torch.sum(s**2).clamp_min(1e-30)
    return int(torch.searchsorted(cumulative, torch.tensor(energy)).item()) + 1


def _split(weight: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, int, float] | None:
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    r = min(_rank_for(s, energy), len(s))
    out_f, in_f = weight.shape
    if r * (in_f + out_f) >= in_f * out_f:
        return None  # no saving at this energy
    kept = float(torch.sum(s[:r] ** 2) / torch.sum(s**2))
    return vh[:r], u[:, :r] * s[:r], r, kept


def factorise(model: nn.Module, energy: float = 0.95, min_params: int = 4096,
              skip: tuple[str, ...] = ()) -> list[Factorised]:
    """Replace, in place, every Linear and 1x1 (ungrouped, stride-1) Conv2d with at least `min_params`
    weights whose SVD keeps `energy` at a lower weight count. Returns what changed."""
    if not 0 < energy <= 1:
        raise ValueError("energy must be in (0, 1]")
    changed = []
    for name, module in list(model.named_modules()):
        if name in skip:
            continue
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            weight = getattr(child, "weight", None)
            if full in skip or not isinstance(weight, torch.Tensor) or weight.numel() < min_params:
                continue
            replacement, record = _factorise_layer(full, child, energy)
            if replacement is not None and record is not None:
                setattr(module, child_name, replacement)
                changed.append(record)
    return changed


def _factorise_layer(name: str, layer: nn.Module, energy: float) -> tuple[nn.Module | None, Factorised | None]:
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            parts = _split(layer.weight, energy)
            if parts is None:
                return None, None
            first_w, second_w, r, kept = parts
            first = nn.Linear(layer.in_features, r, bias=False)
            second = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
            first.weight.copy_(first_w)
            second.weight.copy_(second_w)
        elif (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1
              and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid")):
            w = layer.weight[:, :, 0, 0]
            parts = _split(w, energy)
            if parts is None:
                return None, None
            first_w, second_w, r, kept = parts
            first = nn.Conv2d(layer.in_channels, r, 1, bias=False)
            second = nn.Conv2d(r, layer.out_channels, 1, bias=layer.bias is not None)
            first.weight.copy_(first_w[:, :, None, None])
            second.weight.copy_(second_w[:, :, None, None])
        else:
            return None, None
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    before = layer.weight.numel()
    after = first.weight.numel() + second.weight.numel()
    record = Factorised(name, tuple(second.weight.shape[:1]) + tuple(first.weight.shape[1:2]), r, before, after,
                        round(kept, 5))
    return nn.Sequential(first, second), record


def as_dicts(records: list[Factorised]) -> list[dict]:
    return [asdict(r) for r in records]
