//! Access-log records ([`crate::access_log`]) and the engine: which request headers the policy
//! names (the only ones recorded), and a recorded connection or request turned back into a
//! [`Request`] for [`CompiledPolicy::decide`] — the same engine the proxy runs.

use std::collections::BTreeMap;

use svidcar_agent::SpiffeId;

use super::model::WhenKey;
use super::{CompiledPolicy, Decision, Direction, Explanation, HeaderSource, Protocol, Request};
use crate::access_log::AccessRecord;

impl CompiledPolicy {
    /// Header names (lowercase, sorted, once each) used by `request.headers[<name>]` conditions
    /// of the rules that apply to this proxy.
    pub fn header_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .rules
            .iter()
            .flat_map(|r| r.when.iter().flatten())
            .filter_map(|c| match &c.key {
                WhenKey::RequestHeader(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The headers of a request that the access log records: exactly the names of
    /// [`Self::header_names`] that are present (repeated headers joined with `,`).
    pub fn recorded_headers(&self, headers: &dyn HeaderSource) -> BTreeMap<String, String> {
        self.header_names()
            .into_iter()
            .filter_map(|n| headers.header(n).map(|v| (n.to_string(), v.into_owned())))
            .collect()
    }
}

/// Why a record is not evaluated again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// Refused before a policy decision (handshake failed, no identity…), or the connection
    /// record of an `http` port (its requests are decided one by one).
    NoDecision,
    /// Refused before any rule: a path or authority refused `400`, an unreadable ClientHello.
    RefusedBeforePolicy,
    /// No local SPIFFE ID in the record, or one that does not parse.
    NoLocalId,
    /// A peer or destination SPIFFE ID that does not parse.
    BadId,
}

impl Skip {
    /// A short phrase for reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoDecision => "not decided (an http port's connection record, or refused first)",
            Self::RefusedBeforePolicy => "refused before policy (400, unreadable ClientHello)",
            Self::NoLocalId => "no local identity",
            Self::BadId => "unparsable SPIFFE ID",
        }
    }
}

/// A recorded decision with its attributes parsed, ready to be decided again.
pub struct Recorded<'a> {
    /// The record.
    pub record: &'a AccessRecord,
    /// This proxy's SPIFFE ID (selectors are matched against it).
    pub local: SpiffeId,
    peer: Option<SpiffeId>,
    dst_id: Option<SpiffeId>,
    headers: Vec<(String, String)>,
}

/// Whether `rule` names a refusal made before any policy rule was evaluated.
fn refused_before_policy(rule: &str) -> bool {
    rule.starts_with("normalize:")
        || rule.starts_with("authority:")
        || rule == crate::egress_stream::UNREADABLE_RULE
}

impl<'a> Recorded<'a> {
    /// Parses the record's attributes; `Err` says why it cannot be evaluated again.
    pub fn parse(record: &'a AccessRecord) -> Result<Self, Skip> {
        if record.decision.is_none() {
            return Err(Skip::NoDecision);
        }
        if record.rule.as_deref().is_some_and(refused_before_policy) {
            return Err(Skip::RefusedBeforePolicy);
        }
        let local = record
            .local_id
            .as_deref()
            .and_then(|s| SpiffeId::parse_lenient(s).ok())
            .ok_or(Skip::NoLocalId)?;
        let id = |s: &Option<String>| -> Result<Option<SpiffeId>, Skip> {
            s.as_deref()
                .map(|s| SpiffeId::parse_lenient(s).map_err(|_| Skip::BadId))
                .transpose()
        };
        let peer = match record.direction {
            Direction::Inbound => id(&record.peer_id)?,
            Direction::Egress => None,
        };
        Ok(Self {
            record,
            local,
            peer,
            dst_id: id(&record.dst_spiffe_id)?,
            headers: record
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        })
    }

    /// The peer (inbound) SPIFFE ID.
    pub fn peer(&self) -> Option<&SpiffeId> {
        self.peer.as_ref()
    }

    /// The protocol (a decided record without one is taken as TCP).
    pub fn protocol(&self) -> Protocol {
        self.record.protocol.unwrap_or(Protocol::Tcp)
    }

    fn with_request<T>(&self, path: Option<&str>, f: impl FnOnce(&Request<'_>) -> T) -> T {
        let r = self.record;
        let mut req = Request::new(r.direction, self.protocol());
        req.peer = self.peer.as_ref();
        req.source_ip = r.src_ip;
        req.destination_ip = r.dst_ip;
        req.destination_port = r.dst_port;
        req.destination_spiffe_id = self.dst_id.as_ref();
        req.sni = r.sni.as_deref();
        req.connect_authority = r.connect.as_deref();
        req.host = r.host.as_deref();
        req.method = r.method.as_deref();
        req.path = path;
        req.headers = &self.headers;
        f(&req)
    }

    /// Decides the recorded connection or request with `policy`, normalizing the recorded path
    /// with the policy's settings first (a path it refuses is `DENY by normalize:<reason>`).
    pub fn decide(&self, policy: &CompiledPolicy) -> Decision {
        let path = match self.record.path.as_deref() {
            Some(p) if self.protocol().is_http() => match policy.settings().normalize_path(p) {
                Ok(n) => Some(n),
                Err(e) => return Explanation::refused(&e).decision,
            },
            _ => None,
        };
        self.with_request(path.as_deref(), |req| policy.decide(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::{Kind, Logged};
    use crate::policy::PolicySet;

    const SET: &str = r#"
apiVersion: svidcar.io/v1alpha1
kind: PolicySet
defaults: {inbound: deny}
policies:
- name: tenants
  direction: inbound
  action: allow
  rules:
  - from: [{spiffeIds: ["spiffe://td/web"]}]
    when: [{key: "request.headers[X-Tenant]", values: ["acme"]}]
"#;

    #[test]
    fn only_named_headers_are_recorded_and_replayed() {
        let set = PolicySet::from_yaml("p.yaml", SET).unwrap();
        let policy = set.compile(&SpiffeId::parse("spiffe://td/api").unwrap());
        assert_eq!(policy.header_names(), ["x-tenant"]);
        let sent = vec![
            ("X-Tenant".to_string(), "acme".to_string()),
            ("authorization".to_string(), "Bearer secret".to_string()),
            ("cookie".to_string(), "s=1".to_string()),
        ];
        let kept = policy.recorded_headers(&sent);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept["x-tenant"], "acme");

        let mut rec = AccessRecord::new(Kind::Request, Direction::Inbound);
        rec.protocol = Some(Protocol::Http);
        rec.local_id = Some("spiffe://td/api".into());
        rec.peer_id = Some("spiffe://td/web".into());
        rec.dst_port = Some(8080);
        rec.method = Some("GET".into());
        rec.path = Some("/a//b".into());
        rec.headers = kept;
        rec.decision = Some(Logged::Allow);
        let d = Recorded::parse(&rec).unwrap().decide(&policy);
        assert!(d.allow, "{d:?}");
        rec.headers.clear();
        assert!(!Recorded::parse(&rec).unwrap().decide(&policy).allow);
        rec.rule = Some("normalize:bad-escape".into());
        assert_eq!(Recorded::parse(&rec).err(), Some(Skip::RefusedBeforePolicy));
        rec.decision = None;
        assert_eq!(Recorded::parse(&rec).err(), Some(Skip::NoDecision));
    }
}
