#!/usr/bin/env bash
# Builds Legate, starts a real echo upstream on 127.0.0.1:8080 and Legate on
# examples/basic.yaml (listener :10000, admin :9901), proves one request goes
# through, then keeps both running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p legate -p legate-tests --bins

./target/release/echo-upstream --listen 127.0.0.1:8080 --name example-upstream &
UPSTREAM=$!
./target/release/legate -c examples/basic.yaml --concurrency 2 &
LEGATE=$!
trap 'kill $LEGATE $UPSTREAM 2>/dev/null || true' EXIT INT TERM

for _ in $(seq 1 100); do
  curl -sf http://127.0.0.1:9901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
for pid in $UPSTREAM $LEGATE; do
  kill -0 "$pid" 2>/dev/null || { echo "run-example: a process failed to start (ports 8080, 10000 and 9901 must be free)" >&2; exit 1; }
done
echo
echo "Legate is serving examples/basic.yaml. One request through it:"
reply=$(curl -s -i http://127.0.0.1:10000/hello)
echo "$reply"
grep -q '"server":"example-upstream"' <<<"$reply" || { echo "run-example: the reply did not come from this example's upstream" >&2; exit 1; }
echo
echo
echo "Try:   curl -i http://127.0.0.1:10000/anything"
echo "       curl -i --http2-prior-knowledge http://127.0.0.1:10000/h2"
echo "Admin: curl http://127.0.0.1:9901/stats   (Ctrl-C to stop)"
wait $LEGATE
