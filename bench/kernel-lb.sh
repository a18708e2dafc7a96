#!/usr/bin/env bash
# bench/kernel-lb.sh [REPS] [SECONDS]
#
# L4 connect benchmark, one run, interleaved: connect + 1 byte each way +
# close, against the same 1-byte echo server, by five paths:
#   direct          client -> echo
#   direct+cgroup   the same from inside an empty cgroup (what moving the
#                   client out of the root cgroup costs by itself)
#   direct+hooks    the same from inside the kernel LB's cgroup (the
#                   connect4 program runs, the address is no VIP)
#   kernel LB       client in the cgroup -> VIP; Legate's eBPF picks the echo
#   legate tcp_proxy client -> Legate's userspace tcp_proxy -> echo
#   envoy tcp_proxy  client -> Envoy 1.40's tcp_proxy -> echo
# Latency: one client thread (connect to reply, p50/p99). Rate: two client
# threads (connections per second). Proxies run with one worker on cpu1,
# client and echo on cpu0. Needs root (cgroup + BPF). Writes
# bench/results/kernel-lb.md with medians, min-max and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
REPS=${1:-5}
SECS=${2:-3}
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "kernel-lb bench: needs root" >&2; exit 1; }
./scripts/setup.sh >/dev/null

ENVOY=$(./scripts/envoy.sh)
cargo build -q --release -p legate -p connect-rr
RR=$PWD/target/release/connect-rr
LEGATE=$PWD/target/release/legate

bench_scratch
CG=$(awk '$3=="cgroup2"{print $2; exit}' /proc/self/mounts)/legate-bench-$$
BASE_ID=$((90000 + $$ % 1000))
CG0=$CG-empty
mkdir -p "$CG" "$CG0"
bench_cleanup_extra() {
  rm -rf "/sys/fs/bpf/legate/$BASE_ID"
  rmdir "$CG" "$CG0" 2>/dev/null || true
}

ECHO_PORT=$(free_port); LEGATE_PORT=$(free_port); ENVOY_PORT=$(free_port)
LEGATE_ADMIN=$(free_port); ENVOY_ADMIN=$(free_port)
VIP=127.100.9.1:9000

taskset -c 0 "$RR" serve "127.0.0.1:$ECHO_PORT" >/dev/null & pids+=($!)

tcp() { # name address port bind
  cat <<YAML
  - name: $1
    bind_to_port: $4
    address: {socket_address: {address: $2, port_value: $3}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: $1
          cluster: echo
YAML
}
cluster() {
  cat <<YAML
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $ECHO_PORT}}}}]}]
YAML
}
{ echo "admin: {address: {socket_address: {address: 127.0.0.1, port_value: $LEGATE_ADMIN}}}"
  echo "static_resources:"; echo "  listeners:"
  tcp vip 127.100.9.1 9000 false; tcp tcp 127.0.0.1 "$LEGATE_PORT" true; cluster; } > "$WORK/legate.yaml"
{ echo "admin: {address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_ADMIN}}}"
  echo "static_resources:"; echo "  listeners:"
  tcp tcp 127.0.0.1 "$ENVOY_PORT" true; cluster; } > "$WORK/envoy.yaml"

taskset -c 1 "$LEGATE" -c "$WORK/legate.yaml" --concurrency 1 -l warning \
  --kernel-lb required --kernel-lb-cgroup "$CG" --base-id "$BASE_ID" & LEGATE_PID=$!; pids+=("$LEGATE_PID")
taskset -c 1 "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 -l error --base-id "$((BASE_ID + 1))" & pids+=($!)
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$LEGATE_ADMIN/kernel_lb" 2>/dev/null | grep -q '"offloaded": true' \
    && curl -sf "http://127.0.0.1:$ENVOY_ADMIN/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$LEGATE_ADMIN/kernel_lb" | grep -q '"offloaded": true' || { echo "the VIP was not offloaded" >&2; exit 1; }

wait_quiet
PSI_START=$(psi)

run() { # label target threads [cgroup]
  taskset -c 0 "$RR" run "$2" "$SECS" "$3" ${4:-} < /dev/null | sed "s/^/$1 $3 /"
}
: > "$WORK/raw"
paths() { # one line per path: label target [cgroup]
  echo "direct 127.0.0.1:$ECHO_PORT"
  echo "direct+cgroup 127.0.0.1:$ECHO_PORT $CG0"
  echo "direct+hooks 127.0.0.1:$ECHO_PORT $CG"
  echo "kernel-lb $VIP $CG"
  echo "legate-tcp_proxy 127.0.0.1:$LEGATE_PORT"
  echo "envoy-tcp_proxy 127.0.0.1:$ENVOY_PORT"
}
for rep in $(seq 1 "$REPS"); do
  # Every other repetition runs the paths in reverse (ABBA), so a path is
  # not always measured right after the same neighbour.
  if [ $((rep % 2)) -eq 0 ]; then order=tac; else order=cat; fi
  for t in 1 2; do
    while read -r label target cg; do
      run "$label" "$target" $t $cg >> "$WORK/raw"
    done < <(paths | $order)
  done
  echo "rep $rep/$REPS done" >&2
done

# What the eBPF programs themselves cost per kernel-balanced connection:
# the kernel's own run-time accounting, switched on only for this extra
# run (it adds two clock reads per program run).
sysctl -qw kernel.bpf_stats_enabled=1
run kernel-lb-stats "$VIP" 1 "$CG" > "$WORK/stats-run"
prog_ns=0; prog_runs=0; sockops_runs=0
for f in /proc/"$LEGATE_PID"/fdinfo/*; do
  grep -q '^prog_type' "$f" 2>/dev/null || continue
  ns=$(awk '$1=="run_time_ns:"{print $2}' "$f"); cnt=$(awk '$1=="run_cnt:"{print $2}' "$f")
  prog_ns=$((prog_ns + ns)); prog_runs=$((prog_runs + cnt))
  if awk '$1=="prog_type:" && $2==13 {f=1} END {exit !f}' "$f"; then sockops_runs=$((sockops_runs + cnt)); fi
done
sysctl -qw kernel.bpf_stats_enabled=0
STATS_CONNS=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read().split(" ",2)[2])["connections"])' < "$WORK/stats-run")
PSI_END=$(psi)

mkdir -p bench/results
# The per-repetition results, so later runs can be pooled with this one.
cp "$WORK/raw" bench/results/kernel-lb.raw
python3 - "$WORK/raw" "$REPS" "$SECS" "$PSI_START" "$PSI_END" "$prog_ns" "$prog_runs" "$sockops_runs" "$STATS_CONNS" > bench/results/kernel-lb.md <<'PY'
import json, sys, statistics, platform, os, subprocess
raw, reps, secs, psi0, psi1, prog_ns, prog_runs, sockops_runs, stats_conns = sys.argv[1:]
runs = {}
for line in open(raw):
    label, threads, js = line.split(" ", 2)
    runs.setdefault((label, int(threads)), []).append(json.loads(js))
labels = ["direct", "direct+cgroup", "direct+hooks", "kernel-lb", "legate-tcp_proxy", "envoy-tcp_proxy"]
def med(label, t, key):
    v = [r[key] for r in runs[(label, t)]]
    return statistics.median(v), min(v), max(v)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print("# L4 connect benchmark: kernel LB vs direct, Legate and Envoy tcp_proxy\n")
print(f"Generated by `bench/kernel-lb.sh {reps} {secs}` on {platform.node()}: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}; "
      f"CPU pressure (PSI some avg10) {psi0} at start, {psi1} at end. {reps} interleaved repetitions of {secs} s per path "
      "(every other repetition in reverse order); "
      "medians with min-max. One connection = connect, 1 byte each way, server closes.\n")
print("| path | p50 µs (1 client) | p99 µs (1 client) | conns/s (2 clients) | errors |")
print("|---|---|---|---|---|")
for l in labels:
    p50 = med(l, 1, "p50_us"); p99 = med(l, 1, "p99_us"); cps = med(l, 2, "cps")
    err = sum(r["errors"] for t in (1, 2) for r in runs[(l, t)])
    print(f"| {l} | {p50[0]:.1f} ({p50[1]:.1f}-{p50[2]:.1f}) | {p99[0]:.1f} ({p99[1]:.1f}-{p99[2]:.1f}) | {cps[0]:.0f} ({cps[1]:.0f}-{cps[2]:.0f}) | {err} |")
d50 = med("direct", 1, "p50_us")[0]; k50 = med("kernel-lb", 1, "p50_us")[0]
dc = med("direct", 2, "cps")[0]; kc = med("kernel-lb", 2, "cps")[0]
lc = med("legate-tcp_proxy", 2, "cps")[0]; ec = med("envoy-tcp_proxy", 2, "cps")[0]
l50 = med("legate-tcp_proxy", 1, "p50_us")[0]; e50 = med("envoy-tcp_proxy", 1, "p50_us")[0]
print("\n## Ratios (medians, same run)\n")
def paired(a, b, t, key):
    # Per repetition: path a over path b measured moments apart, so slow
    # drifts of the shared machine cancel; median (min-max) over reps.
    r = sorted(x[key] / y[key] for x, y in zip(runs[(a, t)], runs[(b, t)]))
    return statistics.median(r), r[0], r[-1]
pk = paired("kernel-lb", "direct", 1, "p50_us")
print(f"- kernel LB p50 latency / direct, paired per repetition: **{pk[0]:.3f}** ({pk[1]:.3f}-{pk[2]:.3f}) (target ≤ 1.05)")
print(f"- kernel LB p50 latency / direct, ratio of the medians: **{k50/d50:.3f}**")
print(f"- kernel LB conns/s / direct: **{kc/dc:.3f}**")
h50 = med("direct+hooks", 1, "p50_us")[0]; g50 = med("direct+cgroup", 1, "p50_us")[0]
print(f"- kernel LB p50 / direct from the same cgroup (hooks run, no VIP): **{k50/h50:.3f}**; empty cgroup / root: {g50/d50:.3f}")
print(f"- kernel LB conns/s / Envoy tcp_proxy: **{kc/ec:.2f}×** (target ≥ 2)")
print(f"- Legate tcp_proxy conns/s / Envoy tcp_proxy: **{lc/ec:.2f}×**; p50 {l50/e50:.3f} of Envoy's")
print(f"- kernel LB p50 / Envoy tcp_proxy p50: **{k50/e50:.3f}**")
conns = int(stats_conns)
print(f"\n## eBPF cost per kernel-balanced connection\n")
print(f"One more {secs} s kernel-LB run with `kernel.bpf_stats_enabled`: {conns} connections; Legate's programs ran "
      f"{int(prog_runs)} times for {int(prog_ns) / conns:.0f} ns per connection in all; sock_ops ran {int(sockops_runs)} times "
      "(it is attached only when a REDIRECT service exists).")
PY
# The p50 ratio as one estimate with its interval, from this run's pairs
# (bench/kernel_lb_pooled.py also pools several runs' raw files).
{ printf '\n## Kernel LB p50 / direct, pooled\n\n'; python3 bench/kernel_lb_pooled.py bench/results/kernel-lb.raw; } >> bench/results/kernel-lb.md
cat bench/results/kernel-lb.md
