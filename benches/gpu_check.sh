#!/usr/bin/env bash
# GPU and CPU-variant checks on a machine with CUDA's compiler, CMake and
# ninja but no Rust (run from the repository root, after
# benches/gpu_bundle.sh packed .device/ on a build machine).
#
#   benches/gpu_check.sh gpu   # build ggml's CUDA backend (sm_90) as a plugin;
#                              # parity and the service bench on the GPU
#   benches/gpu_check.sh cpu   # no GPU: the serving and parity tests with the
#                              # CPU variant ggml picks, and the service bench
#                              # with that variant against the AVX2 (haswell) one
#
# Logs go to $OUT (or /tmp/out); the last lines printed are the summary.
set -uo pipefail
phase=${1:?gpu or cpu}
out=${OUT:-/tmp/out}
mkdir -p "$out"
repo=$PWD
export PYTHONUNBUFFERED=1

if [ ! -e /tmp/bundle.done ]; then
    # The binaries were built in /work/main with their target in /work/target-dl.
    mkdir -p /work
    [ "$repo" -ef /work/main ] || ln -sfn "$repo" /work/main
    tar -xJPf .device/bundle.tar.xz && touch /tmp/bundle.done
fi
backends=$(cat .device/backends_dir.txt)
target=$(dirname "$(dirname "$(dirname "$(dirname "$backends")")")") # …/release
mkdir -p "$(dirname "$target")/tmp"                                  # CARGO_TARGET_TMPDIR
export LD_LIBRARY_PATH=$(dirname "$backends")/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
exe() { awk -v n="$1" '$1 == n {print $2}' .device/executables.txt; }

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    lscpu | grep -E '^(Model name|CPU\(s\))'
    echo "cpu flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|avx512vbmi|avx_vnni|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} | tee "$out/machine.txt"

bench_model() {
    [ -e /tmp/bm/internvl3-1b-q8_0.gguf ] && return
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl &&
        PYTHONPATH=/tmp/site python3 benches/make_bench_model.py /tmp/bm --shape internvl3-1b --type q8_0 \
            >"$out/bench-model.log" 2>&1
}

bench() { # NAME EXECUTABLE [ENV…]
    local name=$1 bin=$2
    shift 2
    env INTERNVL_BENCH_MODEL=/tmp/bm/internvl3-1b-q8_0.gguf \
        INTERNVL_BENCH_MMPROJ=/tmp/bm/mmproj-internvl3-1b-f16.gguf "$@" \
        timeout 240 "$bin" >"$out/bench-$name.log" 2>&1
    echo "bench $name: rc $?"
}

case $phase in
gpu)
    nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc)
    mkdir -p /tmp/ggml && tar -xJf .device/ggml-src.tar.xz -C /tmp/ggml
    (
        cmake -S /tmp/ggml/ggml -B /tmp/ggml/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_CPU=OFF -DGGML_NATIVE=OFF \
            -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
            -DCMAKE_CUDA_COMPILER="$nvcc" &&
            cmake --build /tmp/ggml/build --target ggml-cuda -j 15
    ) >"$out/cuda-build.log" 2>&1 &
    build=$!
    start=$(date +%s)
    bench_model
    wait $build
    echo "cuda plugin build: rc $? in $(($(date +%s) - start)) s"
    plugin=$(find /tmp/ggml/build -name 'libggml-cuda.so' | head -1)
    [ -n "$plugin" ] || { tail -30 "$out/cuda-build.log"; exit 1; }
    cp "$plugin" "$backends/"
    ldd "$backends/libggml-cuda.so" | grep -E 'cuda|cublas|ggml' >"$out/plugin-ldd.txt"

    # The server's own start-up log: which backends loaded, what was offloaded.
    RUST_LOG=info timeout 60 "$target/internvl-grpc" serve --model tiny \
        --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --cache-dir /tmp/serve-cache >"$out/serve-gpu.log" 2>&1 &
    serve=$!
    sleep 20
    kill $serve 2>/dev/null
    grep -E -i 'cuda|offload|model loaded|language model context|backend' "$out/serve-gpu.log" | cut -c1-400 | head -20

    (cd /work/main && timeout 300 "$(exe parity)" 2>&1) >"$out/parity-gpu.log"
    rc=$?
    echo "parity on the GPU: rc $rc"
    grep -E '^(test |InternVL)' "$out/parity-gpu.log" | cut -c1-200
    if [ $rc != 0 ]; then
        # Which setting costs parity: the same protocol with flash attention off.
        (cd /work/main && TEST_INTERNVL_FROM_ENV=1 INTERNVL_FLASH_ATTN=off \
            timeout 200 "$(exe parity)" 2>&1) >"$out/parity-gpu-fa-off.log"
        echo "parity on the GPU, flash attention off: rc $?"
        grep -E '^(test |InternVL)' "$out/parity-gpu-fa-off.log" | cut -c1-200
    fi
    bench gpu "$(exe service)"
    tail -22 "$out/bench-gpu.log"
    ;;
cpu)
    rm -f "$backends/libggml-cuda.so"
    bench_model
    (cd /work/main && timeout 200 "$(exe serving)" 2>&1) >"$out/serving-cpu.log"
    echo "serving tests, CPU variant ggml picks: rc $?"
    (cd /work/main && timeout 300 "$(exe parity)" 2>&1) >"$out/parity-cpu.log"
    echo "parity on the CPU: rc $?"
    grep -E '^(test |InternVL)' "$out/parity-cpu.log" | cut -c1-200
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
esac
