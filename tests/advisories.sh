#!/usr/bin/env bash
# `cargo deny check advisories` offline, against the dated RustSec snapshot in ../shared/rustsec/
# (the build machines and CI cannot reach the advisory database's home). Fails on any advisory
# (vulnerability, unmaintained direct dependency, unsound) and prints the snapshot's date, since
# a snapshot only knows what was known that day. Run from anywhere; called by tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
snap=$(ls ../shared/rustsec/advisory-db-*.tar.gz 2>/dev/null | sort | tail -1 || true)
if [ -z "$snap" ]; then
  if [ "${CI:-}" = true ]; then
    echo "error: no RustSec snapshot at ../shared/rustsec/advisory-db-*.tar.gz (CI needs it)" >&2
    exit 1
  fi
  echo "SKIPPED advisories: no RustSec snapshot at ../shared/rustsec/ (outside CI)" >&2
  exit 0
fi
date=$(basename "$snap" .tar.gz); date=${date#advisory-db-}
# cargo-deny reads the database from a git checkout named after the database URL's hash.
base=target/rustsec-$date
db=$base/advisory-db-3157b0e258782691
if [ ! -d "$db/.git" ]; then
  rm -rf "$base"; mkdir -p "$db"
  tar -xzf "$snap" -C "$db"
  (cd "$db" && git init -q && git add -A &&
   GIT_COMMITTER_DATE="${date}T00:00:00Z" git -c user.name=snapshot -c user.email=snapshot@invalid \
     commit -q --date="${date}T00:00:00Z" -m "RustSec snapshot $date")
fi
# deny.toml with db-path pointing at the snapshot (the checked-in file stays portable).
cfg=$base/deny.toml
sed "s|^\[advisories\]$|[advisories]\ndb-path = \"$(pwd)/$base\"|" deny.toml > "$cfg"
# --offline keeps cargo-deny from fetching the database, and cargo from the registry: every
# crate of the graph (all platforms) must already be in cargo's cache.
cargo fetch --locked --quiet
echo "RustSec advisory snapshot of $date (advisories published after that day are not known)"
cargo deny --all-features --offline --config "$cfg" check advisories
