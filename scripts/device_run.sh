#!/usr/bin/env bash
# One device call on the lent GPU machine (../shared/gpu/README.md), from the repository root,
# after scripts/device_prepare.sh here:  carry [".gpu"], timeout_s 480,
#
#   bash scripts/device_run.sh
#
# Issue 22's measurements: the kernel family with naga's loop bounding and without it, against
# the named alternatives `mixed` and `v3`. The measurements come first and the tests last, every
# step with a time limit of its own and all of them inside one deadline (DEADLINE_S, 360 s by
# default), so that one hang cannot eat the lease and the table is always printed:
#   1. the card, the driver, its clocks, `lenet devices`;
#   2. `lenet train --backend gpu --epochs 10 --batch 256 --json` for each of the four (family
#      bounded, family unbounded, mixed, v3), twice, alternating (round 1 then round 2, the four
#      in the same order: the first run of all also pays the driver's cold start), each with its
#      process wall time;
#   3. `lenet bench --backend gpu --json` of each of the four at batch 64, 256 and 1024: every
#      row validated against the CPU path first, then the step timed as training runs it (a
#      warm-up, then passes of 23 consecutive steps), then each row; the clocks again after;
#   4. the README's fastest recipe to 99% on the fastest of the four (by the median of its two
#      training runs), seeds 0, 1 and 2;
#   5. every test executable with LENET_REQUIRE_GPU=1 (the GPU tests on this GPU); one that fails
#      runs again one test at a time, to name the test.
# Prints a short table last; $OUT/results.tgz holds every output, $OUT/summary.txt the table.
#
# The kernel choices are named by the hidden `--kernels NAME` option of train and bench
# (FAMILY=NAME names the family's entry: "fused", the 4-dispatch family of issue 22 and the
# default). `--shader-loop-bounds off`
# compiles the kernels without naga's loop bounding. KERNELS_OPTION=0 leaves `--kernels` out (a
# build that does not have it yet: every configuration then runs the default kernels).
#
# DRY_RUN=1 checks the script here, on any adapter (lavapipe): the local release binary, no
# loader packages, 3 training steps instead of 10 epochs, the bench at batch 4 only, the
# recipe for 2 steps, no tests; the table as on the device.
set -uo pipefail
OUT=${OUT:-/tmp/lenet-device}
mkdir -p "$OUT"
W=$(mktemp -d)
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-360}))
FAMILY=${FAMILY:-fused}
DRY_RUN=${DRY_RUN:-0}

if [[ $DRY_RUN == 1 ]]; then
    L=target/release/lenet
    train_len=(--steps 3)
    recipe_len=(--steps 2)
    batches=(4)
else
    for f in .gpu/*.deb; do dpkg -x "$f" /; done
    ldconfig
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    tar -C .gpu -xzf .gpu/bundle.tgz
    export LENET_EXE=$PWD/.gpu/lenet LENET_REQUIRE_GPU=1
    L=.gpu/lenet
    train_len=(--epochs 10)
    recipe_len=(--epochs 3)
    batches=(64 256 1024)
fi

# The four configurations: name, then the options that select it.
configs=(family_bounded family_unbounded mixed v3)
k() { [[ ${KERNELS_OPTION:-1} == 0 ]] || echo "--kernels $1"; }
declare -A opts=(
    [family_bounded]="$(k "$FAMILY") --shader-loop-bounds on"
    [family_unbounded]="$(k "$FAMILY") --shader-loop-bounds off"
    [mixed]="$(k mixed)"
    [v3]="$(k v3)"
)

# run NAME LIMIT_S COMMAND...: stdout to $W/NAME.out, stderr to $W/NAME.err, and a line of
# "NAME exit-status wall-seconds" in $W/runs.txt.
run() {
    local name=$1 limit=$2
    shift 2
    local t0 t1 rc left=$((deadline - $(date +%s)))
    if ((left < 5)); then
        echo "$name skipped 0" >> "$W/runs.txt"
        return 1
    fi
    ((limit > left)) && limit=$left
    t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$W/$name.out" 2> "$W/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    echo "$name $rc $(awk "BEGIN { printf \"%.3f\", $t1 - $t0 }")" >> "$W/runs.txt"
    return $rc
}

clocks() {
    command -v nvidia-smi > /dev/null && run "clocks_$1" 20 nvidia-smi -q -d CLOCK,PERFORMANCE
}

# 1. The machine.
command -v nvidia-smi > /dev/null &&
    run gpu 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
run devices 30 "$L" devices --json
clocks before

# 2. Training: 10 epochs at batch 256, process start to exit; two rounds of the four.
for round in 1 2; do
    for c in "${configs[@]}"; do
        # shellcheck disable=SC2086 # the options are words
        run "train_${c}_$round" 120 "$L" train --backend gpu "${train_len[@]}" --batch 256 ${opts[$c]} --json
    done
done

# 3. The bench of each, validated before it is timed.
for b in "${batches[@]}"; do
    for c in "${configs[@]}"; do
        # shellcheck disable=SC2086
        run "bench_${c}_$b" 90 "$L" bench --backend gpu --batch "$b" --iters 20 ${opts[$c]} --json
    done
done
clocks after

# 4. The fastest recipe to 99% (README) on the fastest configuration's training.
fastest=$(python3 - "$W" "${configs[@]}" <<'EOF'
import json, os, statistics, sys
w, configs = sys.argv[1], sys.argv[2:]
best = None
for c in configs:
    secs = []
    for r in (1, 2):
        try:
            lines = open(os.path.join(w, f"train_{c}_{r}.out")).read().strip().splitlines()
            secs.append(json.loads(lines[-1])["train_seconds"])
        except (OSError, ValueError, IndexError, KeyError):
            pass
    if secs and (best is None or statistics.median(secs) < best[1]):
        best = (c, statistics.median(secs))
print(best[0] if best else configs[0])
EOF
)
echo "$fastest" > "$W/fastest.txt"
for seed in 0 1 2; do
    # shellcheck disable=SC2086
    run "recipe99_s$seed" 60 "$L" train --backend gpu "${recipe_len[@]}" --batch 64 --lr 8e-3 \
        --lr-schedule onecycle --augment-shift 1 --until 99 --seed "$seed" ${opts[$fastest]} --json
done

# 5. The tests, on this GPU.
if [[ $DRY_RUN != 1 ]]; then
    for t in .gpu/tests/*; do
        # A failed executable runs again one test at a time: its last line names the test.
        run "test_$(basename "$t")" 120 "$t" --test-threads=8 ||
            run "serial_$(basename "$t")" 120 "$t" --test-threads=1
    done
fi

# The table, from the outputs.
python3 - "$W" "${configs[@]}" > "$W/summary.txt" 2>&1 <<'EOF'
import json, os, re, statistics, sys
w, configs = sys.argv[1], sys.argv[2:]
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

def sm_clock(name):
    m = re.search(r"Clocks\s*\n(?:.*\n)*?\s*SM\s*:\s*(\d+ MHz)", text(name))
    return m.group(1) if m else "?"

print("card:", text("gpu").strip() or "(no nvidia-smi)")
print(f"SM clock before the benches {sm_clock('clocks_before')}, after {sm_clock('clocks_after')}")
print("\ntraining, 10 epochs at batch 256 (process wall s; train_seconds, us per step, accuracy from --json):")
for r in (1, 2):
    for c in configs:
        name = f"train_{c}_{r}"
        d = doc(name)
        rc, s = runs.get(name, (None, 0.0))
        if d:
            print(f"  {name:<24} exit {rc} wall {s:6.2f} s  train {d['train_seconds']:.3f} s  "
                  f"{1e6 * d['train_seconds'] / max(d['steps'], 1):7.1f} us/step  {d['images_per_s']:.0f} img/s  "
                  f"acc {d['test_accuracy']}  submits {d['submits']}")
        else:
            print(f"  {name:<24} exit {rc} wall {s:6.2f} s  {text(name, 'err')[-300:]!r}")
print("\nbench (us per step: the step row's median [min-max]; then each row's median):")
for name in [n for n in runs if n.startswith("bench_")]:
    d = doc(name)
    if d is None:
        print(f"  {name}: exit {runs[name][0]}, no JSON ({text(name, 'err')[-200:]!r})")
        continue
    bad = [r["layer"] + " " + r["direction"] for r in d["rows"] if r["validated"] != "ok"]
    step = [r for r in d["rows"] if r["layer"] == "step"]
    s = step[0] if step else {}
    spread = f"{s.get('gpu_us') or 0:.1f} [{s.get('gpu_min_us') or 0:.1f}-{s.get('gpu_max_us') or 0:.1f}]"
    t = d.get("step_timing") or {}
    print(f"  {name}: kernels {d['kernels']}, loops {d.get('shader_loop_bounds')}, dispatches "
          f"{d['step_dispatches']}, step {spread} us, {d.get('gpu_images_per_s') or 0:.0f} img/s, "
          f"{t.get('passes')} passes x {t.get('steps_per_pass')} ({d.get('step_timing_method')}), "
          f"failed validation: {bad or 'none'}")
    rows = ", ".join(f"{r['layer']} {r['direction']} {r['gpu_us']:.1f}" for r in d["rows"]
                     if r["gpu_us"] is not None and r["layer"] != "step")
    print(f"    {rows}")
print(f"\nfastest recipe to 99% on {text('fastest', 'txt').strip()} (accuracy, train s; --until: step, s):")
for name in sorted(n for n in runs if n.startswith("recipe")):
    d = doc(name)
    if d:
        tta = d.get("time_to_accuracy")
        reached = f"  reached {tta['accuracy']} at step {tta['step']} after {tta['train_seconds']:.2f} s" if tta else ""
        print(f"  {name:<14} exit {runs[name][0]} acc {d['test_accuracy']} train {d['train_seconds']:.2f} s "
              f"wall {runs[name][1]:.2f} s{reached}")
    else:
        print(f"  {name:<14} exit {runs[name][0]} {text(name, 'err')[-200:]!r}")
tests = sorted(n for n in runs if n.startswith("test_"))
if tests:
    print("\ntests (LENET_REQUIRE_GPU=1):")
for name in tests:
    results = [l for l in (text(name) + text(name, "err")).splitlines() if l.startswith("test result")]
    print(f"  {name[5:]:<20} exit {runs[name][0]}  {results[-1] if results else 'no result line'}")
    serial = "serial_" + name[5:]
    if serial in runs:
        last = (text(serial) + text(serial, "err")).strip().splitlines()[-3:]
        print(f"    one at a time: exit {runs[serial][0]}, last lines {last}")
print(f"\nelapsed {sum(s for _, s in runs.values()):.0f} s of commands")
EOF
cp "$W/summary.txt" "$OUT/summary.txt"
tar -C "$W" -czf "$OUT/results.tgz" --exclude='*.safetensors' .
cat "$W/summary.txt"
echo "total $(($(date +%s) - start)) s"
