//! The JSON access log (`docs/access-log.md`): one [`AccessRecord`] per connection and per HTTP
//! request, written as one `svidcar.access/v1` JSON object per line to a file or stdout.
//!
//! A record carries every attribute the policy engine can decide on (direction, both SPIFFE IDs,
//! source IP, original destination IP and port, protocol; method, normalized path, host and the
//! request headers that the policy's `when` conditions name; egress names), the decision and the
//! deciding rule, bytes and duration. `svidcar policy suggest` and `svidcar policy replay` read
//! the same struct back ([`parse_line`]), so a field written is a field read.
//!
//! Headers: only those named by a `request.headers[<name>]` condition of the policy in force are
//! recorded (see [`crate::Authorizer::recorded_headers`]); `Authorization`, `Cookie` and every
//! other header stay out unless a rule names them. The query string is never recorded.
//!
//! The sink is process-wide (one sidecar per process): [`install`] once at start-up; until then,
//! and when no access log is configured, [`enabled`] is false and nothing is built.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::authz::{ConnAttrs, EgressAttrs, Verdict};
use crate::policy::{normalize_name, Direction, Protocol};

/// The schema name and major version written in every record (`schema`).
pub const SCHEMA: &str = "svidcar.access/v1";

/// `access_log:` in the proxy YAML (or `--access-log FILE`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Record format (only `json`).
    pub format: AccessLogFormat,
    /// File to append to; absent or `-` = stdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// Access log formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One `svidcar.access/v1` JSON object per line.
    #[default]
    Json,
}

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A connection (or a multiplexed stream), written when it ends or is refused.
    Connection,
    /// One HTTP request on an inbound `http` port or a plaintext egress connection.
    Request,
}

/// A policy decision as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Logged {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

impl Logged {
    /// From an allow flag.
    pub fn from_allow(allow: bool) -> Self {
        if allow {
            Self::Allow
        } else {
            Self::Deny
        }
    }
    /// `ALLOW` / `DENY`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        }
    }
}

/// One access-log record (schema `svidcar.access/v1`; the field table is in
/// `docs/access-log.md`). Readers must ignore fields they do not know: v1 may gain optional
/// fields, never change or remove one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// When the record was written (RFC 3339, UTC, milliseconds).
    #[serde(default)]
    pub time: String,
    /// `connection` or `request`.
    pub kind: Kind,
    /// Policy direction: `inbound` or `egress` (mesh outbound connections are `egress`).
    pub direction: Direction,
    /// Egress to a mesh destination (mTLS originated by this proxy).
    #[serde(default)]
    pub mesh: bool,
    /// As the policy saw it: `http`, `grpc`, `tcp`, `tls`, `connect`; null before detection.
    pub protocol: Option<Protocol>,
    /// This proxy's own SPIFFE ID.
    pub local_id: Option<String>,
    /// Inbound: the client's verified SPIFFE ID (null = plaintext); egress mesh: the server's.
    pub peer_id: Option<String>,
    /// Connecting side's IP (inbound: the peer; egress: the application).
    pub src_ip: Option<IpAddr>,
    /// Connecting side's port.
    pub src_port: Option<u16>,
    /// Original destination IP (CONNECT: the address dialed).
    pub dst_ip: Option<IpAddr>,
    /// Original destination port as evaluated (inbound: the application port).
    pub dst_port: Option<u16>,
    /// Egress mesh: the destination's expected SPIFFE ID (null when only a trust domain is).
    pub dst_spiffe_id: Option<String>,
    /// Egress TLS ClientHello SNI (normalized).
    pub sni: Option<String>,
    /// Egress explicit-proxy CONNECT host (normalized, port removed).
    pub connect: Option<String>,
    /// HTTP host as evaluated (normalized: lowercase, port and trailing dot removed).
    pub host: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// HTTP path as evaluated (normalized; never the query). For a request refused by path
    /// normalization (`rule` `normalize:…`): the path as received.
    pub path: Option<String>,
    /// Request headers named by the policy's `when` conditions (lowercase names, repeated
    /// headers joined with `,`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Policy decision; null when refused before a decision (handshake failed, no identity…)
    /// and for the connection record of an `http` port (decided per request).
    pub decision: Option<Logged>,
    /// Deciding rule (`<policy>/rules[<i>]`) or default (`default:…`), or a refusal before any
    /// rule (`normalize:…`, `egress:unreadable-client-hello`, `policy:not-loaded`).
    pub rule: Option<String>,
    /// Outcome label (`allowed`, `denied`, `refused`, `handshake_failed`, `upstream_failed`…).
    #[serde(default)]
    pub outcome: String,
    /// Free text for the operator (why refused; for a policy reset, the rule that reset it).
    pub reason: Option<String>,
    /// HTTP status sent to the client.
    pub status: Option<u16>,
    /// Bytes from the connecting side (requests: the declared `Content-Length`).
    pub bytes_in: Option<u64>,
    /// Bytes to the connecting side (requests: the response's declared `Content-Length`).
    pub bytes_out: Option<u64>,
    /// How a connection ended: `closed`, `idle_timeout`, `error`, `policy_reset`.
    pub end: Option<String>,
    /// From accept (request: from its head) to the record, in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(skip)]
    started: Option<Instant>,
}

impl AccessRecord {
    /// An empty record of `kind` and policy `direction`, timed from now.
    pub fn new(kind: Kind, direction: Direction) -> Self {
        Self {
            schema: SCHEMA.to_string(),
            time: String::new(),
            kind,
            direction,
            mesh: false,
            protocol: None,
            local_id: None,
            peer_id: None,
            src_ip: None,
            src_port: None,
            dst_ip: None,
            dst_port: None,
            dst_spiffe_id: None,
            sni: None,
            connect: None,
            host: None,
            method: None,
            path: None,
            headers: BTreeMap::new(),
            decision: None,
            rule: None,
            outcome: String::new(),
            reason: None,
            status: None,
            bytes_in: None,
            bytes_out: None,
            end: None,
            duration_ms: 0,
            started: Some(Instant::now()),
        }
    }

    /// Fills what an inbound connection decision saw.
    pub fn saw_inbound(&mut self, c: &ConnAttrs<'_>, protocol: Protocol) {
        self.protocol = Some(protocol);
        self.local_id = Some(c.own.as_str().to_string());
        self.peer_id = c.peer.map(|p| p.as_str().to_string());
        self.src_ip = Some(c.src.ip());
        self.src_port = Some(c.src.port());
        self.dst_ip = Some(c.dst.ip());
        self.dst_port = Some(c.app_port);
    }

    /// Fills what an egress decision saw (names normalized as the engine sees them).
    pub fn saw_egress(&mut self, e: &EgressAttrs<'_>) {
        self.protocol = Some(egress_protocol(e));
        self.mesh = e.mesh;
        self.local_id = Some(e.own.as_str().to_string());
        self.src_ip = Some(e.src.ip());
        self.src_port = Some(e.src.port());
        self.dst_ip = e.dst_ip;
        self.dst_port = Some(e.dst_port);
        self.dst_spiffe_id = e.destination_id.map(|i| i.as_str().to_string());
        let name = |n: Option<&str>| n.map(|n| normalize_name(n).into_owned());
        self.sni = name(e.sni);
        self.connect = name(e.connect);
        if let Some(h) = e.http {
            self.host = name(h.host);
            self.method = Some(h.method.to_string());
            self.path = Some(h.path.to_string());
        }
    }

    /// Records the decision.
    pub fn decided(&mut self, v: &Verdict) {
        self.decision = Some(Logged::from_allow(v.allow));
        self.rule = Some(v.rule.clone());
    }

    /// Sets the outcome, stamps time and duration, and writes the record (if enabled).
    pub fn emit(mut self, outcome: &str) {
        self.outcome = outcome.to_string();
        write(&mut self);
    }
}

/// The protocol an egress decision is made as (as `PolicyAuthorizer` decides it).
pub fn egress_protocol(e: &EgressAttrs<'_>) -> Protocol {
    if e.http.is_some() {
        Protocol::Http
    } else if e.sni.is_some() {
        Protocol::Tls
    } else if e.connect.is_some() {
        Protocol::Connect
    } else {
        Protocol::Tcp
    }
}

/// A declared `Content-Length`.
pub fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The record of one inbound HTTP request, as decided (headers: only those the policy names).
pub fn inbound_request(
    conn: &ConnAttrs<'_>,
    http: &crate::http::HttpAttrs<'_>,
    authz: &dyn crate::Authorizer,
    verdict: &Verdict,
) -> AccessRecord {
    let protocol = if http.grpc {
        Protocol::Grpc
    } else {
        Protocol::Http
    };
    let mut r = AccessRecord::new(Kind::Request, Direction::Inbound);
    r.saw_inbound(conn, protocol);
    r.host = http.host.map(|h| normalize_name(h).into_owned());
    r.method = Some(http.method.to_string());
    r.path = Some(http.path.to_string());
    r.headers = authz.recorded_headers(http.headers);
    r.bytes_in = content_length(http.headers);
    r.decided(verdict);
    r
}

/// Writes an inbound request refused `400` before authorization (`reason` = the rule).
pub fn refused_request(facts: &crate::http::ConnFacts, reason: &str, raw: &str) {
    if !enabled() {
        return;
    }
    let mut r = AccessRecord::new(Kind::Request, Direction::Inbound);
    r.protocol = Some(Protocol::Http);
    r.local_id = Some(facts.own.as_str().to_string());
    r.peer_id = facts.peer.as_ref().map(|p| p.as_str().to_string());
    r.src_ip = Some(facts.src.ip());
    r.src_port = Some(facts.src.port());
    r.dst_ip = Some(facts.dst.ip());
    r.dst_port = Some(facts.app_port);
    // Never the query: it may carry credentials.
    r.path = Some(raw.split(['?', '#']).next().unwrap_or("").to_string());
    r.decided(&Verdict::deny(reason));
    r.status = Some(400);
    r.emit("refused");
}

/// Writes a request record with its outcome, status and response length.
pub fn finish_request(
    record: Option<AccessRecord>,
    outcome: &str,
    status: u16,
    bytes_out: Option<u64>,
) {
    if let Some(mut r) = record {
        r.status = Some(status);
        r.bytes_out = bytes_out;
        r.emit(outcome);
    }
}

/// The record of one plaintext egress HTTP request, as decided.
pub fn egress_request(attrs: &EgressAttrs<'_>, verdict: &Verdict) -> AccessRecord {
    let mut r = AccessRecord::new(Kind::Request, Direction::Egress);
    r.saw_egress(attrs);
    r.decided(verdict);
    r
}

enum Out {
    Stdout,
    File(std::fs::File),
}

static SINK: OnceLock<Mutex<Out>> = OnceLock::new();
static WRITE_FAILED: AtomicBool = AtomicBool::new(false);

/// Opens the configured sink (a file is created if needed and appended to, so `logrotate
/// copytruncate` works). Call once at start-up; a second call is an error.
pub fn install(cfg: &AccessLogConfig) -> std::io::Result<()> {
    let out = match &cfg.path {
        None => Out::Stdout,
        Some(p) if p.as_os_str() == "-" => Out::Stdout,
        Some(p) => Out::File(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("access log {}: {e}", p.display()))
                })?,
        ),
    };
    SINK.set(Mutex::new(out)).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the access log is already installed",
        )
    })
}

/// Whether a JSON access log is configured (records are built only then).
pub fn enabled() -> bool {
    SINK.get().is_some()
}

/// Stamps `time` and `duration_ms` and writes one line (one `write` call per record).
pub fn write(rec: &mut AccessRecord) {
    let Some(sink) = SINK.get() else { return };
    rec.time = rfc3339(SystemTime::now());
    if let Some(start) = rec.started {
        rec.duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    }
    let Ok(mut line) = serde_json::to_vec(&*rec) else {
        return;
    };
    line.push(b'\n');
    let r = match &mut *sink.lock().unwrap_or_else(|p| p.into_inner()) {
        Out::Stdout => std::io::stdout().lock().write_all(&line),
        Out::File(f) => f.write_all(&line),
    };
    if let Err(e) = r {
        if !WRITE_FAILED.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "cannot write the access log (reported once)");
        }
    }
}

/// Parses one log line: `Ok(None)` for a line that is not a `svidcar.access/v1` record (other
/// log output on the same stream), `Err` for a v1 record that does not parse.
pub fn parse_line(line: &str) -> Result<Option<AccessRecord>, String> {
    let line = line.trim();
    if !line.starts_with('{') {
        return Ok(None);
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return Ok(None);
    };
    let v1 = v
        .get("schema")
        .and_then(|s| s.as_str())
        .is_some_and(|s| s == SCHEMA || s.starts_with("svidcar.access/v1."));
    if !v1 {
        return Ok(None);
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// RFC 3339 UTC with milliseconds (`2025-01-31T12:00:00.123Z`).
pub fn rfc3339(t: SystemTime) -> String {
    svidcar_agent::client::format_utc_millis(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_yaml_section() {
        let c = crate::ProxyConfig::from_yaml("access_log: {format: json, path: /tmp/a.jsonl}\n")
            .unwrap();
        let log = c.access_log.clone().unwrap();
        assert_eq!(
            log.path.as_deref(),
            Some(std::path::Path::new("/tmp/a.jsonl"))
        );
        let text = serde_yaml_ng::to_string(&c).unwrap();
        assert_eq!(crate::ProxyConfig::from_yaml(&text).unwrap(), c, "{text}");
        assert_eq!(
            crate::ProxyConfig::from_yaml("access_log: {}\n")
                .unwrap()
                .access_log
                .unwrap()
                .path,
            None
        );
        assert!(crate::ProxyConfig::from_yaml("access_log: {format: text}\n").is_err());
        assert!(crate::ProxyConfig::from_yaml("access_log: {file: x}\n").is_err());
        assert_eq!(crate::ProxyConfig::default().access_log, None);
    }

    #[test]
    fn rfc3339_dates() {
        let at = |s| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_738_324_800_123), "2025-01-31T12:00:00.123Z");
    }

    #[test]
    fn a_record_round_trips_and_foreign_lines_are_skipped() {
        let mut r = AccessRecord::new(Kind::Request, Direction::Inbound);
        r.protocol = Some(Protocol::Http);
        r.method = Some("GET".into());
        r.path = Some("/users/1".into());
        r.headers.insert("x-tenant".into(), "acme".into());
        r.decided(&Verdict::allow("p/rules[0]"));
        r.outcome = "allowed".into();
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"schema\":\"svidcar.access/v1\""), "{line}");
        assert!(
            line.contains("\"peer_id\":null"),
            "every key is written: {line}"
        );
        let back = parse_line(&line).unwrap().unwrap();
        assert_eq!((back.path, back.decision), (r.path, Some(Logged::Allow)));
        assert_eq!(parse_line("2025 INFO something").unwrap(), None);
        assert_eq!(parse_line("{\"level\":\"INFO\"}").unwrap(), None);
        // Unknown fields (a later v1) are ignored; a broken v1 record is an error.
        let later = line.replacen('{', "{\"tls_cipher\":\"x\",", 1);
        assert!(parse_line(&later).unwrap().is_some());
        assert!(parse_line("{\"schema\":\"svidcar.access/v1\",\"kind\":\"nope\"}").is_err());
    }
}
