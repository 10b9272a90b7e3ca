#!/usr/bin/env bash
# One device call on the lent GPU machine (../shared/gpu/README.md), from the repository root,
# after scripts/device_prepare.sh here:  carry [".gpu"], timeout_s 480,
#
#   bash scripts/device_run.sh
#
# The measurements come first and the tests last, every step with a time limit of its own and
# all of them inside one deadline (DEADLINE_S, 400 s by default), so that one hang cannot eat the
# lease and the table is always printed:
#   1. the card, the driver, `lenet devices`;
#   2. `lenet bench --json` at batch 64, 256 and 1024 with `mixed` (the default on a GPU) and
#      `v3` (the candidate: 10 dispatches), and at 256 with `v2` and `v1`: every row validated
#      against the CPU path, then timed;
#   3. `lenet train --backend gpu --epochs 10 --json`, v3 and mixed alternating, three and two
#      times (the first run pays the cold start: shader compilation, uploads), then v2 and v1
#      once each, each with its process wall time;
#   4. PyTorch on the same card: the recipe's 10 epochs timed, and the parity run (the same
#      init, --no-shuffle, 20 steps, every tensor compared) of lenet's GPU path against it, and
#      of lenet's CPU path against both;
#   5. the README's recipes beyond the contract (99.2% in 10 epochs, the fastest to 99%), seeds
#      0, 1 and 2, on the GPU path;
#   6. every test executable with LENET_REQUIRE_GPU=1 (the GPU tests on this GPU); one that
#      fails runs again one test at a time, to name the test.
# Prints a short table last; $OUT/results.tgz holds every output, $OUT/summary.txt the table.
set -uo pipefail
OUT=${OUT:-/tmp/lenet-device}
mkdir -p "$OUT"
W=$(mktemp -d)
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-400}))

for f in .gpu/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
tar -C .gpu -xzf .gpu/bundle.tgz
export LENET_EXE=$PWD/.gpu/lenet LENET_REQUIRE_GPU=1
L=.gpu/lenet

# run NAME LIMIT_S COMMAND...: stdout to $W/NAME.out, stderr to $W/NAME.err, and a line of
# "NAME exit-status wall-seconds" in $W/runs.txt.
run() {
    local name=$1 limit=$2
    shift 2
    local t0 t1 rc left=$((deadline - $(date +%s)))
    if (( left < 5 )); then
        echo "$name skipped 0" >> "$W/runs.txt"
        return 1
    fi
    (( limit > left )) && limit=$left
    t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$W/$name.out" 2> "$W/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    echo "$name $rc $(awk "BEGIN { printf \"%.3f\", $t1 - $t0 }")" >> "$W/runs.txt"
    return $rc
}

# 1. The machine.
run gpu 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
run devices 30 "$L" devices --json

# 2. Per-kernel figures, validated before they are timed.
for b in 64 256 1024; do
    for k in mixed v3; do
        LENET_KERNELS=$k run "bench_${k}_$b" 90 "$L" bench --backend gpu --batch "$b" --json
    done
done
for k in v2 v1; do
    LENET_KERNELS=$k run "bench_${k}_256" 90 "$L" bench --backend gpu --batch 256 --json
done

# 3. Training: the recipe's 10 epochs, process start to exit.
LENET_KERNELS=v3 run train_v3_cold 120 "$L" train --backend gpu --epochs 10 --json
LENET_KERNELS=mixed run train_mixed 120 "$L" train --backend gpu --epochs 10 --json
LENET_KERNELS=v3 run train_v3 120 "$L" train --backend gpu --epochs 10 --json
LENET_KERNELS=mixed run train_mixed_again 120 "$L" train --backend gpu --epochs 10 --json
LENET_KERNELS=v3 run train_v3_again 120 "$L" train --backend gpu --epochs 10 --json
LENET_KERNELS=v2 run train_v2 120 "$L" train --backend gpu --epochs 10 --json
LENET_KERNELS=v1 run train_v1 180 "$L" train --backend gpu --epochs 10 --json

# 4. PyTorch on the same card: the recipe timed, and the parity run.
run torch_recipe 120 python3 scripts/torch_reference.py --device cuda recipe --epochs 10 --seed 0
init=tests/fixtures/parity_init.safetensors   # PyTorch's default initialisation, seed 0
LENET_KERNELS=v3 run parity_lenet 60 "$L" train --backend gpu --init "$init" --no-shuffle \
    --steps 20 --save "$W/lenet20.safetensors" --json
run parity_torch 120 python3 scripts/torch_reference.py --device cuda train --init "$init" \
    --steps 20 --save "$W/torch20.safetensors"
run parity_compare 60 python3 scripts/torch_reference.py compare "$W/lenet20.safetensors" "$W/torch20.safetensors"
# Which side moved: lenet's CPU path against both.
run parity_lenet_cpu 60 "$L" train --backend cpu --init "$init" --no-shuffle --steps 20 \
    --save "$W/lenet20cpu.safetensors" --json
run parity_cpu_torch 60 python3 scripts/torch_reference.py compare "$W/lenet20cpu.safetensors" "$W/torch20.safetensors"
run parity_gpu_cpu 60 python3 scripts/torch_reference.py compare "$W/lenet20.safetensors" "$W/lenet20cpu.safetensors"

# 5. The README's recipes beyond the contract, on this GPU.
for seed in 0 1 2; do
    run "recipe992_s$seed" 60 "$L" train --backend gpu --epochs 10 --batch 128 --lr 4e-3 \
        --lr-schedule onecycle --augment-shift 2 --seed "$seed" --json
    run "recipe99_s$seed" 60 "$L" train --backend gpu --epochs 2 --batch 64 --lr 8e-3 \
        --lr-schedule onecycle --augment-shift 1 --until 99 --seed "$seed" --json
done

# 6. The tests, on this GPU.
for t in .gpu/tests/*; do
    # A failed executable runs again one test at a time: its last line names the test.
    run "test_$(basename "$t")" 120 "$t" --test-threads=8 ||
        run "serial_$(basename "$t")" 120 "$t" --test-threads=1
done

# The table, from the outputs.
python3 - "$W" > "$W/summary.txt" 2>&1 <<'EOF'
import json, os, sys
w = sys.argv[1]
runs = {}
for line in open(os.path.join(w, "runs.txt")):
    name, rc, s = line.split()
    runs[name] = (int(rc) if rc != "skipped" else rc, float(s))

def text(name, ext="out"):
    try:
        return open(os.path.join(w, f"{name}.{ext}")).read()
    except OSError:
        return ""

def doc(name):
    try:
        return json.loads(text(name).strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None

print("card:", text("gpu").strip())
print("\ntests (LENET_REQUIRE_GPU=1):")
for name in sorted(n for n in runs if n.startswith("test_")):
    results = [l for l in (text(name) + text(name, "err")).splitlines() if l.startswith("test result")]
    print(f"  {name[5:]:<16} exit {runs[name][0]}  {results[-1] if results else 'no result line'}")
    serial = "serial_" + name[5:]
    if serial in runs:
        last = (text(serial) + text(serial, "err")).strip().splitlines()[-3:]
        print(f"    one at a time: exit {runs[serial][0]}, last lines {last}")
print("\nbench (median us per call; step = the whole training step):")
for name in [n for n in runs if n.startswith("bench_")]:
    d = doc(name)
    if d is None:
        print(f"  {name}: exit {runs[name][0]}, no JSON ({text(name, 'err')[-200:]!r})")
        continue
    bad = [r["layer"] + " " + r["direction"] for r in d["rows"] if r["validated"] != "ok"]
    step = [r for r in d["rows"] if r["layer"] == "step"]
    step_us = step[0]["gpu_us"] if step else None
    rows = ", ".join(f"{r['layer']} {r['direction']} {r['gpu_us']:.1f}" for r in d["rows"]
                     if r["gpu_us"] is not None and r["layer"] != "step")
    print(f"  {name}: dispatches {d['step_dispatches']}, step {step_us} us, timing {d['timing']}, "
          f"failed validation: {bad or 'none'}")
    print(f"    {rows}")
print("\ntraining, 10 epochs (process wall seconds; train_seconds and accuracy from --json):")
for name in ["train_v3_cold", "train_mixed", "train_v3", "train_mixed_again", "train_v3_again", "train_v2",
             "train_v1"]:
    d = doc(name)
    rc, s = runs.get(name, (None, 0.0))
    if d:
        print(f"  {name:<14} exit {rc} wall {s:6.2f} s  train {d['train_seconds']:.3f} s  "
              f"{d['images_per_s']:.0f} img/s  test accuracy {d['test_accuracy']}  submits {d['submits']} "
              f"waits {d['host_waits']}")
    else:
        print(f"  {name:<14} exit {rc} wall {s:6.2f} s  {text(name, 'err')[-300:]!r}")
print("\nrecipes beyond the contract (test accuracy, train seconds; --until: its step and seconds):")
for name in sorted(n for n in runs if n.startswith("recipe")):
    d = doc(name)
    if d:
        tta = d.get("time_to_accuracy")
        reached = f"  reached {tta['accuracy']} at step {tta['step']} after {tta['train_seconds']:.2f} s" if tta else ""
        print(f"  {name:<14} exit {runs[name][0]} acc {d['test_accuracy']} train {d['train_seconds']:.2f} s "
              f"wall {runs[name][1]:.2f} s{reached}")
    else:
        print(f"  {name:<14} exit {runs[name][0]} {text(name, 'err')[-200:]!r}")
print("\nPyTorch on this card:")
print("  recipe:", " | ".join(text("torch_recipe").strip().splitlines()[-3:]))
for name, what in [("parity_compare", "lenet GPU vs PyTorch CUDA"), ("parity_cpu_torch", "lenet CPU vs PyTorch CUDA"),
                   ("parity_gpu_cpu", "lenet GPU vs lenet CPU")]:
    print(f"  parity, 20 steps, {what}:", text(name).strip().splitlines()[-1:])
print(f"\nelapsed {sum(s for _, s in runs.values()):.0f} s of commands")
EOF
cp "$W/summary.txt" "$OUT/summary.txt"
tar -C "$W" -czf "$OUT/results.tgz" --exclude='*.safetensors' .
cat "$W/summary.txt"
echo "total $(( $(date +%s) - start )) s"
