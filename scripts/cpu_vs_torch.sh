#!/usr/bin/env bash
# lenet's CPU path against PyTorch's CPU training, side by side: PAIRS pairs (default 3), each
# lenet's run then PyTorch's, back to back, at each batch in BATCHES (default "256 64), on the
# instruction set ISA (auto, or avx2 to force AVX2 on both sides). One line per run, then the
# ratio of each pair, with the date and the load average at the start of each pair.
#
#   bash scripts/cpu_vs_torch.sh                 # the widest instruction set
#   ISA=avx2 bash scripts/cpu_vs_torch.sh        # AVX2 forced on lenet and PyTorch
#   THREADS=1 bash scripts/cpu_vs_torch.sh       # one thread each (RAYON_NUM_THREADS, OMP_NUM_THREADS)
#
# lenet: `lenet train --backend cpu` for 234 steps at batch 256 (937 at 64: 60,000 images),
# no evaluation, its `images_per_s` (the training loop, batching included). PyTorch:
# `scripts/torch_reference.py speed` (the median of 55 steps on tensors already in memory).
set -euo pipefail
cd "$(dirname "$0")/.."
LENET=${LENET:-target/release/lenet}
ISA=${ISA:-auto}
PAIRS=${PAIRS:-3}
BATCHES=${BATCHES:-"256 64"}
THREADS=${THREADS:-}
[ -x "$LENET" ] || { echo "error: $LENET is missing: run cargo build --release first" >&2; exit 1; }

torch_env=()
if [ "$ISA" = avx2 ]; then
    torch_env=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
fi
lenet_env=(LENET_CPU_ISA="$ISA")
if [ -n "$THREADS" ]; then
    torch_env+=(OMP_NUM_THREADS="$THREADS")
    lenet_env+=(RAYON_NUM_THREADS="$THREADS")
fi

for batch in $BATCHES; do
    steps=$((60000 / batch))
    for pair in $(seq 1 "$PAIRS"); do
        echo "# $(date -u +%FT%TZ) pair $pair, batch $batch, ISA $ISA, threads ${THREADS:-all}, load $(cut -d' ' -f1-3 /proc/loadavg)"
        ours=$(env "${lenet_env[@]}" "$LENET" train --backend cpu --steps "$steps" --batch "$batch" \
            --eval-every 0 --json 2>/dev/null | tail -1 |
            python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["images_per_s"]), j["adapter"])')
        theirs=$(env "${torch_env[@]}" python3 scripts/torch_reference.py speed --batch "$batch" |
            sed -n 's/.* \([0-9]*\) images\/s.*/\1/p')
        lenet_ips=${ours%% *}
        echo "lenet $ours images/s; torch $theirs images/s; ratio $(python3 -c "print(round($lenet_ips / $theirs, 2))")"
    done
done
