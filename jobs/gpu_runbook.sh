#!/usr/bin/env bash
# The GPU figures in one go, for a machine with CUDA (issue 21): the card, the distillation loop at the paper shape
# (DM, MTT memory-constant and unrolled: s/it, peak device memory, GFLOP/s; then fp32, TF32 and bf16 autocast side by
# side with what each does to the DM and MTT gradients, jobs/precision_check.py), the dynamic stage through the
# pipeline, and `vdistill demo` end to end on the GPU, each timed alone, one after the other. Paste its output into
# the README with the card's name and the date.
#
# Usage: bash jobs/gpu_runbook.sh [--quick]     (from the repository root, after `pip install -e .`)
#        DEVICE=cpu bash jobs/gpu_runbook.sh --quick   checks the script itself on a machine without a GPU
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
QUICK="${1:-}"
cd "$(dirname "$0")/.."

python - <<EOF
import torch
if "$DEVICE" == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible: run this on a GPU machine (or DEVICE=cpu to check it)"
    p = torch.cuda.get_device_properties(0)
    print(f"card: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, torch {torch.__version__}")
else:
    print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
EOF

echo "== distillation loop at the paper shape, fp32 / TF32 / bf16 (jobs/bench_distill.py --shape paper) =="
python jobs/bench_distill.py --shape paper --device "$DEVICE" --precision fp32,tf32,bf16 $QUICK

if [ "$DEVICE" = cuda ]; then
    echo "== the same in TF32 with cuDNN benchmark mode (compare with the tf32 row above) =="
    python jobs/bench_distill.py --shape paper --device cuda --precision tf32 --cudnn-benchmark --quick
fi

echo "== the DM+S2D stage through the pipeline vs the library (jobs/bench_distill.py --pipeline) =="
python jobs/bench_distill.py --pipeline --device "$DEVICE" $QUICK

if [ -z "$QUICK" ]; then
    echo "== vdistill demo on $DEVICE, from an empty folder =="
    demo_dir="$(mktemp -d)"
    start=$(date +%s)
    gpus=()  # on CUDA every part asks Ray for a share of the one card: the coordinator's loop, experts, evaluations
    [ "$DEVICE" = cuda ] && gpus=(run.coordinator_gpus=0.5 experts.gpus_per_worker=0.25 evaluate.gpus_per_task=0.25)
    (cd "$demo_dir" && vdistill demo run.device="$DEVICE" "${gpus[@]}")
    echo "vdistill demo on $DEVICE: $(( $(date +%s) - start )) s wall"
    rm -rf "$demo_dir"
fi
