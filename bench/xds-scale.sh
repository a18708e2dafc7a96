#!/usr/bin/env bash
# bench/xds-scale.sh [CLUSTERS] [ENDPOINTS_PER_CLUSTER]
#
# xDS at scale, Legate beside Envoy 1.40 in one run: a go-control-plane
# v0.14.0 ADS server (bench/xds-scale/main.go) pushes CLUSTERS EDS clusters
# with ENDPOINTS_PER_CLUSTER endpoints each (default 10 000 x 10 = 100 000
# endpoints), over SotW and over Delta. Reported: push-to-ACK time (until
# both CDS and EDS are ACKed) and the proxy's RSS once it has ACKed, with
# Legate/Envoy ratios. Each run is alone in a network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
E=${2:-10}
export PATH="$HOME/.cargo/bin:$PATH:/usr/local/go/bin"
./scripts/setup.sh >/dev/null

ENVOY=$(./scripts/envoy.sh)

MOD=target/bench/xds-scale
mkdir -p "$MOD"
cp bench/xds-scale/main.go "$MOD/"
(
  cd "$MOD"
  if [ ! -f go.mod ]; then
    go mod init xds-scale >/dev/null 2>&1
    go get github.com/envoyproxy/go-control-plane@v0.14.0 \
      github.com/envoyproxy/go-control-plane/envoy@v1.40.0 >/dev/null 2>&1
  fi
  go mod tidy >/dev/null 2>&1
  go build -o xds-scale .
)
cargo build -q --release -p legate
LEGATE=$PWD/target/release/legate

boot() { # $1 = GRPC | DELTA_GRPC
  cat <<YAML
node: {id: bench, cluster: bench}
dynamic_resources:
  ads_config:
    api_type: $1
    transport_api_version: V3
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
    set_node_on_first_message_only: true
  cds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    http2_protocol_options: {}
    load_assignment:
      cluster_name: xds
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18000}}}}]}]
YAML
}

run() { # $1 proxy binary, $2 api type -> prints "ms rss_kib"
  local cfg out
  cfg=$(mktemp --suffix=.yaml)
  out=$(mktemp)
  boot "$2" >"$cfg"
  unshare -rn bash -c '
    ip link set lo up
    "$0" -clusters "$1" -endpoints "$2" >"$3" 2>"$3.err" &
    D=$!
    sleep 0.3
    "$4" -c "$5" --concurrency 1 --disable-hot-restart -l error 2>/dev/null &
    P=$!
    for _ in $(seq 1300); do grep -q push_to_ack "$3" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    rss=$(awk "/VmRSS/ {print \$2}" /proc/$P/status)
    echo "rss=$rss" >>"$3"
    kill $P $D 2>/dev/null; wait 2>/dev/null || true
  ' "$PWD/$MOD/xds-scale" "$N" "$E" "$out" "$1" "$cfg"
  local ms rss
  ms=$(grep -o '"push_to_ack_ms":[0-9]*' "$out" | cut -d: -f2 || true)
  rss=$(grep -o 'rss=[0-9]*' "$out" | cut -d= -f2 || true)
  rm -f "$cfg" "$out" "$out.err"
  echo "${ms:-fail} ${rss:-0}"
}

echo "xDS scale: $N clusters, $((N * E)) endpoints, pushed over ADS by go-control-plane v0.14.0"
printf '%-10s %-7s %14s %10s\n' proxy api push_to_ack_ms rss_MiB
for api in GRPC DELTA_GRPC; do
  read -r e_ms e_rss < <(run "$ENVOY" "$api")
  read -r l_ms l_rss < <(run "$LEGATE" "$api")
  printf '%-10s %-7s %14s %10s\n' envoy "$api" "$e_ms" "$((e_rss / 1024))"
  printf '%-10s %-7s %14s %10s\n' legate "$api" "$l_ms" "$((l_rss / 1024))"
  if [ "$e_ms" != fail ] && [ "$l_ms" != fail ] && [ "$e_rss" -gt 0 ]; then
    awk -v a="$l_ms" -v b="$e_ms" -v c="$l_rss" -v d="$e_rss" -v api="$api" \
      'BEGIN { printf "ratio legate/envoy %-10s time %.2f  rss %.2f\n", api, (b ? a / b : 0), c / d }'
  fi
done
