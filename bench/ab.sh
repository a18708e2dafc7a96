#!/usr/bin/env bash
# bench/ab.sh A_BINARY B_BINARY [ROUNDS] [SECONDS]
#
# CPU per request of two Legate builds loaded at the same time: both on
# cpu1, each behind its own client (h2load -c16 -m32, or with PROTO=h1
# wrk -t1 -c64), the clients and one nginx upstream on cpu0. Each round
# prints both builds' user+system CPU µs per request and B/A; the end,
# the median and quartiles of B/A over the rounds (default 10 of 3 s).
#
# Why at the same time: on this shared VM a build's CPU per request
# drifts by half from one minute to the next, so builds measured one
# after the other (even in alternating pairs) cannot show a difference
# of a few per cent. Loaded together, both see the same drift, and an A/A
# run (the same binary twice) gives a median within about 1 % of 1. Sharing a
# core makes each build's figure higher than when it runs alone: read
# the ratio, not the absolute numbers. `bench/instructions.sh` counts
# instructions exactly; this measures time, cache misses and syscalls
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
[ $# -ge 2 ] || { echo "usage: bench/ab.sh A_BINARY B_BINARY [ROUNDS] [SECONDS]" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2"); ROUNDS=${3:-10}; SECS=${4:-3}
case "${PROTO:-h2}" in h1 | h2) ;; *) echo "ab: PROTO is h1 or h2" >&2; exit 2 ;; esac
need=()
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

bench_scratch
UP=$(free_port)
upstream_config "$UP" > "$WORK/upstream.conf"
taskset -c 0 nginx -c "$WORK/upstream.conf" & pids+=($!)

declare -A port pid
for side in a b; do
  port[$side]=$(free_port)
  http_bench_config "${port[$side]}" "$(free_port)" "$UP" > "$WORK/$side.yaml"
  bin=$A; [ $side = b ] && bin=$B
  taskset -c 1 "$bin" -c "$WORK/$side.yaml" --concurrency 1 -l error --kernel-lb off \
    > "$WORK/$side.log" 2>&1 &
  pid[$side]=$!; pids+=("${pid[$side]}")
done
for side in a b; do
  for i in $(seq 1 100); do
    curl -sf -o /dev/null "http://127.0.0.1:${port[$side]}/" && break
    [ "$i" -lt 100 ] || { echo "ab: build $side does not answer" >&2; cat "$WORK/$side.log" >&2; exit 1; }
    sleep 0.1
  done
done

# CPU ticks (user + system) of a process so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# load SIDE: one client against that build for SECS; prints its requests.
load() {
  local url="http://127.0.0.1:${port[$1]}/"
  if [ "${PROTO:-h2}" = h1 ]; then
    taskset -c 0 wrk -t1 -c64 -d"${SECS}s" "$url" | awk '/requests in/{print $1}'
  else
    taskset -c 0 h2load -c16 -m32 -D"$SECS" "$url" | awk '/^requests:/{print $4}'
  fi
}
hz=$(getconf CLK_TCK)
wait_quiet
echo "ab: A=$A B=$B, ${PROTO:-h2}, $ROUNDS rounds of ${SECS} s, PSI $(psi)"
ratios=()
for r in $(seq 1 "$ROUNDS"); do
  a0=$(ticks "${pid[a]}"); b0=$(ticks "${pid[b]}")
  load a > "$WORK/na" & la=$!
  load b > "$WORK/nb" & lb=$!
  wait "$la" "$lb"
  a1=$(ticks "${pid[a]}"); b1=$(ticks "${pid[b]}")
  na=$(cat "$WORK/na"); nb=$(cat "$WORK/nb")
  line=$(awk -v a=$((a1 - a0)) -v b=$((b1 - b0)) -v na="$na" -v nb="$nb" -v hz="$hz" \
    'BEGIN { ua = a * 1e6 / hz / na; ub = b * 1e6 / hz / nb;
             printf "%.2f %.2f %.4f %d %d", ua, ub, ub / ua, na, nb }')
  read -r ua ub ratio na nb <<<"$line"
  ratios+=("$ratio")
  echo "round $r: A $ua µs/request ($na requests), B $ub µs/request ($nb), B/A $ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{v[NR] = $1}
  END { n = NR; m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2;
        printf "B/A CPU per request: median %.3f, quartiles %.3f-%.3f, %d rounds\n",
          m, v[int((n + 3) / 4)], v[int((3 * n + 3) / 4)], n }'
