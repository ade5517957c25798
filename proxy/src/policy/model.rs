//! The `PolicySet` file format (POLICY.md §1–§4) as strict serde types: unknown fields are
//! rejected, values are parsed into their pattern grammar while deserializing (so errors carry
//! the YAML path, line and column), and reserved v1alpha1 names are refused explicitly.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::cidr::Cidr;
use super::pattern::{
    HostPattern, MethodPattern, NamePattern, PathPattern, PortRange, SpiffePattern, StrPattern,
    TdPattern,
};

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "svidcar.io/v1alpha1";

/// One YAML document of a policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyDoc {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be `PolicySet`.
    pub kind: String,
    /// Default decisions.
    #[serde(default)]
    pub defaults: Defaults,
    /// Engine settings.
    #[serde(default)]
    pub settings: Settings,
    /// Policies in document order.
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Per-caller limits in document order (docs/policy-limits.md).
    #[serde(default)]
    pub limits: Vec<super::limits::Limit>,
}

/// `defaults`: the decision when no rule decides (omitted = Istio implicit rule).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Inbound default.
    pub inbound: Option<DefaultAction>,
    /// Egress default.
    pub egress: Option<DefaultAction>,
}

/// An explicit default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
}

/// `settings`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Settings {
    /// Path normalization mode (default `merge-slashes`).
    pub path_normalization: Option<PathNormalization>,
    /// `%2F %5C` left in a path by `base`/`merge-slashes` (default `reject`).
    pub escaped_slashes: Option<EscapedSlashes>,
    /// What happens to open non-HTTP connections on a policy change (default `reevaluate`).
    pub on_policy_change: Option<OnPolicyChange>,
    /// Reserved, not supported in v1alpha1.
    #[serde(default, deserialize_with = "reserved")]
    pub verify_resolved_ip: Option<()>,
}

/// `settings.pathNormalization` (each mode does everything the one before it does).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathNormalization {
    /// As received (query and fragment still removed).
    None,
    /// Decode escaped unreserved characters (refuse malformed escapes and control characters),
    /// `\` → `/`, then RFC 3986 dot-segment removal.
    Base,
    /// Also `//` → `/`.
    #[default]
    MergeSlashes,
    /// First decode `%2F %2f %5C %5c`, then everything above.
    DecodeAndMergeSlashes,
}

/// `settings.escapedSlashes`: what `base` and `merge-slashes` do with a path that still holds
/// `%2F %2f %5C %5c` (`decode-and-merge-slashes` decodes them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    /// Refuse the request (`400`, `normalize:escaped-slash`; Envoy's `REJECT_REQUEST`).
    #[default]
    Reject,
    /// Leave the escape as is and match it literally (Istio's default).
    Keep,
}

/// `settings.onPolicyChange`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPolicyChange {
    /// Re-evaluate open non-HTTP connections once and reset the ones now denied.
    #[default]
    Reevaluate,
    /// Keep open connections (Envoy/Consul L4 behavior).
    Keep,
}

/// Traffic direction of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic arriving at this workload.
    Inbound,
    /// Traffic leaving this workload.
    Egress,
}

/// A policy action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Allow matching traffic.
    Allow,
    /// Deny matching traffic.
    Deny,
    /// Log/metric matching traffic only.
    Audit,
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            "audit" => Ok(Self::Audit),
            "custom" => Err(de::Error::custom(
                "action `custom` is not supported in v1alpha1 (reserved)",
            )),
            other => Err(de::Error::custom(format!(
                "unknown action {other:?}, expected allow, deny or audit"
            ))),
        }
    }
}

/// One policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    /// Unique name across the set.
    pub name: String,
    /// Direction.
    pub direction: Direction,
    /// Action.
    pub action: Action,
    /// Dry run (allow/deny only).
    pub dry_run: Option<bool>,
    /// Which local workloads this policy applies to.
    pub selector: Option<Selector>,
    /// Rules; absent or empty = matches nothing.
    pub rules: Option<Vec<Rule>>,
}

/// `selector`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Patterns matched against this proxy's own SPIFFE ID.
    pub spiffe_ids: Option<Vec<SpiffePattern>>,
}

/// One rule: every present section must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Any entry must match.
    pub from: Option<Vec<From>>,
    /// Any entry must match.
    pub to: Option<Vec<To>>,
    /// All conditions must match.
    pub when: Option<Vec<Condition>>,
}

/// An inbound `from` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct From {
    pub spiffe_ids: Option<Vec<SpiffePattern>>,
    pub not_spiffe_ids: Option<Vec<SpiffePattern>>,
    pub trust_domains: Option<Vec<TdPattern>>,
    pub not_trust_domains: Option<Vec<TdPattern>>,
    pub namespaces: Option<Vec<Namespace>>,
    pub not_namespaces: Option<Vec<Namespace>>,
    pub service_accounts: Option<Vec<ServiceAccount>>,
    pub not_service_accounts: Option<Vec<ServiceAccount>>,
    pub ip_blocks: Option<Vec<Cidr>>,
    pub not_ip_blocks: Option<Vec<Cidr>>,
    pub authenticated: Option<bool>,
    #[serde(default, deserialize_with = "reserved")]
    pub request_principals: Option<()>,
    #[serde(default, deserialize_with = "reserved")]
    pub not_request_principals: Option<()>,
}

/// A `to` entry (inbound and egress fields; the loader checks which belong to the direction).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct To {
    pub ports: Option<Vec<PortRange>>,
    pub not_ports: Option<Vec<PortRange>>,
    pub methods: Option<Vec<MethodPattern>>,
    pub not_methods: Option<Vec<MethodPattern>>,
    pub paths: Option<Vec<PathPattern>>,
    pub not_paths: Option<Vec<PathPattern>>,
    pub hosts: Option<Vec<HostPattern>>,
    pub not_hosts: Option<Vec<HostPattern>>,
    pub cidrs: Option<Vec<Cidr>>,
    pub not_cidrs: Option<Vec<Cidr>>,
    pub spiffe_ids: Option<Vec<SpiffePattern>>,
    pub not_spiffe_ids: Option<Vec<SpiffePattern>>,
}

/// A namespace pattern (newtype so serde can pick the grammar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(pub NamePattern);
/// A `ns/sa` service-account pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount(pub NamePattern);

/// A `when` key (Istio names).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum WhenKey {
    SourcePrincipal,
    SourceTrustDomain,
    SourceNamespace,
    SourceServiceAccount,
    SourceIp,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    RequestHost,
    /// `request.headers[<name>]`, name lowercased.
    RequestHeader(String),
}

impl WhenKey {
    /// Parses a key.
    pub fn parse(raw: &str) -> Result<Self, String> {
        Ok(match raw {
            "source.principal" => Self::SourcePrincipal,
            "source.trustDomain" => Self::SourceTrustDomain,
            "source.namespace" => Self::SourceNamespace,
            "source.serviceAccount" => Self::SourceServiceAccount,
            "source.ip" => Self::SourceIp,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            "connection.sni" => Self::ConnectionSni,
            "request.host" => Self::RequestHost,
            k => match k
                .strip_prefix("request.headers[")
                .and_then(|r| r.strip_suffix(']'))
            {
                Some(name)
                    if !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) =>
                {
                    Self::RequestHeader(name.to_ascii_lowercase())
                }
                _ => return Err(format!("unknown `when` key {k:?}")),
            },
        })
    }

    /// HTTP-only keys (`request.*`).
    pub fn http_only(&self) -> bool {
        matches!(self, Self::RequestHost | Self::RequestHeader(_))
    }
}

/// Typed values of a `when` condition (the grammar depends on the key).
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub enum WhenValues {
    Principal(Vec<SpiffePattern>),
    TrustDomain(Vec<TdPattern>),
    Name(Vec<NamePattern>),
    Ip(Vec<Cidr>),
    Port(Vec<PortRange>),
    Host(Vec<HostPattern>),
    Header(Vec<StrPattern>),
}

fn parse_values(key: &WhenKey, raw: &[String]) -> Result<WhenValues, String> {
    fn all<T>(raw: &[String], f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
        raw.iter().map(|s| f(s)).collect()
    }
    Ok(match key {
        WhenKey::SourcePrincipal => WhenValues::Principal(all(raw, SpiffePattern::parse)?),
        WhenKey::SourceTrustDomain => WhenValues::TrustDomain(all(raw, TdPattern::parse)?),
        WhenKey::SourceNamespace => WhenValues::Name(all(raw, |s| NamePattern::parse(s, false))?),
        WhenKey::SourceServiceAccount => {
            WhenValues::Name(all(raw, |s| NamePattern::parse(s, true))?)
        }
        WhenKey::SourceIp | WhenKey::DestinationIp => WhenValues::Ip(all(raw, Cidr::parse)?),
        WhenKey::DestinationPort => WhenValues::Port(all(raw, PortRange::parse)?),
        WhenKey::ConnectionSni | WhenKey::RequestHost => {
            WhenValues::Host(all(raw, HostPattern::parse)?)
        }
        WhenKey::RequestHeader(_) => WhenValues::Header(all(raw, StrPattern::parse_header_value)?),
    })
}

/// A `when` condition: `values` (any) and/or `notValues` (none).
#[derive(Debug, Clone)]
pub struct Condition {
    /// The attribute.
    pub key: WhenKey,
    /// Positive values.
    pub values: Option<WhenValues>,
    /// Negative values.
    pub not_values: Option<WhenValues>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    key: String,
    values: Option<Vec<Scalar>>,
    not_values: Option<Vec<Scalar>>,
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawCondition::deserialize(d)?;
        let key = WhenKey::parse(&raw.key).map_err(de::Error::custom)?;
        if raw.values.is_none() && raw.not_values.is_none() {
            return Err(de::Error::custom(format!(
                "`when` key {:?} needs `values` or `notValues`",
                raw.key
            )));
        }
        let conv = |v: Option<Vec<Scalar>>| -> Result<Option<WhenValues>, D::Error> {
            v.map(|v| {
                let strings: Vec<String> = v.into_iter().map(|s| s.0).collect();
                parse_values(&key, &strings)
                    .map_err(|e| de::Error::custom(format!("when {:?}: {e}", raw.key)))
            })
            .transpose()
        };
        let values = conv(raw.values)?;
        let not_values = conv(raw.not_values)?;
        Ok(Self {
            key,
            values,
            not_values,
        })
    }
}

/// A YAML scalar (string or number) as text.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Deserializer for reserved names: always an error.
fn reserved<'de, D: Deserializer<'de>>(_d: D) -> Result<Option<()>, D::Error> {
    Err(de::Error::custom(
        "this field is not supported in v1alpha1 (reserved)",
    ))
}

macro_rules! from_str_de {
    ($ty:ty, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = Scalar::deserialize(d)?;
                ($parse)(s.0.as_str()).map_err(de::Error::custom)
            }
        }
    };
}

from_str_de!(TdPattern, TdPattern::parse);
from_str_de!(Namespace, |s| NamePattern::parse(s, false).map(Namespace));
from_str_de!(ServiceAccount, |s| NamePattern::parse(s, true)
    .map(ServiceAccount));
from_str_de!(PortRange, PortRange::parse);
from_str_de!(Cidr, Cidr::parse);
from_str_de!(MethodPattern, MethodPattern::parse);
from_str_de!(PathPattern, PathPattern::parse);
from_str_de!(HostPattern, HostPattern::parse);

impl<'de> Deserialize<'de> for SpiffePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SpiffePattern;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a SPIFFE ID pattern string or {prefix: \"spiffe://td/path\"}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpiffePattern, E> {
                SpiffePattern::parse(v).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpiffePattern, A::Error> {
                let key: String = map
                    .next_key()?
                    .ok_or_else(|| de::Error::custom("empty map; expected {prefix: ...}"))?;
                let value: String = map.next_value()?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("expected exactly one key, `prefix`"));
                }
                match key.as_str() {
                    "prefix" => SpiffePattern::parse_prefix(&value).map_err(de::Error::custom),
                    "rawPrefix" => Err(de::Error::custom(
                        "`rawPrefix` is not supported in v1alpha1 (reserved); use {prefix: ...}",
                    )),
                    k => Err(de::Error::custom(format!(
                        "unknown key {k:?}, expected `prefix`"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}
