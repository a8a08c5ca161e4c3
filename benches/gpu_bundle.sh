#!/usr/bin/env bash
# Packs what benches/gpu_check.sh needs on a GPU machine that has CUDA's
# compiler and CMake but no Rust toolchain and no network (the workplace's
# lent GPU machines): the test and bench binaries built here with
# `dynamic-backends`, ggml's shared libraries and CPU variants, ggml's source
# (to build the CUDA backend there, as a plugin for these binaries), and the
# wheels benches/make_bench_model.py needs: gguf, and numpy and PyYAML for a
# machine whose python3 (3.12 there) lacks them. At most 64 MiB: the size is
# printed, and more fails.
#
#   CARGO_TARGET_DIR=/work/target-dl benches/gpu_bundle.sh    # → .device/
#
# The binaries keep this checkout's and target folder's absolute paths
# (fixtures, the backends folder), so gpu_check.sh recreates them there.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
out=.device
mkdir -p "$out"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude

# Test and bench executables, by name, from cargo's own report.
executables=$(cargo test --release --locked --features dynamic-backends --no-run \
    --test it --bench service --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
')
echo "$executables"
cargo build --release --locked --features dynamic-backends --bin internvl-grpc

backends=$(ls -d "$target"/release/build/llama-cpp-sys-2-*/out/backends | head -1)
files=("$target/release/internvl-grpc" "$backends")
files+=("$(dirname "$backends")"/lib/lib*.so*)
while read -r name path; do files+=("$path"); done <<<"$executables"
printf '%s\n' "${executables}" | awk '{print $1, $2}' >"$out/executables.txt"
echo "$backends" >"$out/backends_dir.txt"
tar -cJPf "$out/bundle.tar.xz" "${files[@]}"

src=$(ls -d ~/.cargo/registry/src/*/llama-cpp-sys-2-"$(cargo metadata --format-version 1 --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="llama-cpp-sys-2"))')"/llama.cpp | head -1)
tar -cJf "$out/ggml-src.tar.xz" -C "$src" ggml
mkdir -p "$out/whl"
ls "$out"/whl/gguf-*.whl >/dev/null 2>&1 ||
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$out/whl" gguf==0.19.0
ls "$out"/whl/numpy-*.whl >/dev/null 2>&1 ||
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$out/whl" numpy==2.2.6 pyyaml==6.0.2
du -sh "$out"/*
size=$(du -sm "$out" | cut -f1)
echo "bundle: $size MiB"
[ "$size" -le 64 ] || { echo "gpu_bundle: $size MiB is over the 64 MiB a device call may carry" >&2; exit 1; }
