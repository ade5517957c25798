//! SDS resource names and the Envoy `Secret`s behind them, as SPIRE maps them:
//!
//! | name | secret |
//! |---|---|
//! | `default` | the caller's first SVID (`TlsCertificate`: PEM chain + PEM PKCS#8 key) |
//! | `spiffe://td/path` (one of the caller's IDs) | that SVID |
//! | `ROOTCA` | our trust domain's bundle (`CertificateValidationContext.trusted_ca`, PEM) |
//! | `ALL` | every bundle the caller may see, as Envoy's SPIFFE validator config |
//! | `spiffe://td` | that trust domain's bundle (ours or a federated one) |
//! | no name at all | every SVID (by ID) and every visible bundle (by trust domain ID) |
//!
//! Entitlement: a SPIFFE ID the caller has no entry for, or a foreign trust domain outside its
//! entries' `federates_with`, is refused with `PERMISSION_DENIED` (SPIRE silently omits them;
//! we refuse so a misconfigured Envoy fails loudly instead of waiting forever). A trust domain
//! the caller may see but whose bundle is not known yet is omitted until it arrives.

use std::collections::BTreeSet;

use prost::Message;
use svidcar_proto::envoy::config::core::v3::{data_source, DataSource, TypedExtensionConfig};
use svidcar_proto::envoy::extensions::transport_sockets::tls::v3::{
    secret, spiffe_cert_validator_config, CertificateValidationContext, Secret,
    SpiffeCertValidatorConfig, TlsCertificate,
};
use tonic::Status;

use crate::agent::ca::IssuedSvid;
use crate::agent::entries::Entry;
use crate::agent::TrustState;
use crate::bundle::Bundle;
use crate::client::to_pem;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// `type_url` of SDS resources.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// `type_url` of Envoy's SPIFFE certificate validator config.
pub const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// Extension name of Envoy's SPIFFE certificate validator.
pub const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";
/// Resource name of the caller's default SVID.
pub const DEFAULT: &str = "default";
/// Resource name of our own trust domain's bundle.
pub const ROOTCA: &str = "ROOTCA";
/// Resource name of all bundles as a SPIFFE validator config.
pub const ALL: &str = "ALL";

/// One requested resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// The caller's first SVID, named `default`.
    Default,
    /// One of the caller's SVIDs, named by its ID.
    Svid(SpiffeId),
    /// Our bundle, named `ROOTCA`.
    RootCa,
    /// Every visible bundle as a SPIFFE validator config, named `ALL`.
    All,
    /// One trust domain's bundle, named `spiffe://td`.
    Bundle(TrustDomain),
}

/// What a caller may see: its entries and the foreign trust domains they federate with.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Matching entries, configuration order (the first is `default`).
    pub entries: Vec<Entry>,
    /// Foreign trust domains visible to the caller (`None`: all).
    pub allowed: Option<BTreeSet<TrustDomain>>,
}

impl Caller {
    /// Builds the caller's view from its matching entries (an entry with an empty
    /// `federates_with` sees every federated domain, as on the Workload API).
    pub fn new(entries: Vec<Entry>) -> Self {
        let allowed = if entries.iter().any(|e| e.federates_with.is_empty()) {
            None
        } else {
            Some(
                entries
                    .iter()
                    .flat_map(|e| e.federates_with.iter().cloned())
                    .collect(),
            )
        };
        Self { entries, allowed }
    }

    fn may_see(&self, own: &TrustDomain, td: &TrustDomain) -> bool {
        td == own || self.allowed.as_ref().is_none_or(|a| a.contains(td))
    }

    /// The federated bundles visible to the caller.
    pub fn visible<'a>(&'a self, st: &'a TrustState) -> impl Iterator<Item = &'a Bundle> + 'a {
        st.federated
            .iter()
            .filter(move |(td, _)| self.allowed.as_ref().is_none_or(|a| a.contains(*td)))
            .map(|(_, b)| b)
    }
}

/// Parses requested names; `Ok(None)` means "everything" (empty list).
#[allow(clippy::result_large_err)]
pub fn parse_names(
    names: &[String],
    caller: &Caller,
    own: &TrustDomain,
) -> Result<Option<Vec<Want>>, Status> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let want = match n.as_str() {
            DEFAULT => Want::Default,
            ROOTCA => Want::RootCa,
            ALL => Want::All,
            s if s.starts_with("spiffe://") => {
                let rest = &s["spiffe://".len()..];
                if rest.contains('/') {
                    let id = SpiffeId::parse(s).map_err(|e| {
                        Status::invalid_argument(format!("resource {s:?} is not a SPIFFE ID: {e}"))
                    })?;
                    if !caller.entries.iter().any(|e| e.id == id) {
                        return Err(Status::permission_denied(format!(
                            "the caller is not entitled to the SVID {id}"
                        )));
                    }
                    Want::Svid(id)
                } else {
                    let td = TrustDomain::parse(s).map_err(|e| {
                        Status::invalid_argument(format!("resource {s:?} is not a trust domain: {e}"))
                    })?;
                    if !caller.may_see(own, &td) {
                        return Err(Status::permission_denied(format!(
                            "the caller's entries do not federate with {td}"
                        )));
                    }
                    Want::Bundle(td)
                }
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown SDS resource {other:?} (expected default, ROOTCA, ALL, a SPIFFE ID or spiffe://<trust-domain>)"
                )))
            }
        };
        if !out.contains(&want) {
            out.push(want);
        }
    }
    Ok(Some(out))
}

/// True when serving `wants` needs the caller's SVIDs.
pub fn needs_svids(wants: &Option<Vec<Want>>) -> bool {
    match wants {
        None => true,
        Some(w) => w.iter().any(|x| matches!(x, Want::Default | Want::Svid(_))),
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    })
}

fn bundle_pem(b: &Bundle) -> Vec<u8> {
    b.x509_authorities
        .iter()
        .map(|c| to_pem("CERTIFICATE", c))
        .collect::<String>()
        .into_bytes()
}

fn tls_secret(name: &str, s: &IssuedSvid) -> Secret {
    let chain: String = crate::svid::split_der_chain(&s.chain_der)
        .unwrap_or_default()
        .iter()
        .map(|c| to_pem("CERTIFICATE", c))
        .collect();
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: inline(to_pem("PRIVATE KEY", &s.key_pkcs8).into_bytes()),
        })),
    }
}

fn bundle_secret(name: &str, b: &Bundle) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle_pem(b)),
                ..Default::default()
            },
        )),
    }
}

fn all_secret(st: &TrustState, caller: &Caller) -> Secret {
    let trust_domains = std::iter::once(&*st.bundle)
        .chain(caller.visible(st))
        .filter(|b| !b.x509_authorities.is_empty())
        .map(|b| spiffe_cert_validator_config::TrustDomain {
            name: b.trust_domain.name().to_string(),
            trust_bundle: inline(bundle_pem(b)),
        })
        .collect();
    let config = SpiffeCertValidatorConfig {
        trust_domains,
        trust_bundles: None,
    };
    Secret {
        name: ALL.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR_NAME.to_string(),
                    typed_config: Some(prost_types::Any {
                        type_url: SPIFFE_VALIDATOR_TYPE_URL.to_string(),
                        value: config.encode_to_vec(),
                    }),
                }),
                ..Default::default()
            },
        )),
    }
}

fn td_bundle<'a>(st: &'a TrustState, td: &TrustDomain) -> Option<&'a Bundle> {
    if *td == st.bundle.trust_domain {
        Some(&st.bundle)
    } else {
        st.federated.get(td)
    }
}

/// The secrets for `wants` (`None`: everything), given the caller's issued SVIDs (aligned
/// with `caller.entries`).
pub fn secrets(
    st: &TrustState,
    caller: &Caller,
    issued: &[std::sync::Arc<IssuedSvid>],
    wants: &Option<Vec<Want>>,
) -> Vec<Secret> {
    let Some(wants) = wants else {
        let mut out: Vec<Secret> = issued
            .iter()
            .map(|s| tls_secret(s.id.as_str(), s))
            .collect();
        out.push(bundle_secret(
            &st.bundle.trust_domain.id_string(),
            &st.bundle,
        ));
        out.extend(
            caller
                .visible(st)
                .map(|b| bundle_secret(&b.trust_domain.id_string(), b)),
        );
        return out;
    };
    let mut out = Vec::with_capacity(wants.len());
    for w in wants {
        match w {
            Want::Default => out.extend(issued.first().map(|s| tls_secret(DEFAULT, s))),
            Want::Svid(id) => out.extend(
                issued
                    .iter()
                    .find(|s| s.id == *id)
                    .map(|s| tls_secret(id.as_str(), s)),
            ),
            Want::RootCa => out.push(bundle_secret(ROOTCA, &st.bundle)),
            Want::All => out.push(all_secret(st, caller)),
            Want::Bundle(td) => {
                out.extend(td_bundle(st, td).map(|b| bundle_secret(&td.id_string(), b)))
            }
        }
    }
    out
}

/// Wraps secrets as `Any`s and computes a content version (stable for equal contents). The
/// version is derived from everything but private keys (a new key always comes with a new
/// certificate), so nothing derived from a key is ever sent or logged.
pub fn encode(secrets: &[Secret]) -> (Vec<prost_types::Any>, String) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let anys: Vec<prost_types::Any> = secrets
        .iter()
        .map(|s| {
            let value = s.encode_to_vec();
            let mut public = s.clone();
            if let Some(secret::Type::TlsCertificate(t)) = &mut public.r#type {
                t.private_key = None;
            }
            public.encode_to_vec().hash(&mut h);
            prost_types::Any {
                type_url: SECRET_TYPE_URL.to_string(),
                value,
            }
        })
        .collect();
    (anys, format!("{:016x}", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(fw: &[&str]) -> Caller {
        let td = TrustDomain::parse("a.org").unwrap();
        let fw: Vec<String> = fw.iter().map(|s| s.to_string()).collect();
        let e = Entry::new(
            &td,
            "spiffe://a.org/w",
            &["unix:uid:1".into()],
            None,
            None,
            &fw,
        )
        .unwrap();
        Caller::new(vec![e])
    }

    #[test]
    fn names_and_entitlement() {
        let own = TrustDomain::parse("a.org").unwrap();
        let c = caller(&["b.org"]);
        assert_eq!(parse_names(&[], &c, &own).unwrap(), None);
        let names: Vec<String> = [
            "default",
            "ROOTCA",
            "ALL",
            "spiffe://a.org/w",
            "spiffe://b.org",
            "spiffe://a.org",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let w = parse_names(&names, &c, &own).unwrap().unwrap();
        assert_eq!(w.len(), 6);
        let denied = |n: &str| parse_names(&[n.to_string()], &c, &own).unwrap_err().code();
        assert_eq!(
            denied("spiffe://a.org/other"),
            tonic::Code::PermissionDenied
        );
        assert_eq!(denied("spiffe://c.org"), tonic::Code::PermissionDenied);
        assert_eq!(denied("bogus"), tonic::Code::InvalidArgument);
        // No federates_with: every federated domain is visible.
        let all = caller(&[]);
        assert!(parse_names(&["spiffe://c.org".into()], &all, &own).is_ok());
    }
}
