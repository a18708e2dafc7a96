#!/usr/bin/env bash
# Runs Legate's whole test suite: formatting, unit and integration tests
# (which start the real binary with real upstreams and curl), then the
# differential conformance suite against the real Envoy 1.40.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo test --workspace 2>&1 | tee target/test-output.log
./conformance/run
