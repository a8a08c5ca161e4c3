#!/usr/bin/env bash
# GPU and CPU-variant checks on a machine with CUDA's compiler, CMake and
# ninja but no Rust and no network (run from the repository root, after
# benches/gpu_bundle.sh packed .device/ on a build machine). One step per
# call, each well inside the 10 minutes one command may run, in the order
# that answers the most important question first:
#
#   benches/gpu_check.sh setup    # unpack, the machine, Python packages, the
#                                 # bench model (about 1 min)
#   benches/gpu_check.sh build    # ggml's CUDA backend for sm_90 only, as a
#                                 # plugin for the bundled binaries (≤ 8 min)
#   benches/gpu_check.sh parity   # does it load, offload, keep parity: the
#                                 # server's placement, then tests/it/parity.rs
#   benches/gpu_check.sh bench    # the service bench on a 1B-shaped model
#   benches/gpu_check.sh summary  # one screen of what the steps found
#   benches/gpu_check.sh cpu      # no GPU: CPU variant checks (as before)
#
# GPU_BACKEND=vulkan builds the Vulkan plugin instead (VULKAN_SDK must name
# headers new enough, e.g. $(scripts/vulkan-sdk)); that is how the whole flow
# is rehearsed on a machine without CUDA, with lavapipe as the device
# (GGML_VK_VISIBLE_DEVICES=0).
#
# Logs go to $OUT (or /tmp/out); every step appends its result to
# $OUT/summary.txt. A step that fails prints why and exits non-zero.
# PARITY_TIMEOUT (420 s) bounds the parity run: lavapipe needs about 1200.
set -euo pipefail
phase=${1:?setup, build, parity, bench, summary or cpu}
out=${OUT:-/tmp/out}
mkdir -p "$out"
repo=$PWD
backend=${GPU_BACKEND:-cuda}
export PYTHONUNBUFFERED=1

die() { echo "gpu_check $phase: $*" | tee -a "$out/summary.txt" >&2; exit 1; }
note() { echo "$*" | tee -a "$out/summary.txt"; }
[ -e .device/bundle.tar.xz ] || die "no .device/bundle.tar.xz: run benches/gpu_bundle.sh on the build machine"

unpack() {
    [ -e /tmp/bundle.done ] && return
    # The binaries were built in /work/main with their target folder beside it.
    mkdir -p /work
    [ "$repo" -ef /work/main ] || ln -sfn "$repo" /work/main
    tar -xJPf .device/bundle.tar.xz && touch /tmp/bundle.done
}
unpack
backends=$(cat .device/backends_dir.txt)
target=$(dirname "$(dirname "$(dirname "$(dirname "$backends")")")") # …/release
mkdir -p "$(dirname "$target")/tmp"                                  # CARGO_TARGET_TMPDIR
export LD_LIBRARY_PATH=$(dirname "$backends")/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
exe() {
    local path
    path=$(awk -v n="$1" '$1 == n {print $2}' .device/executables.txt)
    [ -x "$path" ] || die "no bundled executable for $1"
    echo "$path"
}
plugin_name=libggml-$backend.so
bench_model=/tmp/bm/internvl3-1b-q8_0.gguf
bench_mmproj=/tmp/bm/mmproj-internvl3-1b-f16.gguf

case $phase in
setup)
    : >"$out/summary.txt"
    {
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
        else
            echo "no nvidia-smi; GPU_BACKEND=$backend"
        fi
        lscpu | grep -E '^(Model name|CPU\(s\))'
        echo "cpu flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|avx512vbmi|avx_vnni|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    } | tee "$out/machine.txt"
    note "machine: $(head -1 "$out/machine.txt")"
    # gguf from the bundle; numpy and PyYAML from the machine when it has
    # them, else from the bundle (cp312 wheels).
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/gguf-*.whl ||
        die "could not install the bundled gguf wheel"
    if ! python3 -c 'import numpy, yaml' 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site \
            .device/whl/numpy-*.whl .device/whl/[Pp]y[Yy][Aa][Mm][Ll]-*.whl ||
            die "this python3 has no numpy/PyYAML and the bundled cp312 wheels do not install"
    fi
    start=$SECONDS
    PYTHONPATH=/tmp/site python3 benches/make_bench_model.py /tmp/bm --shape internvl3-1b --type q8_0 \
        >"$out/bench-model.log" 2>&1 || { tail -5 "$out/bench-model.log"; die "the bench model was not made"; }
    [ -s "$bench_model" ] && [ -s "$bench_mmproj" ] || die "the bench model files are missing"
    note "setup: bench model in $((SECONDS - start)) s"
    ;;
build)
    rm -rf /tmp/ggml && mkdir -p /tmp/ggml && tar -xJf .device/ggml-src.tar.xz -C /tmp/ggml
    # ggml's CMakeLists as a top-level project wants tests/, examples/ and
    # ggml.pc.in, which the crate does not vendor: build it as a subproject.
    cat >/tmp/ggml/CMakeLists.txt <<'CMAKE'
cmake_minimum_required(VERSION 3.14)
project(ggml_plugin C CXX)
add_subdirectory(ggml)
CMAKE
    case $backend in
    cuda)
        nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc) || die "no nvcc"
        # sm_90 only (H200); FA kernels for f16 K/V only (the service's
        # defaults), which GGML_CUDA_FA_ALL_QUANTS=OFF already gives.
        flags=(-DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES=90
            -DGGML_CUDA_FA_ALL_QUANTS=OFF -DCMAKE_CUDA_COMPILER="$nvcc") ;;
    vulkan)
        flags=(-DGGML_VULKAN=ON) ;;
    *) die "GPU_BACKEND $backend: cuda or vulkan" ;;
    esac
    start=$SECONDS
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    if ! { cmake -S /tmp/ggml -B /tmp/ggml/build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_CPU=OFF -DGGML_NATIVE=OFF "${flags[@]}" &&
        timeout 480 cmake --build /tmp/ggml/build --target "ggml-$backend" -j "$(nproc)"; } >"$out/plugin-build.log" 2>&1; then
        tail -30 "$out/plugin-build.log"
        die "the $backend plugin did not build in $((SECONDS - start)) s (log: plugin-build.log)"
    fi
    plugin=$(find /tmp/ggml/build -name "$plugin_name" | head -1)
    [ -n "$plugin" ] || die "the build made no $plugin_name"
    cp "$plugin" "$backends/"
    ldd "$backends/$plugin_name" | grep -E 'cuda|cublas|vulkan|ggml' >"$out/plugin-ldd.txt" || true
    note "build: $plugin_name in $((SECONDS - start)) s"
    ;;
parity)
    [ -e "$backends/$plugin_name" ] || die "no $plugin_name: run the build step first"
    # The server's own account of where the model went.
    timeout 60 "$target/internvl-grpc" serve --model tiny --listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 --cache-dir /tmp/serve-cache >"$out/serve-gpu.log" 2>&1 &
    serve=$!
    for _ in $(seq 120); do grep -q 'model loaded\|error' "$out/serve-gpu.log" && break; sleep 0.5; done
    kill $serve 2>/dev/null || true
    # The log line's next key (` load_ms=`) is cut off with the `=`.
    offload=$(grep -o 'offload=[^=]*layers offloaded[^=]*' "$out/serve-gpu.log" | head -1 |
        sed 's/ [a-z_]*$//' | cut -c1-600)
    [ -n "$offload" ] || { tail -20 "$out/serve-gpu.log"; die "the server did not load the model"; }
    note "placement: ${offload#offload=}"
    echo "$offload" | grep -q -E '(CUDA|Vulkan)[0-9]' || die "nothing is on a GPU"
    start=$SECONDS
    rc=0
    (cd /work/main && timeout "${PARITY_TIMEOUT:-420}" "$(exe it)" parity:: --test-threads 1 --nocapture 2>&1) >"$out/parity-gpu.log" || rc=$?
    grep -E '^(test |InternVL)' "$out/parity-gpu.log" | cut -c1-200
    note "parity on the GPU: rc $rc in $((SECONDS - start)) s; worst top-5 $(grep -o 'max |Δ| [0-9.]*' "$out/parity-gpu.log" | awk '{print $3}' | sort -g | tail -1)"
    [ $rc = 0 ] || die "parity failed (log: parity-gpu.log); flash_attn=off is the next question: TEST_INTERNVL_FROM_ENV=1 INTERNVL_FLASH_ATTN=off"
    ;;
bench)
    [ -s "$bench_model" ] || die "no bench model: run the setup step first"
    start=$SECONDS
    rc=0
    env INTERNVL_BENCH_MODEL=$bench_model INTERNVL_BENCH_MMPROJ=$bench_mmproj \
        timeout 420 "$(exe service)" >"$out/bench-gpu.log" 2>&1 || rc=$?
    tail -22 "$out/bench-gpu.log"
    note "bench on the GPU: rc $rc in $((SECONDS - start)) s"
    [ $rc = 0 ] || die "the bench failed (log: bench-gpu.log)"
    ;;
summary)
    cat "$out/summary.txt"
    ;;
cpu)
    rm -f "$backends/libggml-cuda.so" "$backends/libggml-vulkan.so"
    [ -s "$bench_model" ] || die "no bench model: run the setup step first"
    bench() { # NAME EXECUTABLE [ENV…]
        local name=$1 bin=$2 rc=0
        shift 2
        env INTERNVL_BENCH_MODEL=$bench_model INTERNVL_BENCH_MMPROJ=$bench_mmproj "$@" \
            timeout 240 "$bin" >"$out/bench-$name.log" 2>&1 || rc=$?
        note "bench $name: rc $rc"
    }
    rc=0
    (cd /work/main && timeout 200 "$(exe it)" serving:: 2>&1) >"$out/serving-cpu.log" || rc=$?
    note "serving tests, CPU variant ggml picks: rc $rc"
    rc=0
    (cd /work/main && timeout 300 "$(exe it)" parity:: 2>&1) >"$out/parity-cpu.log" || rc=$?
    note "parity on the CPU: rc $rc"
    # The same bench binary from a folder holding only the AVX2 variant: the
    # loader looks beside the executable first.
    mkdir -p /tmp/haswell && cp "$(exe service)" /tmp/haswell/service &&
        cp "$backends/libggml-cpu-haswell.so" /tmp/haswell/
    for run in 1 2; do
        bench "best-$run" "$(exe service)" INTERNVL_BENCH_TOKENS=64 INTERNVL_BENCH_REPEATS=1
        bench "haswell-$run" /tmp/haswell/service INTERNVL_BENCH_TOKENS=64 INTERNVL_BENCH_REPEATS=1
    done
    for f in "$out"/bench-best-1.log "$out"/bench-haswell-1.log; do echo "== $f"; tail -20 "$f"; done
    ;;
*) die "unknown step (setup, build, parity, bench, summary, cpu)" ;;
esac
