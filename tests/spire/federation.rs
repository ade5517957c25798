//! Federation between svidcar's agent (trust domain `a.test`) and a real SPIRE server
//! (`b.test`) over the standard SPIFFE bundle endpoint, both ways, in one profile:
//! - svidcar's agent polls the SPIRE server's `federation.bundle_endpoint`
//!   (`--federate-endpoint`); for `https_spiffe` bootstrapped with SPIRE's bundle
//!   (`--federate b.test=FILE`) and expecting `spiffe://b.test/spire/server`;
//! - the SPIRE server polls svidcar's `--bundle-endpoint` through a static `federates_with`
//!   block; for `https_spiffe` bootstrapped with `spire-server bundle set` and expecting
//!   `spiffe://a.test/svidcar/bundle-endpoint`; for `https_web` trusting a test web CA
//!   (`SSL_CERT_FILE`, which Go's system roots honor);
//! - then sidecars of both domains (svidcar agent socket / spire-agent socket) call each other
//!   over mTLS, each verifying the other's chain with the federated bundle, under policies
//!   that admit exactly the foreign caller; a SPIRE workload whose entry does not federate with
//!   `a.test` has no `a.test` bundle and cannot reach it.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use svidcar_agent::bundle::Bundle;
use svidcar_agent::client::WorkloadApiClient;
use svidcar_agent::spiffe_id::TrustDomain;

use super::mesh::{backend, bundle_domains, frontend, get, link, selectors};
use super::{bin_dir, SpireServer};
use crate::common::proxy::TestApp;
use crate::common::{free_port, uid, Agent, TempDir};

/// The bundle endpoint profile used in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    HttpsSpiffe,
    HttpsWeb,
}

fn block<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    let mut v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates");
    v.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
    v
}

fn sorted(mut v: Vec<CertificateDer<'static>>) -> Vec<CertificateDer<'static>> {
    v.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
    v
}

/// A test web CA and a `localhost` server certificate per name, written to `dir`:
/// `ca.pem`, `<name>.pem`, `<name>-key.pem`.
fn web_pki(dir: &Path, names: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "interop web CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for name in names {
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// The `federation { … }` block of the SPIRE server (the README shows the same).
/// `file_sync_interval` is documented as defaulting to 1h, but v1.13.3 refuses to start
/// without it (`time: invalid duration ""`).
fn spire_federation(profile: Profile, dir: &Path, spire_port: u16, svidcar_port: u16) -> String {
    let (serve, poll, url) = match profile {
        Profile::HttpsSpiffe => (
            "profile \"https_spiffe\" {}".to_string(),
            "bundle_endpoint_profile \"https_spiffe\" {\n                endpoint_spiffe_id = \"spiffe://a.test/svidcar/bundle-endpoint\"\n            }".to_string(),
            format!("https://127.0.0.1:{svidcar_port}"),
        ),
        Profile::HttpsWeb => (
            format!(
                "profile \"https_web\" {{\n                serving_cert_file {{\n                    cert_file_path = \"{}\"\n                    key_file_path = \"{}\"\n                    file_sync_interval = \"1h\"\n                }}\n            }}",
                dir.join("spire-web.pem").display(),
                dir.join("spire-web-key.pem").display()
            ),
            "bundle_endpoint_profile \"https_web\" {}".to_string(),
            format!("https://localhost:{svidcar_port}"),
        ),
    };
    format!(
        r#"    federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {spire_port}
            refresh_hint = "5s"
            {serve}
        }}
        federates_with "a.test" {{
            bundle_endpoint_url = "{url}"
            {poll}
        }}
    }}"#
    )
}

/// Waits (up to `secs`) for `f` to give `Some`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs}s: {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The whole scenario for one profile (see the module doc).
pub fn federate_both_ways(profile: Profile) {
    let Some(bins) = bin_dir() else { return };
    let dir = TempDir::new(&format!("spire-fed-{profile:?}").to_lowercase());
    let d = dir.path();
    let web = profile == Profile::HttpsWeb;
    if web {
        web_pki(d, &["spire-web", "svidcar-web"]);
    }
    let ca = d.join("ca.pem").display().to_string();
    let (spire_port, svidcar_port) = (free_port(), free_port());
    let fed = spire_federation(profile, d, spire_port, svidcar_port);
    let env: Vec<(&str, &str)> = if web {
        vec![("SSL_CERT_FILE", &ca)]
    } else {
        vec![]
    };
    let server = SpireServer::start(&bins, &d.join("spire-server"), "b.test", &fed, &env);

    // svidcar's agent of a.test.
    let [a_fe_bin, a_be_bin, b_fe_bin, b_be_bin, lonely_bin] = [
        "a-frontend",
        "a-backend",
        "b-frontend",
        "b-backend",
        "b-lonely",
    ]
    .map(|n| link(d, n));
    let me = std::env::current_exe().unwrap();
    let entry = |id: &str, bin: &Path| {
        format!(
            "spiffe://a.test/{id}=unix:uid:{},unix:path:{}",
            uid(),
            bin.display()
        )
    };
    let (e_fe, e_be, e_probe) = (
        entry("frontend", &a_fe_bin),
        entry("backend", &a_be_bin),
        entry("probe", &me),
    );
    let endpoint = format!("127.0.0.1:{svidcar_port}");
    let bootstrap = d.join("b.test-bootstrap.pem");
    let (fed_file, fed_ep);
    let (web_cert, web_key) = (d.join("svidcar-web.pem"), d.join("svidcar-web-key.pem"));
    let mut args = vec![
        "--trust-domain",
        "a.test",
        "--entry",
        &e_fe,
        "--entry",
        &e_be,
        "--entry",
        &e_probe,
        "--bundle-endpoint",
        &endpoint,
        "--bundle-refresh-hint",
        "1s",
        "--federation-min-refresh",
        "200ms",
    ];
    if web {
        fed_ep = format!("b.test=https://localhost:{spire_port},https_web,{ca}");
        args.extend([
            "--bundle-endpoint-cert",
            web_cert.to_str().unwrap(),
            "--bundle-endpoint-key",
            web_key.to_str().unwrap(),
            "--federate-endpoint",
            &fed_ep,
        ]);
    } else {
        // Out of band, as an operator would copy it: SPIRE's current bundle.
        std::fs::write(&bootstrap, server.bundle_pem()).unwrap();
        fed_file = format!("b.test={}", bootstrap.display());
        fed_ep = format!(
            "b.test=https://127.0.0.1:{spire_port},https_spiffe,spiffe://b.test/spire/server"
        );
        args.extend(["--federate", &fed_file, "--federate-endpoint", &fed_ep]);
    }
    let agent_dir = d.join("svidcar-agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let a = Agent::start_in(&agent_dir, &args);

    // SPIRE fetches svidcar's endpoint. https_spiffe: bootstrapped with svidcar's root. SPIRE
    // polls at most once a minute, so ask it to refresh now (what an operator can do too).
    if !web {
        let root = a.state_dir.join("ca-cert.pem");
        server.cli(
            &["bundle", "set"],
            &[
                "-id",
                "spiffe://a.test",
                "-path",
                root.to_str().unwrap(),
                "-format",
                "pem",
            ],
        );
    }
    let spire_view = wait_for(30, "SPIRE fetching svidcar's bundle endpoint", || {
        let _ = server.try_cli(&["federation", "refresh"], &["-id", "spiffe://a.test"]);
        // JWT keys are only in the endpoint's bundle, not in a PEM bootstrap.
        server
            .federated_bundle("a.test")
            .filter(|b| b.contains("jwt-svid"))
    });
    let spire_view = Bundle::from_jwks(td("a.test"), spire_view.as_bytes())
        .expect("svidcar parses SPIRE's copy of its bundle");
    let (own_x509, own_jwt) = block(async {
        let mut c = WorkloadApiClient::connect(&a.socket).await?;
        let x509 = c.fetch_x509_context().await?;
        let jwt = c.fetch_jwt_bundles().await?;
        Ok::<_, svidcar_agent::client::ClientError>((x509, jwt))
    })
    .expect("svidcar agent serves the probe");
    let a_td = td("a.test");
    assert_eq!(
        sorted(spire_view.x509_authorities.clone()),
        sorted(
            own_x509
                .bundles
                .get(&a_td)
                .unwrap()
                .x509_authorities
                .clone()
        )
    );
    assert_eq!(
        spire_view.jwt_authorities.keys().collect::<Vec<_>>(),
        own_jwt
            .get(&a_td)
            .unwrap()
            .jwt_authorities
            .keys()
            .collect::<Vec<_>>()
    );

    // svidcar fetches SPIRE's endpoint (JWT keys again prove it is not the bootstrap file).
    let b_in_a = wait_for(30, "svidcar fetching SPIRE's bundle endpoint", || {
        block(async {
            let mut c = WorkloadApiClient::connect(&a.socket).await.ok()?;
            let jwt = c.fetch_jwt_bundles().await.ok()?;
            if jwt.get(&td("b.test"))?.jwt_authorities.is_empty() {
                return None;
            }
            c.fetch_x509_context()
                .await
                .ok()?
                .bundles
                .get(&td("b.test"))
                .cloned()
        })
    });
    assert_eq!(
        sorted(b_in_a.x509_authorities),
        pem_certs(&server.bundle_pem())
    );

    // SPIRE's workloads: two that federate with a.test (its bundle must exist first), one not.
    let node = server.node_id();
    let fw = ["-federatesWith", "spiffe://a.test"];
    server.entry(
        &node,
        "spiffe://b.test/frontend",
        &selectors(&b_fe_bin),
        &fw,
    );
    server.entry(&node, "spiffe://b.test/backend", &selectors(&b_be_bin), &fw);
    server.entry(
        &node,
        "spiffe://b.test/lonely",
        &selectors(&lonely_bin),
        &[],
    );
    let spire_agent = server.agent(&bins, &d.join("spire-agent"));

    let (app_a, app_b) = (TestApp::start("app-a"), TestApp::start("app-b"));
    // a.test's backend admits `lonely` too: what stops it below is the chain, not the policy.
    let (a_be, a_in) = backend(
        "a-backend",
        &a_be_bin,
        &a.socket,
        d,
        app_a.port,
        &["spiffe://b.test/frontend", "spiffe://b.test/lonely"],
    );
    let (b_be, b_in) = backend(
        "b-backend",
        &b_be_bin,
        &spire_agent.socket,
        d,
        app_b.port,
        &["spiffe://a.test/frontend"],
    );
    let (a_fe, a_out) = frontend(
        "a-frontend",
        &a_fe_bin,
        &a.socket,
        d,
        b_in,
        "spiffe://b.test/backend",
    );
    let (b_fe, b_out) = frontend(
        "b-frontend",
        &b_fe_bin,
        &spire_agent.socket,
        d,
        a_in,
        "spiffe://a.test/backend",
    );

    // a.test (svidcar) -> b.test (SPIRE), and back.
    assert_eq!(get(a_out).unwrap(), (200, "hello from app-b\n".into()));
    b_be.wait_log(&[
        "peer_id=\"spiffe://a.test/frontend\"",
        "outcome=\"allowed\"",
    ]);
    assert_eq!(get(b_out).unwrap(), (200, "hello from app-a\n".into()));
    a_be.wait_log(&[
        "peer_id=\"spiffe://b.test/frontend\"",
        "outcome=\"allowed\"",
    ]);
    for sc in [&a_fe, &a_be, &b_fe, &b_be] {
        assert_eq!(bundle_domains(sc), ["a.test", "b.test"], "{}", sc.name);
    }

    // Without the federated bundle the chain does not verify: SPIRE's `lonely` entry has no
    // federatesWith, so its sidecar holds only b.test's bundle and cannot reach a.test.
    let (lonely, lonely_out) = frontend(
        "b-lonely",
        &lonely_bin,
        &spire_agent.socket,
        d,
        a_in,
        "spiffe://a.test/backend",
    );
    assert_eq!(bundle_domains(&lonely), ["b.test"]);
    let r = get(lonely_out);
    assert!(
        !matches!(r, Ok((200, _))),
        "a non-federated SPIRE workload got through: {r:?}"
    );
    lonely.wait_log(&[
        "outcome=\"handshake_failed\"",
        "no trust bundle for trust domain \\\"a.test\\\"",
    ]);
    assert!(
        !a_be.log_text().contains("spiffe://b.test/lonely"),
        "{}",
        a_be.log_text()
    );

    // Both fetches went over the endpoints, as the two logs say.
    assert!(
        a.log_text()
            .lines()
            .any(|l| l.contains("federated bundle updated from its endpoint")
                && l.contains("b.test")),
        "{}",
        a.log_text()
    );
    let spire_log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        spire_log
            .lines()
            .any(|l| l.contains("Bundle refreshed") && l.contains("a.test")),
        "{spire_log}"
    );
}
