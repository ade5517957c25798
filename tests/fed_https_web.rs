//! Federation over the `https_web` profile: an agent serves its bundle with an operator-given
//! certificate, another agent polls it trusting the operator's CA file. Wrong roots and the
//! wrong profile are refused.
mod common;

use std::time::{Duration, Instant};

use common::{free_port, uid, Agent, TempDir};
use svidcar_agent::agent::federation_client::{fetch, parse_flag};
use svidcar_agent::client::WorkloadApiClient;
use svidcar_agent::spiffe_id::TrustDomain;

/// A CA and a server certificate for `localhost` signed by it: (ca_pem, cert_pem, key_pem).
fn web_pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test web CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

#[tokio::test]
async fn https_web_bundle_endpoint_is_polled_with_the_operator_ca() {
    let dir = TempDir::new("fed-web");
    let (ca, cert, key) = web_pki();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("ca.pem"), ca).unwrap();
    std::fs::write(p("web.pem"), cert).unwrap();
    std::fs::write(p("web-key.pem"), key).unwrap();
    let (other_ca, _, _) = web_pki();
    std::fs::write(p("other-ca.pem"), other_ca).unwrap();
    let port = free_port();

    std::fs::create_dir_all(p("c")).unwrap();
    let c_entry = format!("spiffe://c.test/w=unix:uid:{}", uid());
    let addr = format!("127.0.0.1:{port}");
    let (cert_s, key_s) = (p("web.pem"), p("web-key.pem"));
    let c = Agent::start_in(
        &p("c"),
        &[
            "--trust-domain",
            "c.test",
            "--entry",
            &c_entry,
            "--bundle-endpoint",
            &addr,
            "--bundle-endpoint-cert",
            cert_s.to_str().unwrap(),
            "--bundle-endpoint-key",
            key_s.to_str().unwrap(),
            "--bundle-refresh-hint",
            "1s",
        ],
    );
    std::fs::create_dir_all(p("a")).unwrap();
    let a_entry = format!("spiffe://a.test/w=unix:uid:{}", uid());
    let fed = format!(
        "c.test=https://localhost:{port},https_web,{}",
        p("ca.pem").display()
    );
    let a = Agent::start_in(
        &p("a"),
        &[
            "--trust-domain",
            "a.test",
            "--entry",
            &a_entry,
            "--federate-endpoint",
            &fed,
            "--federation-min-refresh",
            "200ms",
        ],
    );

    let own_c = WorkloadApiClient::connect(&c.socket)
        .await
        .unwrap()
        .fetch_x509_context()
        .await
        .unwrap();
    let c_bundle = own_c.bundles.get(&td("c.test")).unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ctx = WorkloadApiClient::connect(&a.socket)
            .await
            .unwrap()
            .fetch_x509_context()
            .await
            .unwrap();
        if let Some(b) = ctx.bundles.get(&td("c.test")) {
            assert_eq!(b.x509_authorities, c_bundle.x509_authorities);
            // And c.test's SVID verifies on a.test with it.
            let chain = &own_c.default_svid().unwrap().chain;
            let now = rustls::pki_types::UnixTime::now();
            assert_eq!(
                svidcar_agent::svid::verify_chain(chain, &ctx.bundles, now)
                    .unwrap()
                    .to_string(),
                "spiffe://c.test/w"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a.test never received c.test's bundle:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Direct fetches: the right CA works; another CA or the https_spiffe profile is refused.
    let ep = |s: String| parse_flag(&s).unwrap().resolve(&td("a.test")).unwrap();
    let ok = fetch(&ep(fed.clone()), None)
        .await
        .expect("https_web fetch");
    assert_eq!(ok.refresh_hint, Some(Duration::from_secs(1)));
    let wrong = ep(format!(
        "c.test=https://localhost:{port},https_web,{}",
        p("other-ca.pem").display()
    ));
    assert!(fetch(&wrong, None).await.is_err());
    let spiffe = ep(format!("c.test=https://localhost:{port},https_spiffe"));
    assert!(
        fetch(&spiffe, None).await.is_err(),
        "no bootstrap bundle: must refuse"
    );
    assert!(
        fetch(&spiffe, Some(&c_bundle)).await.is_err(),
        "web cert is not an SVID"
    );
}
