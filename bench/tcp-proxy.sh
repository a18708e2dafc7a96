#!/usr/bin/env bash
# bench/tcp-proxy.sh [REPS] [SECONDS]
#
# Userspace L4 proxies side by side, one run, interleaved: Legate's
# tcp_proxy, Envoy 1.40's tcp_proxy and HAProxy `mode tcp`, with the direct
# path as the physical reference. Each proxy runs one worker pinned to cpu1;
# clients and servers run on cpu0.
#   throughput   iperf3 (one stream, SECONDS s) through each path
#   conns/s      connect + 1 byte each way + close, two client threads
#   latency      the same with one client thread: p50/p99 of connect-to-reply
# Writes bench/results/tcp-proxy.md with medians, min-max and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
REPS=${1:-5}
SECS=${2:-5}
export PATH="$HOME/.cargo/bin:$PATH"
./scripts/setup.sh >/dev/null
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v haproxy >/dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

ENVOY=$(./scripts/envoy.sh)
cargo build -q --release -p legate -p connect-rr
RR=$PWD/target/release/connect-rr
LEGATE=$PWD/target/release/legate

bench_scratch

ECHO=$(free_port); IPERF=$(free_port)
L_ECHO=$(free_port); L_IPERF=$(free_port); L_ADMIN=$(free_port)
E_ECHO=$(free_port); E_IPERF=$(free_port); E_ADMIN=$(free_port)
H_ECHO=$(free_port); H_IPERF=$(free_port)

taskset -c 0 "$RR" serve "127.0.0.1:$ECHO" >/dev/null & pids+=($!)
taskset -c 0 iperf3 -s -p "$IPERF" >/dev/null 2>&1 & pids+=($!)

envoy_config() { # admin echo-port iperf-port
  cat <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $1}}}
static_resources:
  listeners:
YAML
  for l in "echo $2 $ECHO" "iperf $3 $IPERF"; do
    set -- $l
    cat <<YAML
  - name: $1
    address: {socket_address: {address: 127.0.0.1, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: $1
          cluster: $1
YAML
  done
  echo "  clusters:"
  for c in "echo $ECHO" "iperf $IPERF"; do
    set -- $c
    cat <<YAML
  - name: $1
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: $1
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $2}}}}]}]
YAML
  done
}
envoy_config "$L_ADMIN" "$L_ECHO" "$L_IPERF" > "$WORK/legate.yaml"
envoy_config "$E_ADMIN" "$E_ECHO" "$E_IPERF" > "$WORK/envoy.yaml"
cat > "$WORK/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen echo
  bind 127.0.0.1:$H_ECHO
  server s 127.0.0.1:$ECHO
listen iperf
  bind 127.0.0.1:$H_IPERF
  server s 127.0.0.1:$IPERF
CFG

taskset -c 1 "$LEGATE" -c "$WORK/legate.yaml" --concurrency 1 -l warning --kernel-lb off & pids+=($!)
taskset -c 1 "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 -l error --base-id "$((70000 + $$ % 1000))" & pids+=($!)
taskset -c 1 haproxy -q -f "$WORK/haproxy.cfg" & pids+=($!)
# Probe only the echo ports: a probe through to iperf3's server would
# occupy it as a test that never starts.
for port in "$L_ECHO" "$E_ECHO" "$H_ECHO"; do
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    [ "$i" -lt 100 ] || { echo "tcp-proxy bench: nothing listens on $port" >&2; exit 1; }
    sleep 0.1
  done
done

wait_quiet
PSI_START=$(psi)

: > "$WORK/raw"
paths=("direct $ECHO $IPERF" "legate $L_ECHO $L_IPERF" "envoy $E_ECHO $E_IPERF" "haproxy $H_ECHO $H_IPERF")
for rep in $(seq 1 "$REPS"); do
  for p in "${paths[@]}"; do
    set -- $p
    for t in 1 2; do
      echo "$1 rr$t $(taskset -c 0 "$RR" run "127.0.0.1:$2" 3 $t)" >> "$WORK/raw"
    done
    bps=$(taskset -c 0 iperf3 -c 127.0.0.1 -p "$3" -t "$SECS" -J \
      | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["end"]["sum_received"]["bits_per_second"]) if "sum_received" in j.get("end", {}) else sys.exit("iperf3 via " + sys.argv[1] + ": " + j.get("error", "no result"))' "$1")
    echo "$1 iperf {\"bps\": $bps}" >> "$WORK/raw"
  done
  echo "rep $rep/$REPS done" >&2
done
PSI_END=$(psi)
HAPROXY_VERSION=$(haproxy -v | head -1)

mkdir -p bench/results
python3 - "$WORK/raw" "$REPS" "$SECS" "$PSI_START" "$PSI_END" "$HAPROXY_VERSION" > bench/results/tcp-proxy.md <<'PY'
import json, sys, statistics, platform, os
raw, reps, secs, psi0, psi1, hav = sys.argv[1:]
runs = {}
for line in open(raw):
    label, kind, js = line.split(" ", 2)
    runs.setdefault((label, kind), []).append(json.loads(js))
labels = ["direct", "legate", "envoy", "haproxy"]
names = {"direct": "direct (no proxy)", "legate": "Legate tcp_proxy", "envoy": "Envoy 1.40 tcp_proxy", "haproxy": "HAProxy mode tcp"}
def med(label, kind, key):
    v = [r[key] for r in runs[(label, kind)]]
    return statistics.median(v), min(v), max(v)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print("# tcp_proxy benchmark: Legate, Envoy and HAProxy side by side\n")
print(f"Generated by `bench/tcp-proxy.sh {reps} {secs}` on {platform.node()}: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}; "
      f"{hav}. CPU pressure (PSI some avg10) {psi0} at start, {psi1} at end. {reps} interleaved repetitions; "
      "medians with min-max. Each proxy has one worker pinned to cpu1; clients and servers run on cpu0, all on loopback.\n")
print(f"- throughput: iperf3, one stream, {secs} s")
print("- conns/s: connect, 1 byte each way, server closes; two client threads, 3 s")
print("- latency: the same with one client thread (connect to reply)\n")
print("| path | iperf3 Gbit/s | conns/s (2 clients) | p50 µs (1 client) | p99 µs (1 client) | errors |")
print("|---|---|---|---|---|---|")
for l in labels:
    g = [x / 1e9 for x in med(l, "iperf", "bps")]
    c = med(l, "rr2", "cps"); p50 = med(l, "rr1", "p50_us"); p99 = med(l, "rr1", "p99_us")
    err = sum(r["errors"] for k in ("rr1", "rr2") for r in runs[(l, k)])
    print(f"| {names[l]} | {g[0]:.1f} ({g[1]:.1f}-{g[2]:.1f}) | {c[0]:.0f} ({c[1]:.0f}-{c[2]:.0f}) | {p50[0]:.1f} ({p50[1]:.1f}-{p50[2]:.1f}) | {p99[0]:.1f} ({p99[1]:.1f}-{p99[2]:.1f}) | {err} |")
print("\n## Ratios (medians, same run)\n")
for peer in ("envoy", "haproxy", "direct"):
    gt = med("legate", "iperf", "bps")[0] / med(peer, "iperf", "bps")[0]
    ct = med("legate", "rr2", "cps")[0] / med(peer, "rr2", "cps")[0]
    pt = med("legate", "rr1", "p50_us")[0] / med(peer, "rr1", "p50_us")[0]
    print(f"- Legate / {names[peer]}: throughput **{gt:.2f}×**, conns/s **{ct:.2f}×**, p50 latency {pt:.2f}×")
PY
cat bench/results/tcp-proxy.md
