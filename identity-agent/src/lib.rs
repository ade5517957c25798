//! SPIFFE identity for svidcar.
//!
//! Always built (also used by the proxy): the SPIFFE model ([`spiffe_id`], [`svid`],
//! [`bundle`], [`jwt`]), a Workload API [`client`] that keeps the latest SVIDs and bundles, and
//! rustls verifiers and resolvers fed by it ([`tls`]). Behind the default feature `agent`: the
//! node identity agent ([`agent`]): attestation, registration entries, the CA, the Workload API
//! server, rotation and federation.
#![forbid(unsafe_code)]

#[cfg(feature = "agent")]
pub mod agent;
pub mod bundle;
pub mod client;
pub mod jwt;
pub mod spiffe_id;
pub mod svid;
pub mod tls;

pub use bundle::{Bundle, BundleSet};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{SvidError, X509Svid};
