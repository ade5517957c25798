//! Interop: the Rust `spiffe` crate (0.19, written by others) against the real agent binary.
mod common;

use std::time::Duration;

use common::{Agent, TempDir};
use spiffe::{TrustDomain, WorkloadApiClient, X509Source};

#[tokio::test]
async fn rust_spiffe_client_fetches_x509_bundles_and_jwt() {
    let dir = TempDir::new("rs-spiffe");
    let agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("rs")]);
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();

    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://svidcar.local/rs");
    assert_eq!(svid.cert_chain().len(), 1);

    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 1);
    let td = TrustDomain::new("svidcar.local").unwrap();
    let bundle = ctx
        .bundle_set()
        .get(&td)
        .expect("own bundle in the context");
    assert_eq!(bundle.authorities().len(), 1);

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let own = bundles.get(&td).expect("own bundle");
    assert_eq!(
        own.authorities()[0].as_bytes(),
        bundle.authorities()[0].as_bytes()
    );

    let jwt = client.fetch_jwt_svid(["rust-aud"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://svidcar.local/rs");
    assert_eq!(jwt.audience(), ["rust-aud".to_string()]);
    assert!(!jwt.key_id().is_empty());
    let validated = client
        .validate_jwt_token("rust-aud", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), jwt.spiffe_id());
    assert!(
        client
            .validate_jwt_token("other-aud", jwt.token())
            .await
            .is_err(),
        "wrong audience rejected"
    );

    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let jb = jwt_bundles.get(&td).expect("own JWT bundle");
    assert!(
        jb.find_jwt_authority(jwt.key_id()).is_some(),
        "token's kid is in the JWT bundle"
    );
}

#[tokio::test]
async fn rust_spiffe_x509_source_follows_rotation() {
    let dir = TempDir::new("rs-source");
    let agent = Agent::start_in(
        dir.path(),
        &["--svid-ttl", "2s", "--entry", &Agent::self_entry("src")],
    );
    let source = X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), "spiffe://svidcar.local/src");
    // Over 4 s of 2 s SVIDs (rotated at half life) the source must hold >= 3 distinct SVIDs,
    // and never an expired one.
    let mut distinct = std::collections::BTreeSet::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < end {
        let svid = source.svid().unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(
            leaf.validity().not_after.timestamp() > now.as_secs() as i64,
            "expired SVID held"
        );
        distinct.insert(svid.leaf().as_bytes().to_vec());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        distinct.len() >= 3,
        "X509Source saw only {} SVIDs in 4s",
        distinct.len()
    );
}
