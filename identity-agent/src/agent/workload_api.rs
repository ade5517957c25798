//! The SPIFFE Workload API server on the agent's unix socket.
//!
//! Every call: the `workload.spiffe.io: true` header (interceptor, else `InvalidArgument`),
//! attestation of the caller from `SO_PEERCRED` (else `PermissionDenied`), and the entries
//! matching its selectors (none: `PermissionDenied`). Streams send the full state at once,
//! then again whenever the CA or a bundle changes and at half life of the SVIDs.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use svidcar_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svidRequest, X509svidResponse,
};
use svidcar_proto::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent::attest;
use crate::agent::attest::peer::{Peer, PROC_ROOT};
use crate::agent::config::AgentConfig;
use crate::agent::entries::Entry;
use crate::agent::health::Metrics;
use crate::agent::svid_cache::SvidCache;
use crate::agent::{AgentError, TrustState};
use crate::bundle::Bundle;
use crate::spiffe_id::{SpiffeId, TrustDomain};

mod claims;
pub mod incoming;
mod socket;
mod x509;

pub use claims::json_to_struct;
pub use incoming::peer_of;
pub use socket::bind_socket;

/// The header every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Rejects calls without `workload.spiffe.io: true` (the SPIFFE Workload Endpoint rule).
#[allow(clippy::result_large_err)]
pub fn check_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v == "true" => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request (workload.spiffe.io: true)",
        )),
    }
}

/// The service behind the socket.
pub struct WorkloadApi {
    config: Arc<AgentConfig>,
    state: watch::Receiver<Arc<TrustState>>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    cache: Arc<SvidCache>,
}

/// Decrements the open-streams gauge when a stream ends.
struct StreamGuard(Arc<Metrics>);
impl StreamGuard {
    fn new(m: &Arc<Metrics>) -> Self {
        m.streams_open.inc();
        Self(m.clone())
    }
}
impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_open.dec();
    }
}

type Sender<T> = mpsc::Sender<Result<T, Status>>;

impl WorkloadApi {
    /// Attests the caller and returns it (as bound to its connection) with its matching
    /// entries.
    #[allow(clippy::result_large_err)]
    fn entitled<T>(
        &self,
        req: &Request<T>,
    ) -> impl std::future::Future<Output = Result<(Peer, Vec<Entry>), Status>> + Send + '_ {
        let peer = peer_of(req);
        async move {
            let (workload, matched) =
                attest::caller::entitled(peer.as_ref().as_ref(), &self.config, &self.metrics, "")
                    .await?;
            tracing::debug!(pid = workload.pid, ids = matched.len(), "caller entitled");
            match peer.as_ref() {
                Ok(p) => Ok((p.clone(), matched)),
                Err(e) => Err(Status::permission_denied(e.to_string())),
            }
        }
    }

    fn stop_rx(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// A bundles stream for a caller entitled to `matched`: sent at once, then on every bundle
    /// change; `make` builds a message from the state and the trust domains the caller may see.
    fn bundles_stream<T: Send + 'static>(
        &self,
        peer: Peer,
        matched: &[Entry],
        make: impl Fn(&TrustState, &Option<BTreeSet<TrustDomain>>) -> T + Send + 'static,
    ) -> ReceiverStream<Result<T, Status>> {
        let allowed = federated_for(matched);
        let (mut state, metrics, mut stop) =
            (self.state.clone(), self.metrics.clone(), self.stop_rx());
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _guard = StreamGuard::new(&metrics);
            let mut sent_version = 0;
            loop {
                let st = state.borrow_and_update().clone();
                if st.bundles_version != sent_version {
                    if let Err(status) = attest::caller::recheck(&peer, &metrics, "") {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    if tx.send(Ok(make(&st, &allowed))).await.is_err() {
                        return;
                    }
                    sent_version = st.bundles_version;
                }
                tokio::select! {
                    r = state.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Foreign trust domains this set of entries may see: the union of their `federates_with`,
/// or all when any entry leaves it empty.
fn federated_for(entries: &[Entry]) -> Option<BTreeSet<TrustDomain>> {
    if entries.iter().any(|e| e.federates_with.is_empty()) {
        return None;
    }
    Some(
        entries
            .iter()
            .flat_map(|e| e.federates_with.iter().cloned())
            .collect(),
    )
}

fn visible_federated<'a>(
    st: &'a TrustState,
    allowed: &'a Option<BTreeSet<TrustDomain>>,
) -> impl Iterator<Item = &'a Bundle> + 'a {
    st.federated
        .iter()
        .filter(move |(td, _)| allowed.as_ref().is_none_or(|a| a.contains(*td)))
        .map(|(_, b)| b)
}

fn bundles_map(
    st: &TrustState,
    allowed: &Option<BTreeSet<TrustDomain>>,
    x509: bool,
) -> HashMap<String, Vec<u8>> {
    std::iter::once(&*st.bundle)
        .chain(visible_federated(st, allowed))
        .filter(|b| {
            if x509 {
                !b.x509_authorities.is_empty()
            } else {
                !b.jwt_authorities.is_empty() || b.trust_domain == st.bundle.trust_domain
            }
        })
        .map(|b| {
            (
                b.trust_domain.id_string(),
                if x509 {
                    b.x509_der_concat()
                } else {
                    b.jwt_jwks()
                },
            )
        })
        .collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (peer, matched) = self.entitled(&req).await?;
        tracing::debug!(pid = peer.pid, ids = matched.len(), "FetchX509SVID");
        let (tx, rx) = mpsc::channel(1);
        let lease = self.cache.lease(&matched);
        tokio::spawn(x509::x509_stream(
            peer,
            self.state.clone(),
            matched,
            lease,
            self.metrics.clone(),
            self.stop_rx(),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (peer, matched) = self.entitled(&req).await?;
        Ok(Response::new(self.bundles_stream(
            peer,
            &matched,
            |st, allowed| X509BundlesResponse {
                crl: Vec::new(),
                bundles: bundles_map(st, allowed, true),
            },
        )))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let (peer, matched) = self.entitled(&req).await?;
        Ok(Response::new(self.bundles_stream(
            peer,
            &matched,
            |st, allowed| JwtBundlesResponse {
                bundles: bundles_map(st, allowed, false),
            },
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        if req.get_ref().audience.iter().all(|a| a.is_empty()) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let (_, matched) = self.entitled(&req).await?;
        let r = req.get_ref();
        let wanted = if r.spiffe_id.is_empty() {
            None
        } else {
            Some(SpiffeId::parse(&r.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!(
                    "spiffe_id {:?} is not a SPIFFE ID: {e}",
                    r.spiffe_id
                ))
            })?)
        };
        let selected: Vec<&Entry> = matched
            .iter()
            .filter(|e| wanted.as_ref().is_none_or(|w| *w == e.id))
            .collect();
        if selected.is_empty() {
            return Err(Status::permission_denied(
                "the caller is not entitled to the requested SPIFFE ID",
            ));
        }
        let audiences: Vec<String> = r
            .audience
            .iter()
            .filter(|a| !a.is_empty())
            .cloned()
            .collect();
        let st = self.state.borrow().clone();
        let mut svids = Vec::new();
        for e in selected {
            let token = st
                .jwt
                .sign(&e.id, &audiences, self.config.jwt_svid_ttl)
                .map_err(|err| Status::internal(format!("cannot sign JWT-SVID: {err}")))?;
            self.metrics.jwt_svids_issued.inc();
            svids.push(Jwtsvid {
                spiffe_id: e.id.as_str().to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let (_, matched) = self.entitled(&req).await?;
        let st = self.state.borrow().clone();
        let mut set = crate::bundle::BundleSet::new();
        set.insert((*st.bundle).clone());
        let allowed = federated_for(&matched);
        for b in visible_federated(&st, &allowed) {
            set.insert(b.clone());
        }
        let v = crate::jwt::validate(&r.svid, &r.audience, &set, SystemTime::now())
            .map_err(|e| Status::invalid_argument(format!("JWT-SVID is not valid: {e}")))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.id.as_str().to_string(),
            claims: Some(json_to_struct(v.claims)),
        }))
    }
}

/// Serves the Workload API on `config.socket` until `shutdown`, then ends open streams,
/// waits up to 5 s for calls to finish and removes the socket file.
pub async fn serve(
    config: Arc<AgentConfig>,
    state: watch::Receiver<Arc<TrustState>>,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let listener = bind_socket(&config.socket, config.socket_mode)?;
    let max_per_uid =
        incoming::per_uid_cap(config.max_connections_per_uid, incoming::open_files_limit());
    let incoming = incoming::Incoming::new(
        listener,
        incoming::Limits {
            max_per_uid,
            first_request_timeout: config.first_request_timeout,
        },
        metrics.clone(),
        PROC_ROOT.into(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let cache = SvidCache::new(state.clone(), config.svid_ttl, metrics.clone());
    let sds = crate::agent::sds::Sds::new(
        config.clone(),
        state.clone(),
        metrics.clone(),
        stop_rx.clone(),
        cache.clone(),
    );
    let health = crate::agent::grpc_health::HealthService::new(stop_rx.clone());
    let reflection = crate::agent::grpc_reflection::Reflection::new()
        .map_err(|e| tracing::error!(error = %e, "gRPC reflection disabled"))
        .ok();
    let api = WorkloadApi {
        config: config.clone(),
        state,
        metrics,
        stop: stop_rx.clone(),
        cache: cache.clone(),
    };
    // Released identities leave the cache once their SVID expired (or its CA was replaced).
    let sweeper = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            cache.sweep();
        }
    });
    let svc = SpiffeWorkloadApiServer::with_interceptor(api, check_security_header);
    let mut server_stop = stop_rx;
    let server = tonic::transport::Server::builder()
        .layer(incoming::mark_served_layer())
        .add_service(svc)
        .add_service(sds.into_server())
        .add_service(health.into_server())
        .add_optional_service(reflection.as_ref().map(|r| r.v1()))
        .add_optional_service(reflection.as_ref().map(|r| r.v1alpha()))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = server_stop.wait_for(|s| *s).await;
        });
    tokio::pin!(server);
    let _ = ready.send(true);
    tracing::info!(socket = %config.socket.display(), mode = format!("{:o}", config.socket_mode),
        max_connections_per_uid = max_per_uid,
        first_request_timeout = ?config.first_request_timeout, trust_domain = %config.trust_domain, entries = config.entries.len(), "Workload API listening");
    let result = tokio::select! {
        r = &mut server => r,
        _ = shutdown => {
            tracing::info!("shutting down");
            let _ = ready.send(false);
            let _ = stop_tx.send(true);
            tokio::time::timeout(Duration::from_secs(5), &mut server).await.unwrap_or(Ok(()))
        }
    };
    sweeper.abort();
    let _ = std::fs::remove_file(&config.socket);
    result.map_err(|e| AgentError::Serve(e.to_string()))
}
