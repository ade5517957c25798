//! The standard gRPC health service (`grpc.health.v1.Health`) on the agent socket, for
//! orchestrators and `grpc_health_probe`-style checks. Known services report `SERVING` while
//! the socket serves and `NOT_SERVING` once shutdown began; an unknown name is `NOT_FOUND`
//! (`Check`) or `SERVICE_UNKNOWN` (`Watch`), as the protocol specifies.
//!
//! Own implementation (about a hundred lines) instead of the `tonic-health` crate: the proto is
//! compiled with the rest of our wire contract and the tree gains no dependency.

use svidcar_proto::grpc_health::health_check_response::ServingStatus;
use svidcar_proto::grpc_health::health_server::{Health, HealthServer};
use svidcar_proto::grpc_health::{HealthCheckRequest, HealthCheckResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Service names this socket answers for (`""` is the server as a whole).
pub const SERVICES: &[&str] = &[
    "",
    "SpiffeWorkloadAPI",
    "envoy.service.secret.v3.SecretDiscoveryService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The health service; `stop` turns true when the agent begins shutting down.
pub struct HealthService {
    stop: watch::Receiver<bool>,
}

impl HealthService {
    /// A health service following the agent's stop signal.
    pub fn new(stop: watch::Receiver<bool>) -> Self {
        Self { stop }
    }

    /// The tonic service, ready for `Router::add_service`.
    pub fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }
}

fn status_of(service: &str, stopping: bool) -> ServingStatus {
    if !SERVICES.contains(&service) {
        ServingStatus::ServiceUnknown
    } else if stopping {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    }
}

fn response(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: s as i32 }
}

#[tonic::async_trait]
impl Health for HealthService {
    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &req.get_ref().service;
        match status_of(service, *self.stop.borrow()) {
            ServingStatus::ServiceUnknown => {
                Err(Status::not_found(format!("unknown service {service:?}")))
            }
            s => Ok(Response::new(response(s))),
        }
    }

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let mut stop = self.stop.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let s = status_of(&service, *stop.borrow_and_update());
                if last != Some(s) {
                    if tx.send(Ok(response(s))).await.is_err() {
                        return;
                    }
                    last = Some(s);
                }
                tokio::select! {
                    r = stop.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
