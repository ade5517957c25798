//! The agent's Workload API with our own tonic client: error codes (header, attestation,
//! arguments), every issued certificate checked field by field, `svidcar svid show`, health and
//! metrics, and the client's reconnecting watch.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Agent, TempDir};
use hyper_util::rt::TokioIo;
use svidcar_agent::client::WorkloadApiClient;
use svidcar_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use svidcar_proto::SpiffeWorkloadApiClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

async fn raw_channel(socket: &Path) -> Channel {
    let p = socket.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .unwrap()
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

#[tokio::test]
async fn missing_or_wrong_header_is_invalid_argument() {
    let dir = TempDir::new("api-header");
    let agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("h")]);
    let mut c = SpiffeWorkloadApiClient::new(raw_channel(&agent.socket).await);
    let code = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(
        c.fetch_x509_bundles(X509BundlesRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.fetch_jwt_bundles(JwtBundlesRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let jwt = JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: String::new(),
    };
    assert_eq!(
        c.fetch_jwtsvid(jwt).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let v = ValidateJwtsvidRequest {
        audience: "a".into(),
        svid: "x.y.z".into(),
    };
    assert_eq!(
        c.validate_jwtsvid(v).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // "false" is not "true".
    let mut r = tonic::Request::new(X509svidRequest {});
    r.metadata_mut()
        .insert("workload.spiffe.io", "false".parse().unwrap());
    assert_eq!(
        c.fetch_x509svid(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // With the header it works.
    let mut s = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().svids.len(), 1);
}

#[tokio::test]
async fn caller_without_entry_is_permission_denied() {
    let dir = TempDir::new("api-denied");
    let other = format!(
        "spiffe://svidcar.local/other=unix:uid:{}",
        common::uid() + 4242
    );
    let agent = Agent::start_in(dir.path(), &["--entry", &other]);
    let mut c = SpiffeWorkloadApiClient::new(raw_channel(&agent.socket).await);
    let e = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let jwt = JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: String::new(),
    };
    assert_eq!(
        c.fetch_jwtsvid(with_header(jwt)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Our client surfaces the same status.
    let err = WorkloadApiClient::connect(&agent.socket)
        .await
        .unwrap()
        .fetch_x509_context()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no registration entry"), "{err}");
    // The refusal is counted.
    let metrics = http_get(&agent.health, "/metrics");
    assert!(
        metrics.contains("svidcar_agent_no_entry_total 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn jwt_argument_errors() {
    let dir = TempDir::new("api-jwt");
    let agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("j")]);
    let mut c = SpiffeWorkloadApiClient::new(raw_channel(&agent.socket).await);
    let no_aud = JwtsvidRequest {
        audience: vec![],
        spiffe_id: String::new(),
    };
    assert_eq!(
        c.fetch_jwtsvid(with_header(no_aud))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let not_mine = JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: "spiffe://svidcar.local/someone-else".into(),
    };
    assert_eq!(
        c.fetch_jwtsvid(with_header(not_mine))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let malformed = JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: "not an id".into(),
    };
    assert_eq!(
        c.fetch_jwtsvid(with_header(malformed))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let mine = JwtsvidRequest {
        audience: vec!["a".into(), "b".into()],
        spiffe_id: "spiffe://svidcar.local/j".into(),
    };
    let resp = c
        .fetch_jwtsvid(with_header(mine))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.svids.len(), 1);
    let token = resp.svids[0].svid.clone();
    for (aud, svid, code) in [
        ("", token.as_str(), Some(Code::InvalidArgument)),
        ("a", "", Some(Code::InvalidArgument)),
        ("a", "garbage", Some(Code::InvalidArgument)),
        ("c", token.as_str(), Some(Code::InvalidArgument)),
        ("b", token.as_str(), None),
    ] {
        let r = c
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: aud.into(),
                svid: svid.into(),
            }))
            .await;
        match code {
            Some(code) => assert_eq!(r.unwrap_err().code(), code, "aud {aud:?}"),
            None => {
                let v = r.unwrap().into_inner();
                assert_eq!(v.spiffe_id, "spiffe://svidcar.local/j");
                let claims = v.claims.unwrap();
                assert!(claims.fields.contains_key("exp") && claims.fields.contains_key("aud"));
            }
        }
    }
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    san.value
        .general_names
        .iter()
        .map(|g| match g {
            GeneralName::URI(u) => u.to_string(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect()
}

/// Checks a leaf against SPIFFE.md's X509-SVID rules.
fn check_leaf(der: &[u8], id: &str, ttl: Duration) {
    let (rest, cert) = parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    assert_eq!(cert.version(), X509Version::V3);
    assert_eq!(uri_sans(&cert), vec![id.to_string()], "exactly one URI SAN");
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("BasicConstraints present");
    assert!(!bc.value.ca, "leaf must have cA=false");
    let ku = cert.key_usage().unwrap().expect("KeyUsage present");
    assert!(ku.critical, "KeyUsage must be critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign() && !ku.value.key_encipherment());
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(cert.public_key().parsed().is_ok());
    assert_eq!(
        cert.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert!(
        nb <= now - 20 && nb >= now - 60,
        "not_before backdated ~30s: {nb} vs {now}"
    );
    assert!(
        (na - now - ttl.as_secs() as i64).abs() <= 5,
        "not_after ~ now + ttl"
    );
    assert!(!cert.raw_serial().is_empty() && cert.raw_serial().iter().any(|b| *b != 0));
    for ext in cert.extensions() {
        if let ParsedExtension::NameConstraints(_) = ext.parsed_extension() {
            panic!("leaf must not carry name constraints");
        }
    }
}

fn check_root(der: &[u8]) {
    let (_, cert) = parse_x509_certificate(der).unwrap();
    assert_eq!(
        uri_sans(&cert),
        vec!["spiffe://svidcar.local".to_string()],
        "root ID has no path"
    );
    assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert_eq!(cert.subject(), cert.issuer());
}

#[tokio::test]
async fn every_issued_certificate_follows_the_x509_svid_rules() {
    let dir = TempDir::new("api-certs");
    let uid = common::uid();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain: svidcar.local\nsvid_ttl: 20m\nentries:\n  - spiffe_id: spiffe://svidcar.local/web\n    selectors: [\"unix:uid:{uid}\"]\n    hint: web\n  - spiffe_id: spiffe://svidcar.local/ns/default/sa/api\n    selectors: [\"unix:uid:{uid}\", \"unix:path:{exe}\"]\n    ttl: 10m\n  - spiffe_id: spiffe://svidcar.local/never\n    selectors: [\"unix:uid:{uid}\", \"unix:gid:999999\"]\n",
            exe = std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    let agent = Agent::start_in(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut c = SpiffeWorkloadApiClient::new(raw_channel(&agent.socket).await);
    let mut s = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let msg = s.message().await.unwrap().unwrap();
    assert_eq!(
        msg.svids.len(),
        2,
        "two entries match (uid; uid+path), the gid one does not"
    );
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://svidcar.local/web");
    assert_eq!(msg.svids[0].hint, "web");
    assert_eq!(
        msg.svids[1].spiffe_id,
        "spiffe://svidcar.local/ns/default/sa/api"
    );
    assert_eq!(
        msg.svids[1].hint, "spiffe://svidcar.local/ns/default/sa/api",
        "default hint = ID"
    );
    check_leaf(
        &msg.svids[0].x509_svid,
        "spiffe://svidcar.local/web",
        Duration::from_secs(1200),
    );
    check_leaf(
        &msg.svids[1].x509_svid,
        "spiffe://svidcar.local/ns/default/sa/api",
        Duration::from_secs(600),
    );
    check_root(&msg.svids[0].bundle);
    assert!(msg.federated_bundles.is_empty());
    for s in &msg.svids {
        // Key is PKCS#8, matches the leaf, chain verifies against the bundle (model's checks).
        let svid =
            svidcar_agent::X509Svid::from_der(&s.x509_svid, &s.x509_svid_key, &s.hint).unwrap();
        let mut set = svidcar_agent::BundleSet::new();
        set.insert(
            svidcar_agent::Bundle::from_x509_der_concat(svid.id.trust_domain(), &s.bundle).unwrap(),
        );
        let id = svidcar_agent::svid::verify_chain(
            &svid.chain,
            &set,
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
        assert_eq!(id.as_str(), s.spiffe_id);
    }
    // Bundles endpoints agree.
    let mut b = c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let bundles = b.message().await.unwrap().unwrap().bundles;
    assert_eq!(
        bundles.keys().collect::<Vec<_>>(),
        vec!["spiffe://svidcar.local"]
    );
    assert_eq!(bundles["spiffe://svidcar.local"], msg.svids[0].bundle);
    let mut j = c
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let jwks = j.message().await.unwrap().unwrap().bundles;
    let v: serde_json::Value = serde_json::from_slice(&jwks["spiffe://svidcar.local"]).unwrap();
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0]["kid"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(keys[0]["use"], "jwt-svid");
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn svid_show_prints_and_writes_files_and_health_works() {
    let dir = TempDir::new("api-show");
    let agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("show")]);
    let out_dir = dir.path().join("out");
    let (ok, stdout, stderr) = common::svidcar(&[
        "svid",
        "show",
        "--socket",
        &format!("unix:{}", agent.socket.display()),
        "--write",
        out_dir.to_str().unwrap(),
        "--jwt-audience",
        "demo",
    ]);
    assert!(ok, "svid show failed: {stderr}");
    assert!(stdout.contains("spiffe://svidcar.local/show"), "{stdout}");
    assert!(stdout.contains("chain:      1 certificate"), "{stdout}");
    assert!(stdout.contains("svidcar.local (1 CA)"), "{stdout}");
    assert!(
        stdout.contains("JWT-SVID spiffe://svidcar.local/show (aud demo)"),
        "{stdout}"
    );
    assert!(!stdout.contains("PRIVATE KEY"));
    let key = out_dir.join("key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    if let Some(openssl) = common::which("openssl") {
        let v = std::process::Command::new(openssl)
            .args(["verify", "-CAfile"])
            .arg(out_dir.join("bundle.pem"))
            .arg(out_dir.join("svid.pem"))
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "openssl verify: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // SPIFFE_ENDPOINT_SOCKET is honoured.
    let out = std::process::Command::new(common::BIN)
        .args(["svid", "show"])
        .env("SPIFFE_ENDPOINT_SOCKET", agent.endpoint())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://svidcar.local/show"));

    assert!(http_get(&agent.health, "/live").starts_with("HTTP/1.1 200"));
    assert!(http_get(&agent.health, "/ready").starts_with("HTTP/1.1 200"));
    let m = http_get(&agent.health, "/metrics");
    for name in [
        "svidcar_agent_x509_svids_issued_total",
        "svidcar_agent_jwt_svids_issued_total 1",
        "svidcar_agent_streams_open",
        "svidcar_agent_ca_not_after_seconds",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
    // The socket is world-connectable by default (SPIRE's default), documented in --help.
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o777);
}

#[tokio::test]
async fn client_watch_keeps_last_context_and_reconnects() {
    let dir = TempDir::new("api-watch");
    let mut agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("w")]);
    let mut rx = svidcar_agent::client::watch_x509_context(agent.socket.clone());
    let first = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| c.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(first.svids[0].id.as_str(), "spiffe://svidcar.local/w");
    assert!(
        agent.stop(),
        "graceful shutdown exits 0:\n{}",
        agent.log_text()
    );
    assert!(!agent.socket.exists(), "socket removed on shutdown");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.borrow().is_some(),
        "last context kept while the agent is away"
    );
    agent.restart();
    let next = tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.svids[0].serial_hex() != first.svids[0].serial_hex())
        }),
    )
    .await
    .expect("reconnected within backoff")
    .unwrap()
    .clone()
    .unwrap();
    assert_eq!(next.svids[0].id, first.svids[0].id);
}
