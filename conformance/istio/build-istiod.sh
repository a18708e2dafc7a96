#!/usr/bin/env bash
# Build a real istiod (pilot-discovery) and pilot-agent from the Istio Go module,
# patched to run without Kubernetes (see no-kube.patch), into a cache outside
# the checkout:  ${LEGATE_CACHE:-$HOME/.cache/legate}/istio/<version>/bin/
#
# Idempotent: a second run with the same version + patch prints the path and exits.
# Last line on stdout: absolute path of pilot-discovery. Progress goes to stderr.
#
# Env:
#   ISTIO_MODULE_VERSION  istio.io/istio module version (default below)
#   ISTIO_BUILD_VERSION   version string stamped into the binaries (default 1.31-dev,
#                         from the module's VERSION file)
#   LEGATE_CACHE          cache root (default $HOME/.cache/legate)
#   ISTIO_SKIP_AGENT=1    do not build pilot-agent
set -euo pipefail

ISTIO_MODULE_VERSION=${ISTIO_MODULE_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH="$HERE/no-kube.patch"
ROOT="${LEGATE_CACHE:-$HOME/.cache/legate}/istio/$ISTIO_MODULE_VERSION"
BIN="$ROOT/bin"
SRC="$ROOT/src"

die() { echo "build-istiod: ERROR: $*" >&2; exit 1; }
log() { echo "build-istiod: $*" >&2; }

[ -f "$PATCH" ] || die "missing $PATCH"
command -v sha256sum >/dev/null || die "sha256sum not found"

targets=(pilot-discovery)
[ "${ISTIO_SKIP_AGENT:-0}" = 1 ] || targets+=(pilot-agent)

# Stamp = module version + patch content + targets; rebuild if any changes.
stamp="$ISTIO_MODULE_VERSION $(sha256sum <"$PATCH" | cut -d' ' -f1) ${targets[*]}"
if [ -f "$BIN/.stamp" ] && [ "$(cat "$BIN/.stamp")" = "$stamp" ]; then
  ok=1
  for t in "${targets[@]}"; do [ -x "$BIN/$t" ] || ok=0; done
  if [ $ok = 1 ]; then echo "$BIN/pilot-discovery"; exit 0; fi
fi

# Go toolchain
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH=/usr/local/go/bin:$PATH
fi
command -v go >/dev/null || die "go not found (install Go >= 1.26 or put it on PATH)"
command -v patch >/dev/null || die "patch(1) not found"
export GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-local}
log "using $(go version)"

# 1. Fetch the pristine module (read-only in the module cache).
tmpd=$(mktemp -d); trap 'rm -rf "$tmpd"' EXIT
log "downloading istio.io/istio@$ISTIO_MODULE_VERSION (large: ~640 MB with deps, first time only)"
json=$(cd "$tmpd" && go mod download -json "istio.io/istio@$ISTIO_MODULE_VERSION") \
  || die "go mod download failed: $json"
moddir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
[ -n "$moddir" ] && [ -f "$moddir/go.mod" ] || die "could not locate module dir in: $json"

# 2. Writable, patched copy (recreated if the patch or version changed).
mkdir -p "$ROOT"
rm -rf "$SRC.tmp"
log "copying $moddir -> $SRC"
cp -R "$moddir" "$SRC.tmp"
chmod -R u+w "$SRC.tmp"
log "applying $(basename "$PATCH")"
(cd "$SRC.tmp" && patch -p1 --forward --batch <"$PATCH" >&2) || die "patch did not apply cleanly"
rm -rf "$SRC"
mv "$SRC.tmp" "$SRC"

# 3. Build.
ver=${ISTIO_BUILD_VERSION:-$(cat "$SRC/VERSION" 2>/dev/null || echo 0.0)-dev}
rev=$(printf '%s' "$ISTIO_MODULE_VERSION" | sed -n 's/.*-\([0-9a-f]\{12\}\)$/\1/p')
ldflags="-s -w -X istio.io/istio/pkg/version.buildVersion=$ver -X istio.io/istio/pkg/version.buildGitRevision=${rev:-unknown} -X istio.io/istio/pkg/version.buildStatus=Modified -X istio.io/istio/pkg/version.buildTag=$ver"
mkdir -p "$BIN"
rm -f "$BIN/.stamp"
for t in "${targets[@]}"; do
  log "go build ./pilot/cmd/$t (several minutes on first build)"
  start=$(date +%s)
  (cd "$SRC" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$BIN/$t.new" "./pilot/cmd/$t") \
    || die "go build $t failed"
  mv "$BIN/$t.new" "$BIN/$t"
  log "built $BIN/$t in $(( $(date +%s) - start ))s"
done
printf '%s\n' "$stamp" >"$BIN/.stamp"
"$BIN/pilot-discovery" version >&2 || die "built pilot-discovery does not run"
echo "$BIN/pilot-discovery"
