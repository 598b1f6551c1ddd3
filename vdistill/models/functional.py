"""Run any network from one flat parameter vector: what trajectory matching differentiates through.

The order is `named_parameters()` order, which each network fixes by declaration (ConvNet3D:
conv0.w, conv0.b, conv1.w, conv1.b, conv2.w, conv2.b, logit.w, logit.b). Buffers (BatchNorm
statistics in the torchvision models) stay in the module.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def param_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def flat_params(model: nn.Module) -> torch.Tensor:
    """`(P,)` copy of all parameters (a copy, never a view: snapshots must not alias live weights)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of `flat` shaped like each parameter, keyed by name (differentiable in `flat`)."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the model has {offset} parameters")
    return out


def load_flat_(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat vector into the module's parameters in place."""
    with torch.no_grad():
        for name, value in unflatten(model, flat.to(next(model.parameters()).device)).items():
            model.get_parameter(name).copy_(value)
    return model


class _MethodCall(nn.Module):
    """Lets functional_call reach a method other than forward (e.g. `embed`)."""

    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.inner, self.method)(x)


def functional_forward(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, method: str = "forward") -> torch.Tensor:
    """`model(x)` (or `model.<method>(x)`) with parameters taken from `flat`."""
    params = unflatten(model, flat)
    if method == "forward":
        return functional_call(model, params, (x,))
    return functional_call(_MethodCall(model, method), {f"inner.{k}": v for k, v in params.items()}, (x,))
