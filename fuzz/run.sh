#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after the other, and prints
# a summary (executions, coverage, corpus size, crashes). Exit status 1 if any target crashed.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      default: 60 s, all targets
#   FUZZ_JOBS=2 fuzz/run.sh 600                        two libFuzzer workers per target
#
# Seeds are read from fuzz/corpus/<target> (committed, small); what the fuzzer learns goes to
# fuzz/target/corpus/<target> (not committed, kept between runs). Crashes are written to
# fuzz/artifacts/<target>/; reproduce one with `cargo +nightly fuzz run <target> <file>`.
# All targets are built once, up front, and the built binaries are run directly, so every
# target fuzzes the same snapshot of the sources even while they are being edited.
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a nightly toolchain; without
# nightly, RUSTC_BOOTSTRAP=1 on stable is used instead.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
jobs=${FUZZ_JOBS:-1}
parallel=()
if [ "$jobs" -gt 1 ]; then parallel=(-jobs="$jobs" -workers="$jobs"); fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 2
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <("${fuzz[@]}" list)
fi

"${fuzz[@]}" build >/dev/null
bin_dir=target/x86_64-unknown-linux-gnu/release
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
mkdir -p target/logs
summary=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "target/corpus/$t" "corpus/$t" "artifacts/$t"
  log="target/logs/$t.log"
  echo "== $t: ${secs}s" >&2
  status=ok
  if ! "$bin_dir/$t" "target/corpus/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
      -max_total_time="$secs" "${parallel[@]}" -rss_limit_mb=2048 \
      -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    status=CRASH
    failed=1
  fi
  # With -jobs>1 libFuzzer writes fuzz-<n>.log per worker.
  logs=("$log")
  for w in fuzz-*.log; do [ -f "$w" ] && logs+=("$w"); done
  execs=$(cat "${logs[@]}" | awk '/stat::number_of_executed_units/ {s += $2} END {print s + 0}')
  last=$(cat "${logs[@]}" | grep -E '^#[0-9]+' | tail -1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(find "target/corpus/$t" -type f | wc -l)
  rm -f fuzz-*.log
  rmdir "artifacts/$t" 2>/dev/null || true
  summary+=("$(printf '%-18s %-6s %8ss %12s execs  cov %-6s ft %-6s corpus %s' \
    "$t" "$status" "$secs" "$execs" "${cov:-?}" "${ft:-?}" "$corp")")
  if [ "$status" != ok ]; then
    grep -E 'panicked|ERROR: AddressSanitizer|SUMMARY|Test unit written' "$log" | head -5 >&2 || true
    rmdir "artifacts/$t" 2>/dev/null || true
  fi
done

echo
echo "target             status   time        executions        coverage"
printf '%s\n' "${summary[@]}"
exit $failed
