#!/usr/bin/env bash
# Installs what building and testing Legate needs, only when it is missing.
# Safe to run again; used by run-example.sh, test.sh and CI.
set -euo pipefail

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v curl >/dev/null || need_apt+=(curl)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)   # conformance: h2load
command -v openssl >/dev/null || need_apt+=(openssl)          # TLS tests: s_client
command -v iptables >/dev/null || need_apt+=(iptables)       # original_dst test: REDIRECT in a netns
command -v redis-server >/dev/null || need_apt+=(redis-server) # conformance: the rate limit service's store
command -v patch >/dev/null || need_apt+=(patch) # conformance: istiod is built with our no-kube patch
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: Rust (cargo) is required: install it with rustup" >&2
    exit 1
  fi
fi

# The kernel load balancer's eBPF programs build on stable Rust with the
# rust-src component and bpf-linker (built against the system's LLVM 22,
# which matches rustc's). Without them the build still succeeds, but the
# binary carries no eBPF object and the kernel tests would say "skipped".
if command -v rustup >/dev/null && ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "setup: adding the rust-src component" >&2
  rustup component add rust-src >/dev/null
fi
if ! command -v bpf-linker >/dev/null; then
  if ! dpkg -s llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev >/dev/null 2>&1; then
    echo "setup: installing LLVM 22 development files for bpf-linker" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev >/dev/null
  fi
  echo "setup: building bpf-linker 0.13.0 (a few minutes, once)" >&2
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@0.13.0 --no-default-features --features llvm-22 --locked --quiet
fi
