//! Envoy's Secret Discovery Service (`envoy.service.secret.v3.SecretDiscoveryService`) on the
//! agent's unix socket, next to the Workload API and with the same attestation (no
//! `workload.spiffe.io` header: Envoy does not send it).
//!
//! - `StreamSecrets` (state of the world): the first request subscribes to names (see
//!   [`sds_resources`](crate::agent::sds_resources)); the agent answers with every requested
//!   secret, a `version_info` (a hash of the contents) and a fresh nonce. It pushes again when
//!   the contents change: SVID re-issued at half life, CA rotated, a bundle changed. SVIDs
//!   come from the agent's [`SvidCache`]: one per identity, the same on every SDS and
//!   Workload API stream.
//!   A request carrying the last nonce and no `error_detail` is an ACK (nothing is sent); with
//!   `error_detail` it is a NACK: logged, and the rejected version is not resent (the next
//!   change is). Requests with a stale nonce are ignored; a request changing the names is
//!   answered at once.
//! - `FetchSecrets`: one response for the requested names.
//! - `DeltaSecrets`: `UNIMPLEMENTED` (Envoy falls back to state of the world).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use svidcar_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use svidcar_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::agent::attest;
use crate::agent::attest::peer::Peer;
use crate::agent::ca::IssuedSvid;
use crate::agent::config::AgentConfig;
use crate::agent::entries::Entry;
use crate::agent::health::Metrics;
use crate::agent::sds_resources::{self as res, Caller, Want};
use crate::agent::svid_cache::{Lease, SvidCache};
use crate::agent::TrustState;

/// The SDS service behind the agent socket.
pub struct Sds {
    config: Arc<AgentConfig>,
    state: watch::Receiver<Arc<TrustState>>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    cache: Arc<SvidCache>,
}

impl Sds {
    /// A service reading the shared trust state and serving SVIDs from `cache` (shared with
    /// the Workload API); streams end when `stop` turns true.
    pub fn new(
        config: Arc<AgentConfig>,
        state: watch::Receiver<Arc<TrustState>>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
        cache: Arc<SvidCache>,
    ) -> Self {
        Self {
            config,
            state,
            metrics,
            stop,
            cache,
        }
    }

    /// The tonic service, ready for `Router::add_service`.
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }

    /// Attests the caller (same rules as the Workload API) and returns its entries.
    #[allow(clippy::result_large_err)]
    fn caller<T>(
        &self,
        req: &Request<T>,
    ) -> impl std::future::Future<Output = Result<(Peer, Caller), Status>> + Send + '_ {
        let peer = crate::agent::workload_api::peer_of(req);
        async move {
            let (_, matched) = attest::caller::entitled(
                peer.as_ref().as_ref(),
                &self.config,
                &self.metrics,
                "SDS: ",
            )
            .await?;
            match peer.as_ref() {
                Ok(p) => Ok((p.clone(), Caller::new(matched))),
                Err(e) => Err(Status::permission_denied(e.to_string())),
            }
        }
    }
}

#[allow(clippy::result_large_err)]
fn check_type(r: &DiscoveryRequest) -> Result<(), Status> {
    if r.type_url.is_empty() || r.type_url == res::SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "SDS serves {} only, not {}",
            res::SECRET_TYPE_URL,
            r.type_url
        )))
    }
}

fn new_nonce() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The caller's SVIDs, from the shared cache (the same SVIDs as every other stream of its
/// identities): leased when first needed (a bundles-only subscription holds none), refreshed
/// before every response.
struct Svids {
    cache: Arc<SvidCache>,
    lease: Option<Lease>,
    issued: Vec<Arc<IssuedSvid>>,
}

impl Svids {
    fn new(cache: Arc<SvidCache>) -> Self {
        Self {
            cache,
            lease: None,
            issued: Vec::new(),
        }
    }

    #[allow(clippy::result_large_err)]
    fn refresh(&mut self, entries: &[Entry]) -> Result<(), Status> {
        let lease = self.lease.get_or_insert_with(|| self.cache.lease(entries));
        self.issued = lease.svids().map_err(|err| {
            tracing::error!(error = %err, "SDS: cannot issue SVID");
            Status::unavailable(format!(
                "agent cannot issue SVIDs right now: {}",
                err.source
            ))
        })?;
        Ok(())
    }

    fn next_refresh(&self) -> Option<SystemTime> {
        self.issued.iter().map(|s| s.refresh_at()).min()
    }
}

/// Per-stream protocol state.
struct StreamState {
    caller: Caller,
    wants: Option<Option<Vec<Want>>>,
    svids: Svids,
    sent_version: Option<String>,
    sent_nonce: Option<String>,
    nacked_version: Option<String>,
    force: bool,
}

impl StreamState {
    #[allow(clippy::result_large_err)]
    fn on_request(
        &mut self,
        r: DiscoveryRequest,
        own: &crate::spiffe_id::TrustDomain,
    ) -> Result<(), Status> {
        check_type(&r)?;
        if !r.response_nonce.is_empty() && Some(&r.response_nonce) != self.sent_nonce.as_ref() {
            tracing::debug!(nonce = %r.response_nonce, "SDS: stale nonce, ignored");
            return Ok(());
        }
        let names_changed = match &self.wants {
            None => true,
            Some(w) => *w != res::parse_names(&r.resource_names, &self.caller, own)?,
        };
        if let Some(err) = &r.error_detail {
            tracing::warn!(version = %r.version_info, code = err.code, message = %err.message,
                node = ?r.node.as_ref().map(|n| &n.id), "SDS: client rejected (NACK) our secrets");
            self.nacked_version = self.sent_version.clone();
        } else if !r.response_nonce.is_empty() && !names_changed {
            tracing::debug!(version = %r.version_info, "SDS: ACK");
        }
        if names_changed {
            let wants = res::parse_names(&r.resource_names, &self.caller, own)?;
            tracing::debug!(names = ?r.resource_names, "SDS: subscription");
            self.wants = Some(wants);
            self.force = true;
        }
        Ok(())
    }

    /// The response to send now, if any.
    #[allow(clippy::result_large_err)]
    fn response(&mut self, st: &TrustState) -> Result<Option<DiscoveryResponse>, Status> {
        let Some(wants) = &self.wants else {
            return Ok(None);
        };
        if res::needs_svids(wants) {
            self.svids.refresh(&self.caller.entries)?;
        }
        let secrets = res::secrets(st, &self.caller, &self.svids.issued, wants);
        let (resources, version) = res::encode(&secrets);
        let changed = self.sent_version.as_ref() != Some(&version)
            && self.nacked_version.as_ref() != Some(&version);
        if !changed && !self.force {
            return Ok(None);
        }
        self.force = false;
        let nonce = new_nonce();
        self.sent_version = Some(version.clone());
        self.sent_nonce = Some(nonce.clone());
        Ok(Some(DiscoveryResponse {
            version_info: version,
            resources,
            canary: false,
            type_url: res::SECRET_TYPE_URL.to_string(),
            nonce,
        }))
    }
}

/// One `StreamSecrets` stream.
async fn secrets_stream(
    (peer, caller): (Peer, Caller),
    mut inbound: Streaming<DiscoveryRequest>,
    mut state: watch::Receiver<Arc<TrustState>>,
    cache: Arc<SvidCache>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    metrics.streams_open.inc();
    let own = state.borrow().bundle.trust_domain.clone();
    let mut s = StreamState {
        caller,
        wants: None,
        svids: Svids::new(cache),
        sent_version: None,
        sent_nonce: None,
        nacked_version: None,
        force: false,
    };
    loop {
        let st = state.borrow_and_update().clone();
        let resp = attest::caller::recheck(&peer, &metrics, "SDS: ").and_then(|()| s.response(&st));
        match resp {
            Ok(Some(resp)) => {
                tracing::debug!(version = %resp.version_info, resources = resp.resources.len(), "SDS: push");
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                break;
            }
        }
        let wait = s
            .svids
            .next_refresh()
            .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600))
            // Floor: an SVID capped by a CA about to expire must not make the stream spin.
            .max(Duration::from_millis(100));
        let msg = tokio::select! {
            msg = inbound.message() => msg,
            r = state.changed() => if r.is_err() { break } else { continue },
            _ = tokio::time::sleep(wait) => continue,
            _ = tx.closed() => break,
            _ = stop.wait_for(|s| *s) => break,
        };
        match msg {
            Ok(Some(r)) => {
                if let Err(status) = s.on_request(r, &own) {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "SDS: stream ended");
                break;
            }
        }
    }
    metrics.streams_open.dec();
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets is not implemented; use StreamSecrets (state of the world)",
        ))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let subscriber = self.caller(&req).await?;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(secrets_stream(
            subscriber,
            req.into_inner(),
            self.state.clone(),
            self.cache.clone(),
            self.metrics.clone(),
            self.stop.clone(),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let (_, caller) = self.caller(&req).await?;
        let r = req.into_inner();
        check_type(&r)?;
        let st = self.state.borrow().clone();
        let wants = res::parse_names(&r.resource_names, &caller, &st.bundle.trust_domain)?;
        let mut svids = Svids::new(self.cache.clone());
        if res::needs_svids(&wants) {
            svids.refresh(&caller.entries)?;
        }
        let secrets = res::secrets(&st, &caller, &svids.issued, &wants);
        let (resources, version) = res::encode(&secrets);
        Ok(Response::new(DiscoveryResponse {
            version_info: version,
            resources,
            canary: false,
            type_url: res::SECRET_TYPE_URL.to_string(),
            nonce: new_nonce(),
        }))
    }
}
