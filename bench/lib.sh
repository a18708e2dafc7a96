# Shell helpers the bench scripts share (sourced, not run).

# A free TCP port on 127.0.0.1, from below the kernel's ephemeral range
# and never the same twice in one script: a port the kernel handed out
# (bind to 0) can be taken by an outgoing connection before the proxy that
# was meant to listen on it starts.
free_port() {
  python3 - "${TMPDIR:-/tmp}/legate-bench-ports.$$" <<'PY'
import random, socket, sys
used_file = sys.argv[1]
try:
    used = set(open(used_file).read().split())
except FileNotFoundError:
    used = set()
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
while True:
    p = random.randrange(10000, low)
    if str(p) in used:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    open(used_file, "a").write(f"{p}\n")
    print(p)
    break
PY
}

# CPU pressure: PSI "some avg10" (0 when the kernel has no PSI).
psi() { awk '/^some/{split($2,a,"="); print a[2]}' /proc/pressure/cpu 2>/dev/null || echo 0; }

# Waits (up to a minute) for the machine to be quiet (PSI below 3) before
# measuring: figures taken under load from elsewhere are not comparable.
wait_quiet() {
  for _ in $(seq 1 30); do
    awk -v p="$(psi)" 'BEGIN{exit !(p < 3)}' && return
    sleep 2
  done
}

# pid_of FILE: the pid a daemon writes to FILE, waiting up to 10 s for it
# (nginx writes its pid file only once it has started; a loaded machine
# can take more than a second).
pid_of() {
  local i
  for i in $(seq 1 100); do
    [ -s "$1" ] && { cat "$1"; return 0; }
    sleep 0.1
  done
  echo "bench: no pid in $1 after 10 s" >&2
  return 1
}

# A scratch directory (WORK) and the processes a script starts (append
# their pids to `pids`): on exit the processes are stopped and the
# directory removed, with free_port's record. A script with more to undo
# defines bench_cleanup_extra first.
bench_scratch() {
  WORK=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
}
stop_pids() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
bench_cleanup() {
  stop_pids
  if declare -F bench_cleanup_extra >/dev/null; then bench_cleanup_extra; fi
  rm -rf "$WORK" "${TMPDIR:-/tmp}/legate-bench-ports.$$"
}

# http_bench_config PORT ADMIN UPSTREAM: a bootstrap with one plain HTTP
# listener on PORT routing everything to the upstream on UPSTREAM, the
# admin on ADMIN, without request ids or dynamic stats (as bench/run's).
http_bench_config() {
  cat <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $2}}}
static_resources:
  listeners:
  - name: plain
    address: {socket_address: {address: 127.0.0.1, port_value: $1}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          generate_request_id: false
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: up}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, dynamic_stats: false}
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $3}}}}]}]
YAML
}

# upstream_config PORT: an nginx config for the benches' upstream, one
# worker answering 200 "ok" on PORT, its pid in $WORK/upstream.pid.
upstream_config() {
  cat <<CONF
worker_processes 1; daemon off; pid $WORK/upstream.pid; error_log /dev/null;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000;
  server { listen 127.0.0.1:$1; location / { return 200 "ok"; } } }
CONF
}
