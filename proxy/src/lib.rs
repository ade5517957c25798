//! The svidcar sidecar proxy: inbound and outbound mTLS, egress, the policy engine, the hot path,
//! admin endpoints, traffic interception (`init`) and Kubernetes injection (`inject`).
//!
//! `unsafe` is denied everywhere except [`sys`] (documented `getsockopt`/`splice` wrappers).
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod authz;
pub mod client_hello;
pub mod config;
pub mod conn_registry;
pub mod context;
pub mod copy;
pub mod credentials;
pub mod detect;
pub mod egress_connect;
pub mod egress_http;
pub mod egress_stream;
pub mod http;
pub mod http_authority;
pub mod inbound;
pub mod ktls;
pub mod limits;
pub mod linger;
pub mod metrics;
pub mod mux;
pub mod outbound;
pub mod peer_trust;
pub mod policy_authz;
pub mod policy_change;
pub mod server;
pub mod sniff;
pub mod sys;
pub mod tls_session;

pub mod init;
pub mod inject;
pub mod policy;

pub use authz::{Authorizer, ConnAttrs, DefaultAuthorizer, EgressAttrs, EgressHttp, Verdict};
pub use config::ProxyConfig;
pub use server::{shutdown_signal, Proxy};
