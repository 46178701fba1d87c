#!/usr/bin/env bash
# Train the tiny-math unmasking policies of issue #13 on one GPU, from the fixed seeds of
# configs/tiny_policy_gpu_bl64.json (fully parallel, block 64, alpha 10) and
# configs/tiny_policy_gpu_bl32.json (semi-AR, block 32, alpha 3), on the tiny-math TRAIN split only:
# two train_policy.py processes side by side on the one GPU, each stopping at its max_steps (600) or
# after max_minutes (7.0 / 7.5) with a checkpoint. models/tiny-policy and models/tiny-policy-bl32 are
# the two runs' checkpoint-600.
#
#     bash scripts/train_tiny_policy.sh [TAR]     # e.g. TAR=$OUT/tiny_policy_gpu.tar.gz
#
# Writes runs/tiny-policy-gpu/bl64/ and bl32/ (config.json, metrics.jsonl, checkpoint-N/), their
# logs train.log, and with TAR a gzipped tar of each run's config, metrics, log and last checkpoint
# (about 7 MB; unpack it in the repository root, then scripts/eval_policy.py runs/tiny-policy-gpu/bl64
# --block_lengths 64 and runs/tiny-policy-gpu/bl32 --block_lengths 32 give the bar's verdicts).
# Measured on one H200: 600 steps in 246-320 s of step time per run (0.4-0.55 s per step with two
# runs sharing the GPU), 341 s wall for the script; on this repository's 2-core CPU a step of the
# same configuration takes about 300 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1  # everything is local (the GPU machine reaches no network)
runs=runs/tiny-policy-gpu
if [ -e "$runs" ]; then
    echo "error: $runs exists; move it away first (train_policy.py --resume continues a run)" >&2
    exit 2
fi
mkdir -p "$runs"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
pids=()
for block in 64 32; do
    mkdir -p "$runs/bl$block"
    python3 scripts/train_policy.py --config "configs/tiny_policy_gpu_bl$block.json" --out "$runs/bl$block" \
        > "$runs/bl$block/train.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
for block in 64 32; do
    grep -E "POLICY_STOP|Error|error" "$runs/bl$block/train.log" || true
    tail -n 1 "$runs/bl$block/metrics.jsonl" 2>/dev/null || echo "bl$block: no step finished"
done
if [ -n "${1:-}" ]; then
    files=()
    for block in 64 32; do
        run="$runs/bl$block"
        last=$(ls -d "$run"/checkpoint-* 2>/dev/null | grep -E "checkpoint-[0-9]+$" | sort -V | tail -n 1)
        files+=("$run/config.json" "$run/metrics.jsonl" "$run/train.log" ${last:+"$last"})
    done
    mkdir -p "$(dirname "$1")"
    tar czf "$1" "${files[@]}" && echo "wrote $1 ($(du -h "$1" | cut -f1))" || status=1
fi
exit "$status"
