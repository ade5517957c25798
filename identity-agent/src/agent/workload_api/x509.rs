//! The `FetchX509SVID` stream of one attested caller: its entries' SVIDs from the shared
//! [`SvidCache`](crate::agent::svid_cache::SvidCache) (the same SVID as every other stream of
//! the identity), pushed at once, again when the cache re-issues them (half life, new CA) and
//! whenever a bundle changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use svidcar_proto::workload::{X509svid, X509svidResponse};
use tokio::sync::watch;
use tonic::Status;

use super::{federated_for, visible_federated, Sender, StreamGuard};
use crate::agent::attest;
use crate::agent::attest::peer::Peer;
use crate::agent::ca::IssuedSvid;
use crate::agent::entries::Entry;
use crate::agent::health::Metrics;
use crate::agent::svid_cache::Lease;
use crate::agent::TrustState;
use crate::spiffe_id::TrustDomain;

fn x509_response<'a>(
    st: &TrustState,
    issued: &[Arc<IssuedSvid>],
    hints: impl Iterator<Item = &'a str>,
    allowed: &Option<std::collections::BTreeSet<TrustDomain>>,
) -> X509svidResponse {
    let bundle = st.bundle.x509_der_concat();
    X509svidResponse {
        svids: issued
            .iter()
            .zip(hints)
            .map(|(s, hint)| X509svid {
                spiffe_id: s.id.as_str().to_string(),
                x509_svid: s.chain_der.clone(),
                x509_svid_key: s.key_pkcs8.clone(),
                bundle: bundle.clone(),
                hint: hint.to_string(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: visible_federated(st, allowed)
            .filter(|b| !b.x509_authorities.is_empty())
            .map(|b| (b.trust_domain.id_string(), b.x509_der_concat()))
            .collect(),
    }
}

/// True when `a` and `b` are the very same SVIDs (the cache hands out shared `Arc`s).
fn same(a: &[Arc<IssuedSvid>], b: &[Arc<IssuedSvid>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

/// Runs one `FetchX509SVID` stream until the client goes away, the caller changes, or the
/// server stops.
pub(super) async fn x509_stream(
    peer: Peer,
    mut state: watch::Receiver<Arc<TrustState>>,
    entries: Vec<Entry>,
    lease: Lease,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    tx: Sender<X509svidResponse>,
) {
    let _guard = StreamGuard::new(&metrics);
    let allowed = federated_for(&entries);
    let mut sent: Option<(Vec<Arc<IssuedSvid>>, u64)> = None;
    loop {
        if let Err(status) = attest::caller::recheck(&peer, &metrics, "") {
            let _ = tx.send(Err(status)).await;
            return;
        }
        // Mark the state seen before taking the SVIDs: a CA change after this line wakes the
        // stream again, so it never keeps an SVID of a CA that is no longer active.
        let st = state.borrow_and_update().clone();
        let issued = match lease.svids() {
            Ok(v) => v,
            Err(err) => {
                tracing::error!(error = %err, "cannot issue SVID");
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "agent cannot issue SVIDs right now: {}",
                        err.source
                    ))))
                    .await;
                return;
            }
        };
        let unchanged = sent
            .as_ref()
            .is_some_and(|(s, v)| *v == st.bundles_version && same(s, &issued));
        if !unchanged {
            let resp = x509_response(&st, &issued, lease.hints(), &allowed);
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
            sent = Some((issued.clone(), st.bundles_version));
        }
        let now = SystemTime::now();
        let refresh = issued.iter().map(|s| s.refresh_at()).min().unwrap_or(now);
        // Floor: an SVID capped by a CA about to expire must not make the stream spin.
        let wait = refresh
            .duration_since(now)
            .unwrap_or_default()
            .max(Duration::from_millis(100));
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
            _ = tx.closed() => return,
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
