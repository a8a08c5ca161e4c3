#!/usr/bin/env bash
# Start-up time and peak RSS of the real binary, with and without the vision
# position-row correction (README: "Which GGUF files, and the vision correction").
#   benches/startup.sh MODEL.gguf MMPROJ.gguf [BINARY]
# Three starts, each until the server logs "ready":
#   uncorrected  the already-corrected mmproj given directly: it carries the
#                marker, so nothing is hashed or copied (what a start costs
#                without the correction);
#   first        a fresh cache directory: hash the mmproj, write the copy;
#   later        the same cache again: the remembered hash finds the copy.
# Peak RSS is the server's VmHWM when it is ready; the page cache is warm.
set -euo pipefail
model=$1 mmproj=$2 bin=${3:-target/debug/internvl-grpc}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT

start() { # mmproj cache → prints "seconds peak_rss_mib"
  local log; log=$(mktemp)
  local t0; t0=$(date +%s.%N)
  INTERNVL_CACHE_DIR=$2 "$bin" serve --listen 127.0.0.1:0 --model "$model" --mmproj "$1" \
    --threads 2 --log-json true 2>"$log" &
  local pid=$!
  until grep -q '"ready"' "$log"; do
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.02
  done
  local t1; t1=$(date +%s.%N)
  local hwm; hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
  kill -TERM $pid; wait $pid || true
  grep -o '"corrected":"[^"]*"' "$log" | head -1 | sed 's/"corrected":"//; s/"$//' > "$cache/last-derived"
  rm -f "$log"
  echo "$(echo "$t1 - $t0" | bc) $((hwm / 1024))"
}

# Make the corrected copy once, to serve as the uncorrected baseline.
start "$mmproj" "$cache/warmup" >/dev/null
derived=$(cat "$cache/last-derived")
printf '%-12s %8s %10s\n' start seconds peak_MiB
for run in 1 2; do
  read -r s m <<<"$(start "$derived" "$cache/none")";   printf '%-12s %8.2f %10s\n' uncorrected "$s" "$m"
  rm -rf "$cache/fresh$run"
  read -r s m <<<"$(start "$mmproj" "$cache/fresh$run")"; printf '%-12s %8.2f %10s\n' first "$s" "$m"
  read -r s m <<<"$(start "$mmproj" "$cache/fresh$run")"; printf '%-12s %8.2f %10s\n' later "$s" "$m"
done
