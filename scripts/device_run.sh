#!/usr/bin/env bash
# Runs on a lent GPU machine (see ../shared/gpu/README.md): the machine has the NVIDIA driver but
# no Vulkan loader and no Rust, so build here first and carry the binary and the loader:
#
#   cargo build --release && mkdir -p .gpu && cp ../shared/gpu/debs/*.deb target/release/lenet .gpu/
#   device call, carrying [".gpu"]:  bash scripts/device_run.sh
#
# Writes devices.txt, bench.txt, bench.json, train.txt and train.json under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/lenet-device}
mkdir -p "$OUT"
for f in .gpu/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
.gpu/lenet devices > "$OUT/devices.txt" 2>&1
.gpu/lenet bench > "$OUT/bench.txt" 2>&1
.gpu/lenet bench --json 2>/dev/null | tail -1 > "$OUT/bench.json"
# Process start to printed accuracy, and the training figures.
start=$(date +%s.%N)
.gpu/lenet train --backend gpu --epochs 10 --json > "$OUT/train.txt" 2> "$OUT/train.err"
end=$(date +%s.%N)
echo "process wall seconds: $(awk "BEGIN { print $end - $start }")" >> "$OUT/train.txt"
tail -2 "$OUT/train.txt" | head -1 > "$OUT/train.json"
cat "$OUT/gpu.txt" "$OUT/devices.txt" "$OUT/bench.txt" "$OUT/train.txt"
