#!/usr/bin/env bash
# Builds SPIRE's spire-server and spire-agent (the interop peers of tests/interop_spire.rs) from
# the Go module proxy into a cache dir outside the work tree, once: when both binaries are there
# it does nothing. The test finds them through SVIDCAR_SPIRE_BIN or this same default.
#   SVIDCAR_SPIRE_BIN  where the binaries go (default: $HOME/.cache/svidcar/spire-<version>/bin)
# SPIRE's go.mod has replace directives, so `go install pkg@version` refuses it; a throwaway
# module that requires it as a tool builds it instead (its replaces are then ignored).
set -euo pipefail
version=v1.13.3
bin=${SVIDCAR_SPIRE_BIN:-${HOME:-/root}/.cache/svidcar/spire-$version/bin}
if [ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ]; then
  exit 0
fi
command -v go >/dev/null 2>&1 || PATH=$PATH:/usr/local/go/bin
if ! command -v go >/dev/null 2>&1; then
  echo "warning: no go toolchain: SPIRE $version not built; tests/interop_spire.rs will say so" >&2
  exit 0
fi
echo "building SPIRE $version (spire-server, spire-agent) into $bin (once; a few minutes)"
start=$(date +%s)
mod=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$mod" "$log"' EXIT
# A newer toolchain, if SPIRE's go.mod asks for one, comes from the module proxy
# (golang.org/toolchain). Go builds share the machine's cores with everything else: nice.
build() {
  cd "$mod"
  export GOTOOLCHAIN=auto GOFLAGS=-buildvcs=false
  go mod init svidcar.invalid/spire-build
  go get -tool "github.com/spiffe/spire/cmd/spire-server@$version"
  go get -tool "github.com/spiffe/spire/cmd/spire-agent@$version"
  mkdir -p "$bin.partial"
  GOBIN="$bin.partial" nice -n 10 go install github.com/spiffe/spire/cmd/spire-server \
    github.com/spiffe/spire/cmd/spire-agent
  "$bin.partial/spire-server" --version
}
if ! (build) </dev/null >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "error: building SPIRE $version failed (log above)" >&2
  exit 1
fi
rm -rf "$bin" && mv "$bin.partial" "$bin"
echo "SPIRE $version built in $(( $(date +%s) - start )) s: $(tail -n 1 "$log")"
