"""Benchmark the distillation loop: seconds per iteration (DM, MTT) and peak memory, memory-constant vs unrolled.

Usage: `python jobs/bench_distill.py [--shape small|paper] [--quick] [--device auto|cpu|cuda] [--threads N]
        [--precision fp32,tf32,bf16]`
       `python jobs/bench_distill.py --pipeline`
       `python jobs/bench_distill.py --workers 1,2`
       `python jobs/bench_distill.py --scaling 1,2 --shape paper`

`--scaling 1,2`: the library loop (`distill` with `objectives.Shard`) split over N gloo processes of `--threads`
(default 1) each, DM and MTT (memory-constant, syn_steps 10) at `--shape`: seconds per iteration, the speed-up
over the first count next to the ideal (the ratio of workers), the seconds per iteration spent in all-reduces
(waiting for the slower rank included) and, measured separately after a barrier, one all-reduce of the
student's P parameters (MTT makes 2 * syn_steps + 1 all-reduces per iteration, DM one of the set's size).

`--workers 1,2`: the same DM+S2D dynamic stage through the pipeline with each `run.distill_workers` (1 = the
coordinator's own loop with every core; N > 1 = a Ray Train group of N workers of `cores / N` threads), its
seconds per iteration and the speed-up over the first count next to the ideal, the ratio of cores used (on one
machine the same cores: 1.0, so the column shows what the worker group costs); no validation split: timing only.

`--pipeline`: the DM+S2D dynamic stage run through the pipeline (`run_pipeline`: coordinator actor, local Ray,
real footage at 16 classes x 16x64^2, ConvNet3D width 128 paper head, batch_real 16), its seconds per iteration
(from the stage's manifest) next to the library loop's at the same shape with every core.

`--shape small` (the default): an S2D set of 10 classes x 1 video, 8x32^2 clips, ConvNet3D width 64, syn_steps
5/10/20. `--shape paper`: the original code's configuration (16 classes x 1 video, 16x64^2, ConvNet3D width 128
with the paper head, pixel sets, batch_real 16, syn_steps 10/20), printed next to the original code's own
per-iteration figures (`ORIGINAL`, timed one run after vdistill's on one host), flagged as not comparable when
this host's matmul rate is more than 15% off that host's.

`--precision fp32,tf32,bf16`: the first precision gets the full table; then DM and MTT (both modes, the first
syn_steps) in each one side by side (fp32: TF32 off; tf32: PyTorch's default on a CUDA card, TF32 convolutions;
bf16: the loop under `torch.autocast`, which a CPU runs only with native bf16), followed by
`jobs/precision_check.py`'s error of each against float64 on DM's and MTT's gradients. No bf16 switch exists in
vdistill yet: this measures what one would give.

Every configuration also reports its arithmetic: the FLOPs of an iteration (`torch.utils.flop_counter`, counted
in the memory worker) and the rate the loop ran them at, next to this host's 2048^2 fp32 matmul rate, so that a
loop's efficiency compares across hosts where seconds do not.

Every configuration runs in a fresh subprocess so that peaks do not leak between them. Peak memory is
- on CUDA: `torch.cuda.max_memory_allocated` during the iterations minus the allocation before them;
- on CPU: the growth of the process's peak RSS (`resource.getrusage(...).ru_maxrss`) over its value after setup
  (real clips, trajectories and a tiny warm-up of the kernels and optimisers come first, so the growth is what
  the stage itself needs: synthetic set, networks, graphs). RSS is an honest upper bound: it includes the
  allocator's slack. Memory workers run with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_) so that freed
  blocks go back to the OS instead of inflating RSS with heap fragmentation (without it both modes read 20-60 MiB
  higher and noisier). That setting makes every large allocation a fresh mmap, which slows CPU runs, so times
  come from a second worker with the default allocator: the fastest of the iterations after the first (the
least disturbed one on a shared machine; both modes run identical draws, so iterations do the same work).
The memory-constant mode keeps `syn_steps * P` floats of student weights in *host* memory (`theta MiB`); on CUDA
that is off the device, so the device-side peak is `constant - theta`, the column the flatness target is about.
On CPU host and device are the same memory, so the total `constant MiB` grows by exactly that amount.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "small": dict(classes=10, vpc=1, frames=8, size=32, width=64, head="adaptive", set="s2d", batch_real=16,
                  syn_steps=[5, 10, 20]),
    "paper": dict(classes=16, vpc=1, frames=16, size=64, width=128, head="paper", set="pixels", batch_real=16,
                  syn_steps=[10, 20]),
    "pipeline": dict(classes=16, vpc=1, frames=16, size=64, width=128, head="paper", set="s2d", batch_real=16,
                     syn_steps=[]),
}
PIPELINE = ["demo.kind=footage", "demo.train_per_class=8", "demo.test_per_class=2", "demo.size=64", "demo.frames=16",
            "decode.frames=16", "decode.size=64", "model.width=128", "model.head=paper", "train.standardize=true",
            "dynamic.method=dm", "dynamic.batch_real=16", "baselines.s2d_methods=[]", "baselines.pixel_methods=[]",
            "static.iterations=1", "tracking.enabled=false", "run.name=bench-pipeline"]
# The original code at the paper shape, 2 threads, fp32, timed by ../bench-original/side_by_side.sh one run after
# vdistill's on one host (median of 3 iterations after a warm-up, peak RSS of its process), 2026-12-07 on a 2-core
# AMD EPYC (AVX2) whose 2048^2 fp32 matmul ran at ORIGINAL_HOST_GFLOPS on 2 threads: (s/iteration, peak GB).
# Both codes are bound by that rate (see the GFLOP/s column), so on another host compare only when the measured
# rate is within ~15% of it, and otherwise re-time both codes with that script.
ORIGINAL = {("dm", 1): (15.02, 1.40), ("mtt", 10): (95.60, 4.03)}
ORIGINAL_HOST_GFLOPS = 68.3


def _loop_runner(spec: dict, device):
    """`run(iterations, seconds, shard=None)`: the configured loop on fresh synthetic data (the same on every call
    and every worker), appending each iteration's seconds; and the student's parameter count."""
    import torch

    from vdistill.config import BaselinesConfig, DynamicConfig, ModelConfig
    from vdistill.distill.loop import Recipe, distill
    from vdistill.distill.synset import PixelSet, S2DSet, SlotLayout
    from vdistill.models import ConvNet3D, flat_params

    shape = SHAPES[spec["shape"]]
    c, t, size, width, head = shape["classes"], shape["frames"], shape["size"], shape["width"], shape["head"]
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (c, 16, t, size, size, 3), generator=g, dtype=torch.uint8)
    sample_real = lambda k, n, gen: real[k, torch.randint(16, (n,), generator=gen)]  # noqa: E731
    build = lambda: ConvNet3D(c, t, size, width=width, head=head)  # noqa: E731
    torch.manual_seed(0)  # the same expert start on every worker
    theta0 = flat_params(build())
    steps = [theta0 + 0.01 * e * torch.randn(theta0.shape, generator=g) for e in range(3)]
    snapshot = lambda expert, epoch: steps[epoch]  # noqa: E731
    model_cfg = ModelConfig(width=width, head=head)
    layout = SlotLayout(c, shape["vpc"])

    def run(iterations: int, seconds: list[float], shard=None) -> None:
        g.manual_seed(1)
        if shape["set"] == "s2d":
            synset = S2DSet.create(layout, torch.randn(c * layout.spc, 3, size, size, generator=g).to(device), t, g)
        else:
            synset = PixelSet.from_real(sample_real, c, shape["vpc"], g, device)
        cfg = DynamicConfig(method=spec["method"], iterations=iterations, syn_steps=spec["syn_steps"],
                            mtt_mode=spec["mode"], max_start_epoch=1, expert_epochs=1,
                            batch_real=shape["batch_real"], checkpoint_every=10**6)
        recipe = Recipe.dynamic(cfg) if shape["set"] == "s2d" else Recipe.pixels(
            spec["method"], BaselinesConfig(pixel_iterations=iterations), cfg)
        distill(synset, recipe, sample_real, torch.Generator().manual_seed(0), device, num_classes=c,
                model_cfg=model_cfg, snapshot=snapshot, expert_ids=[0], shard=shard,
                on_metrics=lambda it, m: seconds.append(m["seconds"]))

    return run, theta0.numel()


def _worker(spec: dict) -> dict:
    """One configuration in this process: build everything, warm up, then measure `spec['iters']` iterations."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vdistill.device import resolve_device

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    precision = spec.get("precision", "fp32")
    if device.type == "cuda":  # PyTorch's default allows TF32 convolutions: "fp32" turns it off
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.benchmark = spec.get("cudnn_benchmark", False)
    run, params = _loop_runner(spec, device)
    _warm_up(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds: list[float] = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with autocast, FlopCounterMode(display=False) if spec.get("count_flops") else nullcontext() as counter:
        run(spec["iters"] + 1, seconds)
    seconds = seconds[1:]  # the first iteration pays one-time kernel setup
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_base) * 1024  # ru_maxrss is KiB on Linux
    total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process, as the original's figure
    flops = counter.get_total_flops() / (spec["iters"] + 1) if counter is not None else None
    return {"seconds": min(seconds), "peak_mib": peak / 2**20, "total_mib": total / 2**20, "device": str(device),
            "theta_mib": (spec["syn_steps"] * params * 4 / 2**20 if spec["mode"] == "constant" else 0.0),
            "gflop": None if flops is None else flops / 1e9}


def _matmul_worker(spec: dict) -> dict:
    """This host's fp32 rate on a 2048^2 matmul with `spec['threads']` threads (GFLOP/s, the best of 20): the
    yardstick that says whether figures from another host compare."""
    import torch

    torch.set_num_threads(spec["threads"])
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(20):
        tic = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tic)
    return {"gflops": 2 * 2048**3 / best / 1e9}


def _scaling_worker(rank: int, world: int, spec: dict, store: str, out: str) -> None:
    """Rank `rank` of `world` gloo processes running the loop split over them (`objectives.Shard`): seconds per
    iteration, the seconds spent in its all-reduces (waiting for the other ranks included), and, after a barrier,
    the time of one all-reduce of the student's parameters alone."""
    import datetime

    import torch
    import torch.distributed as dist

    from vdistill.device import resolve_device
    from vdistill.distill.objectives import Shard

    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    try:
        device = resolve_device(spec["device"])
        run, params = _loop_runner(spec, device)
        _warm_up(device)
        reduce_seconds = [0.0]

        def all_reduce(flat: torch.Tensor) -> None:
            tic = time.perf_counter()
            dist.all_reduce(flat)
            reduce_seconds[0] += time.perf_counter() - tic

        seconds: list[float] = []
        run(spec["iters"] + 1, seconds, Shard(rank, world, all_reduce) if world > 1 else None)
        buffer = torch.zeros(params, device=device)
        dist.barrier()
        tic = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(buffer)
        one = (time.perf_counter() - tic) / 5
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": seconds[1:], "reduce_s_per_it": reduce_seconds[0] / len(seconds),
                                             "one_reduce_s": one if world > 1 else 0.0, "params": params}))
    finally:
        dist.destroy_process_group()


def sharded_scaling(device: str, shape: str, threads: int, iters: int, counts: list[int]) -> None:
    """DM and MTT (memory-constant, syn_steps 10) of the library loop split over 1, 2, ... gloo processes."""
    import tempfile

    import torch.multiprocessing as mp

    spec0 = SHAPES[shape]
    print(f"library loop split over N gloo processes of {threads} thread(s) each: {spec0['set']} set, "
          f"{spec0['classes']} classes x vpc {spec0['vpc']}, {spec0['frames']}x{spec0['size']}^2, ConvNet3D width "
          f"{spec0['width']} {spec0['head']} head, batch_real {spec0['batch_real']}; median of {iters} iterations "
          f"after one warm-up, on {os.cpu_count()} core(s)")
    print(f"{'method':<16} {'workers':>7} {'s/it':>8} {'speed-up':>8} {'ideal':>5} {'all-reduce s/it':>15} "
          f"{'one all-reduce of P':>19}")
    for method, syn_steps in (("dm", 1), ("mtt", 10)):
        first = None
        for n in counts:
            spec = dict(device=device, threads=threads, iters=iters, shape=shape, method=method, mode="constant",
                        syn_steps=syn_steps)
            with tempfile.TemporaryDirectory(prefix="vdistill-scaling-") as tmp:
                out = os.path.join(tmp, "rank0.json")
                mp.start_processes(_scaling_worker, args=(n, spec, os.path.join(tmp, "store"), out), nprocs=n,
                                   join=True, start_method="spawn")
                result = json.loads(Path(out).read_text())
            median = sorted(result["seconds"])[len(result["seconds"]) // 2]
            first = first or median
            name = "DM" if method == "dm" else f"MTT constant {syn_steps}"
            print(f"{name:<16} {n:>7} {median:>8.2f} {first / median:>8.2f} {n / counts[0]:>5.1f} "
                  f"{result['reduce_s_per_it']:>15.3f} {result['one_reduce_s'] * 1e3:>16.1f} ms", flush=True)


def _warm_up(device) -> None:
    """Lazy imports and kernel libraries, on a workload far smaller than any measured one."""
    import torch

    x = torch.randn(1, 3, 4, 8, 8, device=device, requires_grad=True)
    w = torch.randn(2, 3, 3, 7, 7, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.conv3d(x, w, padding=(1, 3, 3)).relu().sum(), w, create_graph=True)
    g.square().sum().backward()
    torch.optim.SGD([w], lr=0.1, momentum=0.9).step()  # imports torch._dynamo once


def _worker_run(spec: dict, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), **env}, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(spec: dict) -> dict:
    """Seconds from a default-allocator worker, peak memory from a fixed-mmap-threshold worker (see above) that
    also counts the FLOPs of an iteration (`torch.utils.flop_counter`; on CUDA a third worker does)."""
    timed = _worker_run(spec, {})
    if timed["device"].startswith("cuda"):
        return {**timed, "gflop": _worker_run({**spec, "iters": 1, "count_flops": True}, {})["gflop"]}
    memory = _worker_run({**spec, "iters": 1, "count_flops": True}, {"MALLOC_MMAP_THRESHOLD_": "65536"})
    return {**timed, "peak_mib": memory["peak_mib"], "total_mib": memory["total_mib"], "gflop": memory["gflop"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=["small", "paper"])
    parser.add_argument("--quick", action="store_true", help="one timed iteration, the two smallest syn_steps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per worker (default: 1 for small, the least noisy when shared; 2 for paper, "
                        "as the reference figures)")
    parser.add_argument("--pipeline", action="store_true",
                        help="the dynamic stage through the pipeline vs the library")
    parser.add_argument("--workers", help="comma list of run.distill_workers for the pipeline's DM+S2D stage")
    parser.add_argument("--scaling", help="comma list of gloo process counts for the library loop's DM and MTT "
                        "(--shape paper, --threads 1 unless given)")
    parser.add_argument("--precision", default="fp32",
                        help="comma list of fp32, tf32 (CUDA only: TF32 convolutions, PyTorch's default on Ampere and "
                        "later) and bf16 (the loop under torch.autocast; CUDA, or a CPU with native bf16): the first "
                        "gets the full table, the others DM and MTT at the first syn_steps next to it, then "
                        "jobs/precision_check.py's gradient errors of each against float64")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="CUDA: let cuDNN time its convolution algorithms for each shape first "
                        "(torch.backends.cudnn.benchmark); compare with a run without it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(_matmul_worker(spec) if spec.get("matmul") else _worker(spec)))
        return
    if args.scaling:
        sharded_scaling(args.device, args.shape, args.threads or 1, 1 if args.quick else 3,
                        [int(n) for n in args.scaling.split(",")])
        return
    if args.workers:
        workers_scaling(args.device, 2 if args.quick else 4, [int(n) for n in args.workers.split(",")])
        return
    if args.pipeline:
        pipeline_vs_library(args.device, 2 if args.quick else 4)
        return

    shape = SHAPES[args.shape]
    threads = args.threads or (2 if args.shape == "paper" else 1)
    iters = 1 if args.quick else (2 if args.shape == "paper" else 4)
    steps_list = shape["syn_steps"][:2] if args.quick else shape["syn_steps"]
    precisions = args.precision.split(",")
    if _unavailable(precisions[0], args.device):
        parser.error(f"--precision {precisions[0]}: {_unavailable(precisions[0], args.device)}")
    base = dict(device=args.device, threads=threads, iters=iters, shape=args.shape, precision=precisions[0],
                cudnn_benchmark=args.cudnn_benchmark)
    tic = time.perf_counter()
    print(f"{shape['set']} set, {shape['classes']} classes x vpc {shape['vpc']}, clips {shape['frames']}x"
          f"{shape['size']}^2, ConvNet3D width {shape['width']} {shape['head']} head, "
          f"batch_real {shape['batch_real']}, {threads} thread(s), best of {iters} iterations after one warm-up")
    host = _worker_run({"matmul": True, "threads": threads}, {})["gflops"]
    print(f"this host: 2048^2 fp32 matmul at {host:.1f} GFLOP/s on {threads} thread(s); precision {precisions[0]}"
          + ("; cuDNN benchmark mode" if args.cudnn_benchmark else ""))
    dm = _measure({**base, "method": "dm", "mode": "constant", "syn_steps": 1})
    print(f"device {dm['device']}; DM: {dm['seconds']:.3f} s/iteration, peak +{dm['peak_mib']:.0f} MiB, "
          f"{_rate(dm)}\n")
    header = (f"{'syn_steps':>9} | {'unrolled s/it':>13} {'constant s/it':>13} {'time ratio':>10} | "
              f"{'unrolled MiB':>12} {'constant MiB':>12} {'theta MiB':>9} {'const-theta':>11} {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    constant_peaks, device_peaks = [], []
    references = ["DM:" + _versus_original(args.shape, "dm", 1, dm, host)]
    arithmetic, first_row = [], [dm]
    for syn_steps in steps_list:
        unrolled = _measure({**base, "method": "mtt", "mode": "unrolled", "syn_steps": syn_steps})
        constant = _measure({**base, "method": "mtt", "mode": "constant", "syn_steps": syn_steps})
        if len(first_row) == 1:
            first_row += [unrolled, constant]
        constant_peaks.append(constant["peak_mib"])
        device_peaks.append(constant["peak_mib"] - constant["theta_mib"])
        print(f"{syn_steps:>9} | {unrolled['seconds']:>13.3f} {constant['seconds']:>13.3f} "
              f"{constant['seconds'] / unrolled['seconds']:>10.2f} | {unrolled['peak_mib']:>12.0f} "
              f"{constant['peak_mib']:>12.0f} {constant['theta_mib']:>9.1f} {device_peaks[-1]:>11.0f} "
              f"{constant['peak_mib'] / max(unrolled['peak_mib'], 1e-9):>9.2f}")
        references.append(f"MTT syn_steps {syn_steps}, memory-constant:" + _versus_original(
            args.shape, "mtt", syn_steps, constant, host))
        arithmetic.append(f"MTT syn_steps {syn_steps}: unrolled {_rate(unrolled)}; memory-constant {_rate(constant)}"
                          f" ({constant['gflop'] / unrolled['gflop']:.2f}x the arithmetic)")

    def spread(values: list[float]) -> float:
        return max(values) / max(min(values), 1e-9)

    print(f"\nmemory-constant peak, largest / smallest syn_steps: without theta history {spread(device_peaks):.2f}x "
          f"(target <= 1.10), total {spread(constant_peaks):.2f}x; wall {time.perf_counter() - tic:.0f} s")
    for line in arithmetic:
        print(line)
    for line in references:
        if line.endswith(":"):
            continue
        print(line)
    if len(precisions) > 1:
        print()
        precisions_side_by_side(base, steps_list[0], precisions, first_row)


def _unavailable(precision: str, device_name: str) -> str | None:
    """Why `precision` is not measured on this device (None: it is)."""
    import torch

    from vdistill.device import resolve_device

    device = resolve_device(device_name)
    if precision not in ("fp32", "tf32", "bf16"):
        return f"unknown precision {precision!r}: fp32, tf32 or bf16"
    if precision == "tf32" and device.type != "cuda":
        return "TF32 exists on CUDA only"
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ("this CPU has no native bf16 (AVX-512 BF16 / AMX): PyTorch's reference bf16 3-D convolutions are "
                "tens of times slower than fp32")
    return None


def precisions_side_by_side(base: dict, syn_steps: int, precisions: list[str], first_row: list[dict]) -> None:
    """DM and MTT (both modes, `syn_steps`) in each precision (the first one's `first_row` measured already: DM,
    unrolled, constant), then the gradient error of each vs float64."""
    mtt = f"MTT-{syn_steps}"
    header = (f"{'precision':<9} | {'DM s/it':>8} {'MiB':>6} | {mtt + ' unrolled':>15} {'MiB':>6} | "
              f"{mtt + ' constant':>15} {'MiB':>6} | speed-up over {precisions[0]} (DM, unrolled, constant)")
    print(header)
    print("-" * len(header))
    for precision in precisions:
        reason = _unavailable(precision, base["device"])
        if reason:
            print(f"{precision:<9} | not run: {reason}")
            continue
        row = first_row if precision == precisions[0] else [
            _measure({**base, "precision": precision, "method": "dm", "mode": "constant", "syn_steps": 1}),
            *(_measure({**base, "precision": precision, "method": "mtt", "mode": mode, "syn_steps": syn_steps})
              for mode in ("unrolled", "constant"))]
        print(f"{precision:<9} | " + " | ".join(f"{m['seconds']:>{w}.3f} {m['peak_mib']:>6.0f}"
                                                for m, w in zip(row, (8, 15, 15)))
              + " | " + ", ".join(f"{a['seconds'] / m['seconds']:.2f}x" for a, m in zip(first_row, row)), flush=True)
    print("\ngradient error of each precision against float64 (jobs/precision_check.py):", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("precision_check.py")), "--device", base["device"],
                    "--threads", str(base["threads"])], check=True)


def _rate(measured: dict) -> str:
    """`X GFLOP/iteration at Y GFLOP/s`: the arithmetic of an iteration and the rate the loop ran it at."""
    return f"{measured['gflop']:.0f} GFLOP/iteration at {measured['gflop'] / measured['seconds']:.1f} GFLOP/s"


def pipeline_vs_library(device: str, iters: int) -> None:
    """Seconds per DM+S2D iteration inside `run_pipeline` (what a user's run gets) and in the bare library loop."""
    import tempfile

    from vdistill.config import load_config
    from vdistill.coordinator import connect_ray, run_pipeline

    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="vdistill-bench-") as root:
        cfg = load_config(None, [*PIPELINE, f"run.root={root}", f"dynamic.iterations={iters + 1}",
                                 f"run.device={device}"])
        connect_ray(cfg)
        tic = time.perf_counter()
        through = run_pipeline(cfg, until="distill", demo=True)["dynamic-dm"]["seconds_per_iteration"]
        wall = time.perf_counter() - tic
    library = _measure({"device": device, "threads": threads, "iters": iters, "shape": "pipeline", "method": "dm",
                        "mode": "constant", "syn_steps": 1})
    shape = SHAPES["pipeline"]
    print(f"\nDM+S2D dynamic stage, {shape['classes']} classes x vpc 1, {shape['frames']}x{shape['size']}^2, "
          f"ConvNet3D width {shape['width']} paper head, batch_real {shape['batch_real']}, {threads} core(s), "
          f"device {library['device']}")
    print(f"{'where':<32} {'best s/it':>9} {'median s/it':>11}")
    print(f"{'through the pipeline':<32} {through['best']:>9.3f} {through['median']:>11.3f}   (whole run {wall:.0f} s)")
    print(f"{'library loop, ' + str(threads) + ' threads':<32} {library['seconds']:>9.3f} {'':>11}")
    print(f"pipeline / library: {through['best'] / library['seconds']:.2f}x")


def workers_scaling(device: str, iters: int, counts: list[int]) -> None:
    """Seconds per DM+S2D iteration through the pipeline for each number of distillation workers."""
    import tempfile

    from vdistill.config import load_config
    from vdistill.coordinator import connect_ray, run_pipeline

    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="vdistill-bench-") as root:
        for n in counts:
            cfg = load_config(None, [*PIPELINE, f"run.root={root}", f"run.name=bench-workers-{n}",
                                     f"cache.uri={root}/cache", "data.val_fraction=0", f"run.device={device}",
                                     f"dynamic.iterations={iters + 1}", f"run.distill_workers={n}",
                                     f"run.distill_cpus_per_worker={max(1, cores // n)}"])
            connect_ray(cfg)
            tic = time.perf_counter()
            seconds = run_pipeline(cfg, until="distill", demo=True)["dynamic-dm"]["seconds_per_iteration"]
            rows.append((n, cores if n == 1 else max(1, cores // n), seconds, time.perf_counter() - tic))
            import ray

            ray.shutdown()
    shape = SHAPES["pipeline"]
    print(f"\nDM+S2D dynamic stage through the pipeline, {cfg.demo.num_classes} classes x vpc 1, "
          f"{shape['frames']}x{shape['size']}^2, ConvNet3D width {shape['width']} paper head, batch_real "
          f"{shape['batch_real']}, {cores} core(s), device {device}; best / median of its {iters + 1} iterations")
    print(f"{'workers':>7} {'threads each':>12} {'best s/it':>9} {'median s/it':>11} {'speed-up':>8} {'ideal':>5}"
          f" {'run wall s':>10}")
    first_n, first_threads, first, _ = rows[0]
    for n, threads, seconds, wall in rows:  # ideal: the ratio of cores used (the same cores: 1.0)
        print(f"{n:>7} {threads:>12} {seconds['best']:>9.3f} {seconds['median']:>11.3f} "
              f"{first['median'] / seconds['median']:>8.2f} {n * threads / (first_n * first_threads):>5.1f} "
              f"{wall:>10.0f}")


def _versus_original(shape: str, method: str, syn_steps: int, measured: dict, host_gflops: float) -> str:
    """`; original X s/it, Y GB -> Zx faster, W of its memory` at the paper shape, else nothing; flagged when this
    host's matmul rate is more than 15% off the one the original's figures were taken at."""
    if shape != "paper" or (method, syn_steps) not in ORIGINAL:
        return ""
    seconds, gb = ORIGINAL[method, syn_steps]
    other_host = abs(host_gflops / ORIGINAL_HOST_GFLOPS - 1) > 0.15
    return (f" {measured['seconds']:.1f} s/it, process peak {measured['total_mib'] / 1024:.2f} GB; original "
            f"{seconds:.1f} s/it, {gb:.1f} GB -> {seconds / measured['seconds']:.2f}x faster, "
            f"{measured['total_mib'] / 1024 / gb:.2f}x its memory"
            + (f" [NOT COMPARABLE: the original was timed on a host at {ORIGINAL_HOST_GFLOPS} GFLOP/s, this one runs "
               f"{host_gflops:.1f}; re-time both with ../bench-original/side_by_side.sh]" if other_host else ""))

if __name__ == "__main__":
    main()
