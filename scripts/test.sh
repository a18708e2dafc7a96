#!/usr/bin/env bash
# Runs Legate's whole test suite: formatting, unit and integration tests
# (which start the real binary with real upstreams and curl), then the
# differential conformance suite against the real Envoy 1.40.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

# As root (CI), the kernel load balancer's privileged tests must run:
# a skip is then a failure.
if [ "$(id -u)" -eq 0 ]; then export LEGATE_REQUIRE_BPF=1; fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
cargo test --workspace 2>&1 | tee target/test-output.log
./conformance/run
