//! The wire contract of svidcar: the SPIFFE Workload API exactly as the standard defines it.
//!
//! The proto has no package, so the generated module is `_` and every method path is
//! `/SpiffeWorkloadAPI/<Method>` — what every SPIFFE client (go-spiffe, py-spiffe, the Rust
//! `spiffe` crate) calls.
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

/// Generated messages, client and server of the `SpiffeWorkloadAPI` service.
pub mod workload {
    tonic::include_proto!("_");
}

pub use workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
pub use workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
