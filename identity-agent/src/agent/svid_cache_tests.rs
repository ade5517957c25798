use std::collections::BTreeMap;

use super::*;
use crate::agent::ca::SigningCa;
use crate::bundle::Bundle;
use crate::jwt::JwtSigner;
use crate::spiffe_id::TrustDomain;

const TTL: Duration = Duration::from_secs(60);

fn state(now: SystemTime) -> TrustState {
    let td = TrustDomain::parse("example.org").unwrap();
    let (ca, _) = SigningCa::generate_root(&td, Duration::from_secs(3600), now).unwrap();
    TrustState {
        signer: Arc::new(ca),
        bundle: Arc::new(Bundle::new(td)),
        federated: Arc::new(BTreeMap::new()),
        jwt: Arc::new(JwtSigner::generate().unwrap()),
        bundles_version: 1,
    }
}

fn entry(path: &str, ttl: Option<Duration>) -> Entry {
    let td = TrustDomain::parse("example.org").unwrap();
    Entry::new(
        &td,
        &format!("spiffe://example.org/{path}"),
        &["unix:uid:1".into()],
        ttl,
        None,
        &[],
    )
    .unwrap()
}

fn cache(now: SystemTime) -> (watch::Sender<Arc<TrustState>>, Arc<SvidCache>, Arc<Metrics>) {
    let (tx, rx) = watch::channel(Arc::new(state(now)));
    let metrics = Arc::new(Metrics::new());
    (tx, SvidCache::new(rx, TTL, metrics.clone()), metrics)
}

fn one(l: &Lease, now: SystemTime) -> Arc<IssuedSvid> {
    l.svids_at(now).unwrap().remove(0)
}

#[test]
fn one_svid_per_identity_until_half_life_and_per_ca() {
    let t0 = SystemTime::now();
    let (tx, c, metrics) = cache(t0);
    let (a, b) = (c.lease(&[entry("w", None)]), c.lease(&[entry("w", None)]));
    let first = one(&a, t0);
    assert!(Arc::ptr_eq(&first, &one(&b, t0)), "same SVID for both");
    assert_eq!(metrics.x509_svids_issued.get(), 1);
    // Another identity, or the same ID with another TTL, is another SVID.
    let other = c.lease(&[entry("x", None), entry("w", Some(TTL * 2))]);
    let o = other.svids_at(t0).unwrap();
    assert!(!Arc::ptr_eq(&o[0], &first) && !Arc::ptr_eq(&o[1], &first));
    assert_ne!(o[0].key_pkcs8, first.key_pkcs8);
    // Before half life: kept; at half life: one successor, shared.
    assert!(Arc::ptr_eq(
        &first,
        &one(&b, t0 + TTL / 2 - Duration::from_secs(1))
    ));
    let at = first.refresh_at();
    let second = one(&b, at);
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(Arc::ptr_eq(&second, &one(&a, at)));
    assert_eq!(metrics.x509_svids_issued.get(), 4);
    // A new CA re-issues at once, before half life.
    tx.send_replace(Arc::new(state(at)));
    let third = one(&a, at);
    assert!(!Arc::ptr_eq(&second, &third));
    assert!(Arc::ptr_eq(&third, &one(&b, at)));
    assert_eq!(metrics.x509_svids_issued.get(), 5);
}

#[test]
fn concurrent_first_fetches_issue_once() {
    let t0 = SystemTime::now();
    let (_tx, c, metrics) = cache(t0);
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let got: Vec<Arc<IssuedSvid>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (c, barrier) = (c.clone(), barrier.clone());
                s.spawn(move || {
                    let l = c.lease(&[entry("w", None)]);
                    barrier.wait();
                    one(&l, t0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|s| Arc::ptr_eq(s, &got[0])));
    assert_eq!(metrics.x509_svids_issued.get(), 1);
}

#[test]
fn released_identities_leave_once_spent_and_the_map_stays_bounded() {
    let t0 = SystemTime::now();
    let (tx, c, _) = cache(t0);
    let held = c.lease(&[entry("kept", None)]);
    one(&held, t0);
    {
        let l = c.lease(&[entry("gone", None)]);
        one(&l, t0);
    }
    // Released but still valid: kept (a reconnecting workload gets the same SVID).
    assert_eq!(c.len(), 2);
    c.sweep();
    assert_eq!(c.len(), 2);
    // A new CA spends every SVID: the released one goes, the leased one stays.
    tx.send_replace(Arc::new(state(t0)));
    c.sweep();
    assert_eq!(c.len(), 1);
    // Many one-shot identities, each spent after release (the CA changes): swept as the map
    // grows, never all kept.
    for i in 0..300 {
        let l = c.lease(&[entry(&format!("burst-{i}"), None)]);
        one(&l, t0);
        drop(l);
        tx.send_replace(Arc::new(state(t0)));
    }
    assert!(c.len() <= MIN_SWEEP + 1, "{} slots", c.len());
    c.sweep();
    assert_eq!(c.len(), 1, "only the leased identity is left");
    // A slot whose lease ends after its CA was replaced goes at once, without a sweep.
    drop(held);
    assert!(c.is_empty(), "{} slots", c.len());
}

#[test]
fn an_identity_nobody_is_entitled_to_is_never_served() {
    let t0 = SystemTime::now();
    let (_tx, c, _) = cache(t0);
    let a = c.lease(&[entry("a", None)]);
    let sa = one(&a, t0);
    // A caller is served exactly the IDs of the entries it was attested for.
    let b = c.lease(&[entry("b", None)]);
    let sb = b.svids_at(t0).unwrap();
    assert_eq!(sb.len(), 1);
    assert_eq!(sb[0].id.as_str(), "spiffe://example.org/b");
    assert!(!Arc::ptr_eq(&sa, &sb[0]));
    assert!(c.lease(&[]).svids_at(t0).unwrap().is_empty());
}

#[test]
fn an_expired_ca_is_an_error_not_a_stale_svid() {
    let t0 = SystemTime::now();
    let (_tx, c, _) = cache(t0);
    let l = c.lease(&[entry("w", None)]);
    one(&l, t0);
    let err = l
        .svids_at(t0 + Duration::from_secs(7200))
        .expect_err("CA expired");
    assert_eq!(err.id.as_str(), "spiffe://example.org/w");
}
