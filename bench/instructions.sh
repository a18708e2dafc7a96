#!/usr/bin/env bash
# bench/instructions.sh [N] [BINARY]
#
# User-space instructions per proxied request, counted exactly by
# callgrind: Legate (BINARY, default target/release/legate) behind nothing,
# an nginx upstream answering 200, 500 warm-up requests, then N (default
# 5000) requests from `h2load --h1 -c16` with instrumentation on
# (PROTO=h2: h2c from `h2load -c16 -m32`, bench/run's h2 case). Exact
# counts do not drift with a shared machine's load as CPU time does (this
# VM has no hardware counters for `perf stat -e instructions`), so this is
# the A/B for changes on the request path. Prints instructions per
# request and keeps the profile in target/instructions.callgrind (read it
# with callgrind_annotate; --inclusive=yes shows each hook's share).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${1:-5000}
case "${PROTO:-h1}" in
  h1) LOAD=(--h1 -c 16) ;;
  h2) LOAD=(-c 16 -m 32) ;;
  *) echo "instructions: PROTO is h1 or h2" >&2; exit 2 ;;
esac
export PATH="$HOME/.cargo/bin:$PATH"
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -n "${2:-}" ]; then
  LEGATE=$2
else
  cargo build -q --release -p legate
  LEGATE=$PWD/target/release/legate
fi

bench_scratch

UP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)
upstream_config "$UP" > "$WORK/upstream.conf"
http_bench_config "$PORT" "$ADMIN" "$UP" > "$WORK/legate.yaml"
nginx -c "$WORK/upstream.conf" & pids+=($!)
OUT=target/instructions.callgrind
mkdir -p target
valgrind --tool=callgrind --callgrind-out-file="$WORK/cg" --instr-atstart=no \
  "$LEGATE" -c "$WORK/legate.yaml" --concurrency 1 -l error --kernel-lb off 2>"$WORK/valgrind.log" &
VG=$!; pids+=("$VG")
for i in $(seq 1 200); do
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/" && break
  [ "$i" -lt 200 ] || { echo "instructions: Legate under valgrind does not answer" >&2; exit 1; }
  sleep 0.5
done
h2load "${LOAD[@]}" -n 500 "http://127.0.0.1:$PORT/" >/dev/null
callgrind_control -i on "$VG" >/dev/null 2>&1
done_line=$(h2load "${LOAD[@]}" -n "$N" "http://127.0.0.1:$PORT/" | grep '^status codes:')
callgrind_control -i off "$VG" >/dev/null 2>&1
callgrind_control -d "$VG" >/dev/null 2>&1
ok=$(awk '{print $3}' <<<"$done_line")
[ "$ok" = "$N" ] || { echo "instructions: only $ok of $N requests got 2xx" >&2; exit 1; }
# The requested dump is part 1 (callgrind appends the part number); the
# one it writes when stopped covers only the time after it.
cp "$WORK/cg.1" "$OUT"
total=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
echo "$N requests: $total instructions in user space, $((total / N)) per request (${PROTO:-h1}, $LEGATE)"
