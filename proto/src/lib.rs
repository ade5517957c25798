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

/// Envoy's data-plane API subset for SDS (package names and field numbers as upstream).
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        pub mod secret {
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

/// `google.rpc.Status` (the NACK detail of xDS requests).
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The standard gRPC health checking service.
pub mod grpc_health {
    tonic::include_proto!("grpc.health.v1");
}

/// gRPC server reflection, current and `v1alpha` (same wire format; older clients use the latter).
pub mod grpc_reflection {
    pub mod v1 {
        tonic::include_proto!("grpc.reflection.v1");
    }
    pub mod v1alpha {
        tonic::include_proto!("grpc.reflection.v1alpha");
    }
}

/// Encoded `FileDescriptorSet` of every proto above (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/svidcar_descriptor.bin"));

/// The protobuf runtime the generated types use (to encode/decode them elsewhere).
pub use prost;

pub use workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
pub use workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
