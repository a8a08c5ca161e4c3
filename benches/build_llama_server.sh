#!/usr/bin/env bash
# Builds the llama-server that benches/peer.py compares with:
#   benches/build_llama_server.sh DIR      → DIR/llama.cpp/build/bin/llama-server
# From the llama.cpp that the llama-cpp-python 0.3.36 source package on PyPI
# vendors. By default with GGML_NATIVE=ON: the best kernels for this host, as
# a user who builds llama-server for the machine it runs on gets them, and as
# this service picks its CPU variant at run time (the `dynamic-backends`
# default). NATIVE=OFF builds with the flags a static build of this service
# gets from llama-cpp-sys-2 (AVX, AVX2, FMA, F16C, BMI2; no AVX-512).
# Everything else is llama.cpp's default (OpenMP included), as a user builds it.
# Takes 10-20 minutes on 2 cores.
set -euo pipefail
dir=${1:?usage: build_llama_server.sh DIR}
version=0.3.36
mkdir -p "$dir"
cd "$dir"
python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d . >/dev/null
rm -rf llama.cpp "llama_cpp_python-$version"
tar xzf "llama_cpp_python-$version.tar.gz"
mv "llama_cpp_python-$version/vendor/llama.cpp" llama.cpp
rm -rf "llama_cpp_python-$version"
cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="${NATIVE:-ON}" \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build llama.cpp/build --target llama-server -j"$(nproc)"
echo "$dir/llama.cpp/build/bin/llama-server"
