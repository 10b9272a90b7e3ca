#!/usr/bin/env bash
# Builds, on this machine, everything scripts/device_run.sh needs on the lent GPU machine (which
# has no Rust toolchain and no Vulkan loader) into .gpu/, a folder git ignores:
#
#   .gpu/bundle.tgz     lenet, the release binary, and tests/NAME, every test executable
#                       (tests/unit_KIND_NAME: the unit tests), stripped and compressed (57 MB as
#                       they are; the tree that travels may hold 64 MiB). The tests run from the
#                       repository root there: they find data/, README.md and shaders/ from the
#                       working directory, and the binary through LENET_EXE.
#   .gpu/*.deb          the Vulkan and GL loader packages (../shared/gpu/debs)
#
# GPU_TESTS_ONLY=1 carries only the integration tests whose source opens a GPU (names a
# GpuContext, the `gpu` gate of tests/common or `--backend gpu`), when all of them would not fit:
# the script ends with an error when the tree that travels is over 64 MiB.
#
# Then one device call, carrying [".gpu"]:  bash scripts/device_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"

# No debug info: the working tree that travels is at most 64 MiB.
export CARGO_PROFILE_RELEASE_DEBUG=0
rm -rf .gpu
mkdir -p .gpu/tests
cargo build --release --bin lenet
cp target/release/lenet .gpu/lenet
cargo test --release --no-run --message-format=json \
    | GPU_TESTS_ONLY=${GPU_TESTS_ONLY:-0} python3 -c '
import json, os, re, shutil, sys
only_gpu = os.environ["GPU_TESTS_ONLY"] == "1"
def opens_gpu(src):
    return re.search(r"GpuContext|common::gpu\(\)|\"gpu\"", open(src).read()) is not None
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        # Integration tests by their name, unit tests (the library and the binary) as unit_KIND_NAME.
        kind = m["target"]["kind"]
        if only_gpu and ("test" not in kind or not opens_gpu(m["target"]["src_path"])):
            continue
        name = m["target"]["name"] if "test" in kind else "unit_" + kind[0] + "_" + m["target"]["name"]
        shutil.copy(m["executable"], ".gpu/tests/" + name)
'
strip .gpu/lenet .gpu/tests/*
tar -C .gpu -czf .gpu/bundle.tgz lenet tests
rm -r .gpu/lenet .gpu/tests
debs=../shared/gpu/debs
if compgen -G "$debs/*.deb" > /dev/null; then
    cp "$debs"/*.deb .gpu/
else
    echo "warning: no loader packages in $debs (the device has no libvulkan without them)" >&2
fi
tar -tzf .gpu/bundle.tgz | tr '\n' ' '; echo
du -sh .gpu
size=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((size + $(du -sb .gpu | cut -f1)))
echo "tracked files: $((size / 1048576)) MiB; with .gpu/: $((total / 1048576)) MiB of the 64 MiB that travel"
if ((total > 64 * 1048576)); then
    echo "error: the tree that travels is over 64 MiB: run again with GPU_TESTS_ONLY=1" >&2
    exit 1
fi
