"""jobs/precision_check.py's emulation of tensor-core arithmetic, on which the README's precision table rests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_SPEC = importlib.util.spec_from_file_location(
    "precision_check", Path(__file__).resolve().parents[1] / "jobs" / "precision_check.py")
precision_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(precision_check)


def test_rounding_to_7_bits_is_torch_bfloat16_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10000, generator=g) * 10.0 ** torch.randint(-8, 8, (10000,), generator=g),
                   torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 0.0, -0.0])])  # ties to even
    assert torch.equal(precision_check.round_mantissa(x, 7), x.bfloat16().float())


def test_reduced_operands_rounds_every_convolution_operand_forward_and_backward():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(5, 3, 3, 3, 3, generator=g)
    gy = torch.randn(2, 5, 4, 8, 8, generator=g)
    xr, wr = x.requires_grad_(True), w.requires_grad_(True)
    with precision_check.ReducedOperands(7):
        y = F.conv3d(xr, wr, padding=1)
        gx, gw = torch.autograd.grad(y, [xr, wr], gy)
    xb, wb = x.detach().bfloat16().float().requires_grad_(True), w.detach().bfloat16().float().requires_grad_(True)
    y_ref = F.conv3d(xb, wb, padding=1)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, [xb, wb], gy.bfloat16().float())
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-5) and torch.allclose(gw, gw_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(F.conv3d(x, w, padding=1), y, rtol=1e-5, atol=1e-5)  # fp32 differs: it did round
