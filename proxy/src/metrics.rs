//! Prometheus metrics of the proxy (rendered by the admin listener at `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a finished connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `inbound` | `outbound` | `egress`.
    pub direction: &'static str,
    /// `allowed`, `denied`, `handshake_failed`, `upstream_failed`, `no_identity`, `overloaded`...
    pub outcome: &'static str,
}

/// Labels of byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    /// `inbound` | `outbound` | `egress`.
    pub direction: &'static str,
    /// `rx` (from the connecting side) | `tx` (to the connecting side).
    pub flow: &'static str,
}

/// Labels of handshake failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailLabels {
    /// `inbound` | `outbound`.
    pub direction: &'static str,
    /// Short stable reason (`no_client_certificate`, `unknown_trust_domain`, `plaintext_on_strict_port`...).
    pub reason: &'static str,
}

/// Labels of authorization decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `inbound` | `egress`.
    pub direction: &'static str,
    /// `allow` | `deny`.
    pub decision: &'static str,
    /// The rule or default that decided.
    pub rule: String,
}

/// Labels of `svidcar_authz_policy_change_resets_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// `inbound` | `egress` (the policy direction; mesh outbound counts as `egress`).
    pub direction: &'static str,
}

/// Labels of `svidcar_proxy_http_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `inbound`.
    pub direction: &'static str,
    /// `normalize:escaped-slash`, `normalize:bad-escape`, `normalize:not-absolute`,
    /// `authority:host-mismatch`, `authority:duplicate-host`, `authority:missing`,
    /// `authority:userinfo`, `authority:invalid`.
    pub reason: &'static str,
}

/// Labels of `svidcar_proxy_pool_lookups_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `hit` (a pooled connection had room) | `new` (a new connection) | `no_mux` (the peer does
    /// not multiplex: one connection of its own).
    pub result: &'static str,
}

/// Labels of `svidcar_proxy_tls_handshakes_total` (see [`crate::tls_session::TlsFacts`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    /// `inbound` | `outbound`.
    pub direction: &'static str,
    /// `TLSv1_3`.
    pub protocol: &'static str,
    /// Cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: &'static str,
    /// Key-exchange group, e.g. `X25519MLKEM768` or `X25519`.
    pub group: &'static str,
}

/// All proxy metrics, cheap to clone (every metric is an `Arc` inside).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Finished connections by direction and outcome.
    pub connections: Family<ConnLabels, Counter>,
    /// Open connections.
    pub open_connections: Gauge,
    /// Connections refused because the connection limit was reached.
    pub overloaded: Counter,
    /// Bytes proxied.
    pub bytes: Family<ByteLabels, Counter>,
    /// TLS handshake failures by reason.
    pub handshake_failures: Family<FailLabels, Counter>,
    /// Authorization decisions.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Seconds until the current SVID expires (negative once expired; 0 before the first SVID).
    pub svid_expiry_seconds: Gauge,
    /// SVIDs installed (initial + rotations).
    pub svid_rotations: Counter,
    /// Open connections reset because a new policy denies them (POLICY.md §6).
    pub policy_change_resets: Family<DirLabels, Counter>,
    /// Pooled outbound mTLS connections open now.
    pub pool_connections_open: Gauge,
    /// Outbound stream requests by how the pool served them.
    pub pool_lookups: Family<ResultLabels, Counter>,
    /// Multiplexed mTLS connections (`outbound`: opened by the pool, `inbound`: accepted).
    pub mux_connections: Family<DirLabels, Counter>,
    /// Streams (application connections) opened on multiplexed connections.
    pub mux_streams: Family<DirLabels, Counter>,
    /// HTTP requests answered `400` before authorization (path or authority refused).
    pub http_refused: Family<RefusedLabels, Counter>,
    /// Completed TLS handshakes by negotiated protocol, cipher and key-exchange group.
    pub tls_handshakes: Family<TlsLabels, Counter>,
}

impl Metrics {
    /// Registers everything under the `svidcar_proxy` prefix, except the metrics POLICY.md
    /// names (`svidcar_authz_…`), which keep their exact names. The root has no prefix.
    pub fn register(&self) -> Registry {
        let mut root = Registry::default();
        root.register(
            "svidcar_authz_policy_change_resets",
            "Open connections reset because a new policy denies them",
            self.policy_change_resets.clone(),
        );
        let r = root.sub_registry_with_prefix("svidcar_proxy");
        r.register(
            "connections",
            "Finished connections by direction and outcome",
            self.connections.clone(),
        );
        r.register(
            "open_connections",
            "Currently open connections",
            self.open_connections.clone(),
        );
        r.register(
            "overloaded",
            "Connections refused at the connection limit",
            self.overloaded.clone(),
        );
        r.register(
            "bytes",
            "Bytes proxied by direction and flow",
            self.bytes.clone(),
        );
        r.register(
            "handshake_failures",
            "Failed TLS handshakes and refused plaintext by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "decisions",
            "Authorization decisions by rule",
            self.decisions.clone(),
        );
        r.register(
            "svid_expiry_seconds",
            "Seconds until the current X.509-SVID expires",
            self.svid_expiry_seconds.clone(),
        );
        r.register(
            "svid_installs",
            "X.509-SVIDs installed (first + rotations)",
            self.svid_rotations.clone(),
        );
        r.register(
            "pool_connections_open",
            "Pooled outbound mTLS connections open now",
            self.pool_connections_open.clone(),
        );
        r.register(
            "pool_lookups",
            "Outbound streams by pool result (hit, new, no_mux)",
            self.pool_lookups.clone(),
        );
        r.register(
            "mux_connections",
            "Multiplexed mTLS connections opened (outbound) or accepted (inbound)",
            self.mux_connections.clone(),
        );
        r.register(
            "http_refused",
            "HTTP requests answered 400 before authorization, by reason",
            self.http_refused.clone(),
        );
        r.register(
            "mux_streams",
            "Streams (application connections) opened on multiplexed connections",
            self.mux_streams.clone(),
        );
        r.register(
            "tls_handshakes",
            "Completed TLS handshakes by direction, protocol version, cipher suite and key-exchange group",
            self.tls_handshakes.clone(),
        );
        root
    }

    /// Counts an HTTP request refused with `400` before authorization.
    pub fn http_refused(&self, direction: &'static str, reason: &'static str) {
        self.http_refused
            .get_or_create(&RefusedLabels { direction, reason })
            .inc();
    }

    /// Counts a completed handshake with what it negotiated.
    pub fn tls_handshake(&self, direction: &'static str, tls: &crate::tls_session::TlsFacts) {
        self.tls_handshakes
            .get_or_create(&TlsLabels {
                direction,
                protocol: tls.protocol,
                cipher: tls.cipher,
                group: tls.group,
            })
            .inc();
    }

    /// Counts a multiplexed connection.
    pub fn mux_connection(&self, direction: &'static str) {
        self.mux_connections
            .get_or_create(&DirLabels { direction })
            .inc();
    }

    /// Counts a stream on a multiplexed connection.
    pub fn mux_stream(&self, direction: &'static str) {
        self.mux_streams
            .get_or_create(&DirLabels { direction })
            .inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, direction: &'static str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&FailLabels { direction, reason })
            .inc();
    }

    /// Counts a finished connection.
    pub fn connection(&self, direction: &'static str, outcome: &'static str) {
        self.connections
            .get_or_create(&ConnLabels { direction, outcome })
            .inc();
    }

    /// Adds bytes.
    pub fn add_bytes(&self, direction: &'static str, rx: u64, tx: u64) {
        self.bytes
            .get_or_create(&ByteLabels {
                direction,
                flow: "rx",
            })
            .inc_by(rx);
        self.bytes
            .get_or_create(&ByteLabels {
                direction,
                flow: "tx",
            })
            .inc_by(tx);
    }

    /// Counts an authorization decision.
    pub fn decision(&self, direction: &'static str, allow: bool, rule: &str) {
        let decision = if allow { "allow" } else { "deny" };
        self.decisions
            .get_or_create(&DecisionLabels {
                direction,
                decision,
                rule: rule.to_string(),
            })
            .inc();
    }
}
