"""How much lower-precision convolutions change the distillation objectives' gradients, against float64.

Usage: `python jobs/precision_check.py [--device auto|cpu|cuda] [--classes 4] [--frames 8] [--size 32] [--width 64]
        [--syn-steps 5] [--threads 2]`

Mixed precision is only worth having if DM's and MTT's gradients survive it: DM matches the *mean* embeddings of
two batches (a small difference of large numbers), MTT differentiates through `syn_steps` student updates twice.
This script runs one DM loss and one memory-constant MTT iteration on the same synthetic pixels, real clips and
expert segment (the library's `dm_loss` and `mtt_memory_constant` on ConvNet3D, dropout on), in each precision:

- `fp32`: what vdistill runs on a CPU (and on a GPU with `torch.backends.cudnn.allow_tf32 = False`);
- `tf32 operands`, `bf16 operands`: every convolution, forward and backward (so every derivative of the
  double-backward too), gets its input, weight and incoming gradient rounded to 10 (TF32) or 7 (bf16) mantissa
  bits, accumulates and returns fp32: the arithmetic of GPU tensor cores. TF32 is what PyTorch's cuDNN
  convolutions use by default on Ampere and later GPUs (`torch.backends.cudnn.allow_tf32` is True);
- `bf16 autocast`: `torch.autocast(device, bfloat16)`, this device's own bf16 kernels (activations stored in bf16
  too). On a CPU without AVX-512 BF16 / AMX, PyTorch's reference kernels (tens of times slower, and not what a
  GPU computes).

Each row: relative difference of the loss and of the gradient on the synthetic pixels (and of syn_lr's gradient
for MTT) to float64, the cosine to float64's gradient, and the seconds it took. fp32's own row is the floor (max
pooling routes a gradient to one of two near-equal inputs, so a 1e-6 change can move it).
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdistill.device import resolve_device  # noqa: E402
from vdistill.distill.objectives import dm_loss, mtt_memory_constant, mtt_plan  # noqa: E402
from vdistill.models import ConvNet3D, flat_params  # noqa: E402

_CONVOLUTIONS = {torch.ops.aten.convolution.default: 2, torch.ops.aten.convolution_backward.default: 3}


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 `t` rounded to nearest (ties to even) with `bits` explicit mantissa bits, still fp32."""
    drop = 23 - bits
    i = t.view(torch.int32)  # the bit pattern; integer ops keep the tensor's layout (channels-last stays so)
    return ((i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)) & ~((1 << drop) - 1)).view(torch.float32)


class ReducedOperands(TorchDispatchMode):
    """Every convolution's tensor operands (input, weight; for a backward also the incoming gradient) rounded to
    `bits` mantissa bits before an fp32 convolution: tensor-core arithmetic, emulated exactly on any device."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        count = _CONVOLUTIONS.get(func)
        if count is not None:
            args = tuple(round_mantissa(a, self.bits) if k < count and a.dtype == torch.float32 else a
                         for k, a in enumerate(args))
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--syn-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":  # fp32 means fp32: the tf32 row is emulated explicitly
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    c, t, size = args.classes, args.frames, args.size
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student = ConvNet3D(c, t, size, width=args.width, head="adaptive")
    embedder = ConvNet3D(c, t, size, width=args.width, head="adaptive").train().requires_grad_(False)
    theta0 = flat_params(student)
    target = theta0 + 0.01 * torch.randn(theta0.shape, generator=g)
    syn = torch.randn(c * 2, t, 3, size, size, generator=g)
    real = torch.randn(c * 8, t, 3, size, size, generator=g) * 1.2 + 0.1
    labels = torch.arange(c).repeat_interleave(2)
    plan = mtt_plan(len(labels), args.syn_steps, len(labels), torch.Generator().manual_seed(1))

    def dm(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        net = embedder.to(device=device, dtype=dtype)
        x = syn.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
        r = real.to(device=device, dtype=dtype)
        loss = dm_loss(lambda v: net.embed(v).to(dtype), [r[k * 8:(k + 1) * 8] for k in range(c)],
                       [x[labels.to(device) == k] for k in range(c)])
        loss.backward()
        return loss.detach(), x.grad, None

    def mtt(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        net = student.to(device=device, dtype=dtype)
        x = syn.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
        lr = torch.tensor(0.01, device=device, dtype=dtype, requires_grad=True)
        y = labels.to(device)
        loss = mtt_memory_constant(net, theta0.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype),
                                   lr, lambda idx, gen, *rows: (x[idx.to(device)], y[idx.to(device)]), plan, [x])
        return loss, x.grad, lr.grad

    precisions: list[tuple[str, Callable[[], AbstractContextManager]]] = [
        ("fp32", nullcontext),
        ("tf32 operands (fp32 accumulate)", lambda: ReducedOperands(10)),
        ("bf16 operands (fp32 accumulate)", lambda: ReducedOperands(7)),
        (f"bf16 autocast on {device.type}", lambda: torch.autocast(device.type, dtype=torch.bfloat16)),
    ]
    print(f"ConvNet3D width {args.width}, {c} classes x 2 synthetic clips of {t}x{size}^2, 8 real per class, "
          f"MTT memory-constant syn_steps {args.syn_steps}; device {device}"
          + ("" if device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
             else " (this CPU has no native bf16: its autocast row runs reference kernels)"))
    header = (f"{'objective':<4} {'precision':<34} {'loss rel':>9} {'grad rel':>9} {'grad cos':>9} "
              f"{'syn_lr grad rel':>15} {'seconds':>8}")
    print(header)
    print("-" * len(header))
    for name, objective in [("DM", dm), ("MTT", mtt)]:
        ref_loss, ref_grad, ref_lr = (v if v is None else v.double().cpu() for v in objective(torch.float64))
        for label, context in precisions:
            tic = time.perf_counter()
            with context():
                loss, grad, lr_grad = objective(torch.float32)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - tic
            grad = grad.double().cpu()
            lr_rel = "" if ref_lr is None else f"{abs(lr_grad.item() - ref_lr.item()) / abs(ref_lr.item()):.1e}"
            print(f"{name:<4} {label:<34} {abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()):>9.1e} "
                  f"{((grad - ref_grad).norm() / ref_grad.norm()).item():>9.1e} "
                  f"{F.cosine_similarity(grad.flatten(), ref_grad.flatten(), 0).item():>9.4f} {lr_rel:>15} "
                  f"{seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
