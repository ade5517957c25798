//! SPIFFE federation between two real agents over their bundle endpoints (https_spiffe):
//! a workload of one verifies an SVID of the other with the fetched bundle, a CA rotation on one
//! side reaches the other within the refresh hint, and an unreachable endpoint keeps the last
//! good bundle. Plus the https_web profile with an operator certificate, and refusals.
mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{free_port, uid, Agent, TempDir};
use rustls::pki_types::{CertificateDer, UnixTime};
use svidcar_agent::agent::federation_client::{fetch, parse_flag};
use svidcar_agent::bundle::{Bundle, BundleSet};
use svidcar_agent::client::{WorkloadApiClient, X509Context};
use svidcar_agent::spiffe_id::TrustDomain;
use svidcar_agent::svid;

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

async fn context(socket: &Path) -> X509Context {
    let mut c = WorkloadApiClient::connect(socket).await.expect("connect");
    c.fetch_x509_context().await.expect("fetch x509 context")
}

async fn jwt_bundles(socket: &Path) -> BundleSet {
    let mut c = WorkloadApiClient::connect(socket).await.expect("connect");
    c.fetch_jwt_bundles().await.expect("fetch jwt bundles")
}

fn now() -> UnixTime {
    UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap(),
    )
}

/// Starts an agent of `trust` serving its bundle endpoint on `port` (refresh hint 1s) and
/// polling `peer`'s endpoint, bootstrapped from `dir/<peer>-bootstrap.pem`.
fn start(dir: &Path, trust: &str, port: u16, peer: &str, peer_port: u16, extra: &[&str]) -> Agent {
    let sub = dir.join(trust);
    std::fs::create_dir_all(&sub).unwrap();
    let entry = format!("spiffe://{trust}/workload=unix:uid:{}", uid());
    let be = format!("127.0.0.1:{port}");
    let fed_file = format!(
        "{peer}={}",
        dir.join(format!("{peer}-bootstrap.pem")).display()
    );
    let fed_ep = format!(
        "{peer}=https://127.0.0.1:{peer_port},https_spiffe,spiffe://{peer}/svidcar/bundle-endpoint"
    );
    let mut args = vec![
        "--trust-domain",
        trust,
        "--entry",
        &entry,
        "--bundle-endpoint",
        &be,
        "--bundle-refresh-hint",
        "1s",
        "--federate",
        &fed_file,
        "--federate-endpoint",
        &fed_ep,
        "--federation-min-refresh",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Agent::start_in(&sub, &args)
}

/// Waits until `cond` holds (checking every 100 ms) or panics after `secs` with `what`.
async fn wait_for<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs}s waiting for {what}");
}

fn verify(chain: &[CertificateDer<'static>], bundles: &BundleSet) -> Result<String, String> {
    svid::verify_chain(chain, bundles, now())
        .map(|id| id.to_string())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_federate_over_https_spiffe_bundle_endpoints() {
    let dir = TempDir::new("fed");
    let (pa, pb) = (free_port(), free_port());
    let a = start(dir.path(), "a.test", pa, "b.test", pb, &[]);
    // b.test rotates its CA quickly: next root published at half life, activated later.
    let mut b = start(
        dir.path(),
        "b.test",
        pb,
        "a.test",
        pa,
        &["--ca-ttl", "16s", "--svid-ttl", "4s"],
    );
    // Out-of-band bootstrap: each side's current root, as an operator would copy it.
    std::fs::copy(
        a.state_dir.join("ca-cert.pem"),
        dir.path().join("a.test-bootstrap.pem"),
    )
    .unwrap();
    std::fs::copy(
        b.state_dir.join("ca-cert.pem"),
        dir.path().join("b.test-bootstrap.pem"),
    )
    .unwrap();

    // The endpoint's bundle carries JWT keys, the bootstrap file does not: seeing them proves
    // the bundle came over the endpoint.
    for (agent, foreign) in [(&a, "b.test"), (&b, "a.test")] {
        wait_for(
            20,
            &format!("{foreign} bundle fetched over its endpoint"),
            || async {
                jwt_bundles(&agent.socket)
                    .await
                    .get(&td(foreign))
                    .is_some_and(|bundle| !bundle.jwt_authorities.is_empty())
            },
        )
        .await;
    }

    // A workload of a.test verifies an SVID of b.test (and back) with the federated bundle.
    let ctx_a = context(&a.socket).await;
    let ctx_b = context(&b.socket).await;
    let b_svid = ctx_b.default_svid().unwrap();
    let a_svid = ctx_a.default_svid().unwrap();
    assert_eq!(
        verify(&b_svid.chain, &ctx_a.bundles).unwrap(),
        "spiffe://b.test/workload"
    );
    assert_eq!(
        verify(&a_svid.chain, &ctx_b.bundles).unwrap(),
        "spiffe://a.test/workload"
    );
    // Never merged: a.test's bundle does not vouch for b.test and vice versa.
    let mut only_a = BundleSet::new();
    only_a.insert(ctx_a.bundles.get(&td("a.test")).unwrap().clone());
    assert!(verify(&b_svid.chain, &only_a).is_err());

    // The endpoint itself: JWKS with spiffe_refresh_hint, authenticated by b.test's bundle only.
    let b_bundle = ctx_a.bundles.get(&td("b.test")).unwrap().clone();
    let ep = parse_flag(&format!(
        "b.test=https://127.0.0.1:{pb},https_spiffe,spiffe://b.test/svidcar/bundle-endpoint"
    ))
    .unwrap()
    .resolve(&td("a.test"))
    .unwrap();
    let fetched = fetch(&ep, Some(&b_bundle))
        .await
        .expect("fetch b.test bundle");
    assert_eq!(fetched.refresh_hint, Some(Duration::from_secs(1)));
    assert_eq!(fetched.trust_domain, td("b.test"));
    let seq0 = fetched.sequence;
    assert!(seq0 >= 1);
    // Wrong expected ID, or a bundle of another domain: refused.
    let wrong_id = parse_flag(&format!(
        "b.test=https://127.0.0.1:{pb},https_spiffe,spiffe://b.test/not-the-endpoint"
    ))
    .unwrap()
    .resolve(&td("a.test"))
    .unwrap();
    assert!(fetch(&wrong_id, Some(&b_bundle)).await.is_err());
    let mut a_as_b = ctx_a.bundles.get(&td("a.test")).unwrap().clone();
    a_as_b.trust_domain = td("b.test");
    let err = fetch(&ep, Some(&a_as_b))
        .await
        .expect_err("a.test roots must not authenticate b.test");
    assert!(err.to_string().contains("TLS"), "{err}");

    // CA rotation on b.test: its next root shows up in a.test's view within the refresh hint.
    let first_roots: Vec<CertificateDer<'static>> = b_bundle.x509_authorities.clone();
    let mut new_root: Option<CertificateDer<'static>> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while new_root.is_none() && Instant::now() < deadline {
        let own = context(&b.socket).await;
        new_root = own.bundles.get(&td("b.test")).and_then(|bb| {
            bb.x509_authorities
                .iter()
                .find(|c| !first_roots.contains(c))
                .cloned()
        });
        if new_root.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let new_root = new_root.expect("b.test never rotated its CA");
    let seen_at = Instant::now();
    wait_for(
        6,
        "b.test's new root in a.test's federated bundle",
        || async {
            context(&a.socket)
                .await
                .bundles
                .get(&td("b.test"))
                .is_some_and(|bb| bb.x509_authorities.contains(&new_root))
        },
    )
    .await;
    eprintln!(
        "new b.test root reached a.test after {:?}",
        seen_at.elapsed()
    );
    let after = fetch(
        &ep,
        Some(
            &context(&a.socket)
                .await
                .bundles
                .get(&td("b.test"))
                .unwrap()
                .clone(),
        ),
    )
    .await
    .unwrap();
    assert!(
        after.sequence > seq0,
        "spiffe_sequence {} did not increase past {seq0}",
        after.sequence
    );

    // An SVID signed by b.test's new CA verifies on a.test once it is active.
    wait_for(
        20,
        "an SVID of b.test signed by the new root, verified on a.test",
        || async {
            let b_ctx = context(&b.socket).await;
            let chain = b_ctx.default_svid().unwrap().chain.clone();
            let mut only_new = BundleSet::new();
            let mut nb = Bundle::new(td("b.test"));
            nb.x509_authorities = vec![new_root.clone()];
            only_new.insert(nb);
            verify(&chain, &only_new).is_ok()
                && verify(&chain, &context(&a.socket).await.bundles).is_ok()
        },
    )
    .await;

    // b.test goes away: a.test keeps the last good bundle.
    let last = context(&a.socket)
        .await
        .bundles
        .get(&td("b.test"))
        .unwrap()
        .clone();
    let b_chain = context(&b.socket)
        .await
        .default_svid()
        .unwrap()
        .chain
        .clone();
    b.kill();
    wait_for(10, "a failed fetch logged by a.test", || async {
        a.log_text().contains("keeping the last good bundle")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = context(&a.socket)
        .await
        .bundles
        .get(&td("b.test"))
        .unwrap()
        .clone();
    assert_eq!(still.x509_authorities, last.x509_authorities);
    let mut set = BundleSet::new();
    set.insert(still);
    assert_eq!(verify(&b_chain, &set).unwrap(), "spiffe://b.test/workload");

    // The refreshes are visible to operators: updates (first fetch, the rotation), failures
    // since b.test went away, and when the last good fetch happened.
    let (status, metrics) =
        common::proxy::http_get(a.health.parse().unwrap(), "/metrics").expect("a.test metrics");
    assert_eq!(status, 200);
    let value = |needle: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let refreshes =
        "svidcar_agent_federation_refreshes_total{trust_domain=\"b.test\",source=\"endpoint\"";
    assert!(
        value(&format!("{refreshes},result=\"updated\"}}")) >= 2.0,
        "{metrics}"
    );
    assert!(
        value(&format!("{refreshes},result=\"error\"}}")) >= 1.0,
        "{metrics}"
    );
    let last_ok = value("svidcar_agent_federation_last_success_seconds{trust_domain=\"b.test\"}");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        last_ok > now - 120.0 && last_ok <= now,
        "last success {last_ok} vs now {now}"
    );
}
