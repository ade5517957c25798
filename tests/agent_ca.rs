//! The agent's CA and socket lifecycle: restart keeps the root, key file modes, stale socket
//! replacement, CA rotation ordering, upstream intermediate, federated bundle files.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime};

use common::{Agent, TempDir};
use svidcar_agent::client::{to_pem, WorkloadApiClient, X509Context};
use svidcar_agent::{Bundle, TrustDomain};
use x509_parser::prelude::*;

async fn context(agent: &Agent) -> X509Context {
    WorkloadApiClient::connect(&agent.socket)
        .await
        .unwrap()
        .fetch_x509_context()
        .await
        .unwrap()
}

fn own_bundle_der(ctx: &X509Context) -> Vec<u8> {
    ctx.bundles
        .get_by_name("svidcar.local")
        .unwrap()
        .x509_der_concat()
}

#[tokio::test]
async fn restart_keeps_the_root_and_key_files_are_private() {
    let dir = TempDir::new("ca-restart");
    let mut agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("r")]);
    let before = own_bundle_der(&context(&agent).await);
    let mode = |f: &str| {
        std::fs::metadata(agent.state_dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca-key.pem"), 0o600);
    assert_eq!(mode("jwt-key.der"), 0o600);
    assert_eq!(
        std::fs::metadata(&agent.state_dir)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let jwt_before = WorkloadApiClient::connect(&agent.socket)
        .await
        .unwrap()
        .fetch_jwt_bundles()
        .await
        .unwrap();
    agent.restart();
    let after = own_bundle_der(&context(&agent).await);
    assert_eq!(before, after, "restart must keep the trust domain's root");
    let jwt_after = WorkloadApiClient::connect(&agent.socket)
        .await
        .unwrap()
        .fetch_jwt_bundles()
        .await
        .unwrap();
    let own = |set: &svidcar_agent::bundle::BundleSet| {
        set.get_by_name("svidcar.local")
            .expect("own bundle")
            .clone()
    };
    let (jwt_before, jwt_after) = (own(&jwt_before), own(&jwt_after));
    assert_eq!(
        jwt_before.jwt_authorities, jwt_after.jwt_authorities,
        "JWT authorities survive a restart too"
    );
    // spiffe_sequence never goes back: federated peers ignore a bundle whose sequence is not
    // above the one they hold.
    assert!(
        jwt_after.sequence > jwt_before.sequence,
        "bundle sequence went from {} to {} across a restart",
        jwt_before.sequence,
        jwt_after.sequence
    );
    let persisted = std::fs::read_to_string(agent.state_dir.join("bundle-sequence")).unwrap();
    assert_eq!(persisted.trim(), jwt_after.sequence.to_string());
}

#[tokio::test]
async fn stale_socket_is_replaced_but_not_a_live_one_or_a_regular_file() {
    let dir = TempDir::new("ca-socket");
    let mut agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("s")]);
    // A second agent on the live socket refuses to start.
    let second = std::process::Command::new(common::BIN)
        .args(["agent", "--health-addr", "off", "--socket"])
        .arg(&agent.socket)
        .arg("--state-dir")
        .arg(dir.path().join("state2"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another process is serving"));
    // SIGKILL leaves the socket file behind; the next start replaces it.
    agent.kill();
    assert!(agent.socket.exists(), "stale socket left behind");
    agent.restart();
    assert!(agent.log_text().contains("replaced a stale socket file"));
    assert_eq!(context(&agent).await.svids.len(), 1);
    agent.kill();
    // A regular file is never removed.
    std::fs::remove_file(&agent.socket).unwrap();
    std::fs::write(&agent.socket, b"precious").unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["agent", "--health-addr", "off", "--socket"])
        .arg(&agent.socket)
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&agent.socket).unwrap(), b"precious");
}

fn ski(der: &[u8]) -> Vec<u8> {
    let (_, c) = parse_x509_certificate(der).unwrap();
    for e in c.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(k) = e.parsed_extension() {
            return k.0.to_vec();
        }
    }
    panic!("no SKI")
}

fn aki(der: &[u8]) -> Vec<u8> {
    let (_, c) = parse_x509_certificate(der).unwrap();
    for e in c.extensions() {
        if let ParsedExtension::AuthorityKeyIdentifier(k) = e.parsed_extension() {
            return k.key_identifier.as_ref().unwrap().0.to_vec();
        }
    }
    panic!("no AKI")
}

#[tokio::test]
async fn ca_rotation_publishes_the_next_root_before_it_signs() {
    let dir = TempDir::new("ca-rotate");
    let agent = Agent::start_in(
        dir.path(),
        &[
            "--ca-ttl",
            "12s",
            "--svid-ttl",
            "2s",
            "--entry",
            &Agent::self_entry("rot"),
        ],
    );
    let mut c = WorkloadApiClient::connect(&agent.socket).await.unwrap();
    let mut stream = c.stream_x509_contexts().await.unwrap();
    // (signing root SKI, bundle root SKIs, svid not_after) per message.
    let mut seen: Vec<(Vec<u8>, Vec<Vec<u8>>, SystemTime)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(17);
    while Instant::now() < deadline {
        let ctx = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap();
        let svid = &ctx.svids[0];
        assert!(
            svid.not_after > SystemTime::now(),
            "an expired SVID was served"
        );
        let roots: Vec<Vec<u8>> = ctx
            .bundles
            .get_by_name("svidcar.local")
            .unwrap()
            .x509_authorities
            .iter()
            .map(|r| ski(r))
            .collect();
        seen.push((aki(&svid.chain[0]), roots, svid.not_after));
    }
    let signers: Vec<&Vec<u8>> = {
        let mut v: Vec<&Vec<u8>> = Vec::new();
        for (s, _, _) in &seen {
            if v.last() != Some(&s) {
                v.push(s);
            }
        }
        v
    };
    assert!(
        signers.len() >= 2,
        "the CA rotated within 17s of a 12s CA\n{}",
        agent.log_text()
    );
    for (i, (signer, roots, _)) in seen.iter().enumerate() {
        assert!(
            roots.contains(signer),
            "message {i}: signing root not in the bundle"
        );
        if i > 0 && *signer != seen[i - 1].0 {
            // First SVID from a new root: that root was already published in an earlier
            // message, and the previous root is still in the bundle.
            assert!(
                seen[..i].iter().any(|(_, r, _)| r.contains(signer)),
                "message {i}: new root signed before it was in the bundle"
            );
            assert!(
                roots.contains(&seen[i - 1].0),
                "message {i}: old root dropped too early"
            );
        }
    }
    // The first root leaves the bundle once it expired.
    let first = signers[0];
    let last_roots = &seen.last().unwrap().1;
    assert!(
        !last_roots.contains(first),
        "expired root still in the bundle after 17s"
    );
}

/// The agent's own JWT authorities (kid → key) as served by FetchJWTBundles.
async fn own_jwt_keys(
    agent: &Agent,
) -> std::collections::BTreeMap<String, svidcar_agent::bundle::JwtKey> {
    let set = WorkloadApiClient::connect(&agent.socket)
        .await
        .unwrap()
        .fetch_jwt_bundles()
        .await
        .unwrap();
    set.get_by_name("svidcar.local")
        .unwrap()
        .jwt_authorities
        .clone()
}

/// A bundle set holding only the JWT key `kid` of `keys`.
fn only_key(
    keys: &std::collections::BTreeMap<String, svidcar_agent::bundle::JwtKey>,
    kid: &str,
) -> svidcar_agent::bundle::BundleSet {
    let mut b = Bundle::new(TrustDomain::parse("svidcar.local").unwrap());
    b.add_jwt_key(keys[kid].clone());
    let mut set = svidcar_agent::bundle::BundleSet::new();
    set.insert(b);
    set
}

#[tokio::test]
async fn jwt_keys_rotate_with_the_ca_and_old_tokens_stay_valid() {
    let dir = TempDir::new("ca-jwt-rotate");
    let agent = Agent::start_in(
        dir.path(),
        &[
            "--ca-ttl",
            "12s",
            "--svid-ttl",
            "2s",
            "--jwt-svid-ttl",
            "60s",
            "--entry",
            &Agent::self_entry("jwt"),
        ],
    );
    let token = || async {
        WorkloadApiClient::connect(&agent.socket)
            .await
            .unwrap()
            .fetch_jwt_svid(&["aud".to_string()], None)
            .await
            .unwrap()
            .remove(0)
            .token
    };
    let signed_by = |t: &str, keys, kid: &str| {
        svidcar_agent::jwt::validate(t, "aud", &only_key(keys, kid), SystemTime::now()).is_ok()
    };
    let first_keys = own_jwt_keys(&agent).await;
    assert_eq!(first_keys.len(), 1, "one JWT key at start");
    let first = first_keys.keys().next().unwrap().clone();
    let old_token = token().await;
    assert!(signed_by(&old_token, &first_keys, &first));

    // The next key is published (with the next root) before it signs anything.
    let deadline = Instant::now() + Duration::from_secs(15);
    let keys = loop {
        let keys = own_jwt_keys(&agent).await;
        if keys.len() >= 2 {
            break keys;
        }
        assert!(Instant::now() < deadline, "no next JWT key within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let second = keys.keys().find(|k| **k != first).unwrap().clone();
    let t = token().await;
    assert!(
        signed_by(&t, &keys, &first) || signed_by(&t, &keys, &second),
        "signed by a published key"
    );

    // Then it signs; the old key stays in the bundle while its tokens live.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = token().await;
        if signed_by(&t, &keys, &second) {
            break;
        }
        assert!(signed_by(&t, &keys, &first), "signed by an unpublished key");
        assert!(
            Instant::now() < deadline,
            "the next JWT key did not start signing within 15 s:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = own_jwt_keys(&agent).await;
    assert!(
        after.contains_key(&first) && after.contains_key(&second),
        "{after:?}"
    );
    let (id, _) = WorkloadApiClient::connect(&agent.socket)
        .await
        .unwrap()
        .validate_jwt_svid(&old_token, "aud")
        .await
        .expect("a token of the retired key still validates");
    assert_eq!(id.as_str(), "spiffe://svidcar.local/jwt");
}

#[tokio::test]
async fn upstream_intermediate_signs_with_its_chain() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let dir = TempDir::new("ca-upstream");
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::default();
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    rp.subject_alt_names = vec![SanType::URI("spiffe://svidcar.local".try_into().unwrap())];
    rp.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream root");
    let root = rp.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(rp, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::default();
    ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.subject_alt_names = vec![SanType::URI("spiffe://svidcar.local".try_into().unwrap())];
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "node intermediate");
    let int = ip.signed_by(&int_key, &issuer).unwrap();
    let cert_file = dir.path().join("int.pem");
    std::fs::write(&cert_file, format!("{}{}", int.pem(), root.pem())).unwrap();
    let key_file = dir.path().join("int-key.pem");
    std::fs::write(&key_file, int_key.serialize_pem()).unwrap();
    // The agent refuses an upstream key readable by others (file_safety).
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let agent = Agent::start_in(
        dir.path(),
        &[
            "--upstream-cert",
            cert_file.to_str().unwrap(),
            "--upstream-key",
            key_file.to_str().unwrap(),
            "--entry",
            &Agent::self_entry("up"),
        ],
    );
    let ctx = context(&agent).await;
    let svid = &ctx.svids[0];
    assert_eq!(svid.chain.len(), 2, "leaf + intermediate");
    assert_eq!(svid.chain[1].as_ref(), int.der().as_ref());
    assert_eq!(
        own_bundle_der(&ctx),
        root.der().to_vec(),
        "bundle = upstream root only"
    );
    let id = svidcar_agent::svid::verify_chain(
        &svid.chain,
        &ctx.bundles,
        rustls::pki_types::UnixTime::now(),
    )
    .unwrap();
    assert_eq!(id.as_str(), "spiffe://svidcar.local/up");
    assert!(
        !agent.state_dir.join("ca-key.pem").exists(),
        "no embedded root in upstream mode"
    );
}

fn foreign_root(td: &str) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    p.self_signed(&key).unwrap().der().to_vec()
}

#[tokio::test]
async fn federated_bundle_files_are_served_and_reloaded() {
    let dir = TempDir::new("ca-fed");
    let file = dir.path().join("other.pem");
    let first = foreign_root("other.org");
    std::fs::write(&file, to_pem("CERTIFICATE", &first)).unwrap();
    let missing = dir.path().join("missing.json");
    let agent = Agent::start_in(
        dir.path(),
        &[
            "--federate",
            &format!("other.org={}", file.display()),
            "--federate",
            &format!("later.org={}", missing.display()),
            "--entry",
            &Agent::self_entry("fed"),
        ],
    );
    let mut c = WorkloadApiClient::connect(&agent.socket).await.unwrap();
    let mut stream = c.stream_x509_contexts().await.unwrap();
    let ctx = stream.next().await.unwrap();
    let other = ctx
        .bundles
        .get_by_name("other.org")
        .expect("federated bundle served");
    assert_eq!(other.x509_der_concat(), first);
    assert!(ctx.bundles.get_by_name("later.org").is_none());
    let bundles = c.fetch_bundles().await.unwrap();
    assert_eq!(bundles.len(), 2);

    // Replace the file with a JWKS bundle holding a new root: pushed on the open stream.
    let second = foreign_root("other.org");
    let mut b = Bundle::new(TrustDomain::parse("other.org").unwrap());
    b.x509_authorities = vec![second.clone().into()];
    std::fs::write(&file, b.to_jwks()).unwrap();
    // A broken file for the other domain is ignored (logged) without harm.
    std::fs::write(&missing, b"{not json").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ctx = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .expect("pushed")
            .unwrap();
        if ctx
            .bundles
            .get_by_name("other.org")
            .unwrap()
            .x509_der_concat()
            == second
        {
            assert!(ctx.bundles.get_by_name("later.org").is_none());
            break;
        }
    }
    assert!(agent.log_text().contains("federated bundle changed"));
}

#[tokio::test]
async fn entry_federates_with_limits_the_foreign_bundles() {
    let dir = TempDir::new("ca-fedwith");
    let a = dir.path().join("a.pem");
    let b = dir.path().join("b.pem");
    std::fs::write(&a, to_pem("CERTIFICATE", &foreign_root("a.org"))).unwrap();
    std::fs::write(&b, to_pem("CERTIFICATE", &foreign_root("b.org"))).unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "federation:\n  - {{trust_domain: a.org, bundle_file: {}}}\n  - {{trust_domain: b.org, bundle_file: {}}}\nentries:\n  - spiffe_id: spiffe://svidcar.local/only-a\n    selectors: [\"unix:uid:{}\"]\n    federates_with: [a.org]\n",
            a.display(),
            b.display(),
            common::uid()
        ),
    )
    .unwrap();
    let agent = Agent::start_in(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let ctx = context(&agent).await;
    let mut tds: Vec<&str> = ctx.bundles.iter().map(|b| b.trust_domain.name()).collect();
    tds.sort();
    assert_eq!(tds, vec!["a.org", "svidcar.local"]);
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = TempDir::new("ca-badcfg");
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(&cfg, "trust_domian: typo.org\n").unwrap();
    let (ok, _, err) = common::svidcar(&["agent", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("trust_domian"), "{err}");
    let (ok, _, err) = common::svidcar(&["agent", "--entry", "spiffe://svidcar.local/x"]);
    assert!(!ok && err.contains("SPIFFE_ID=SELECTOR"), "{err}");
    let (ok, _, err) = common::svidcar(&["agent", "--entry", "spiffe://other.org/x=unix:uid:1"]);
    assert!(!ok && err.contains("not in our trust domain"), "{err}");
    let (ok, _, err) = common::svidcar(&["agent", "--svid-ttl", "1 fortnight"]);
    assert!(!ok && err.contains("invalid duration"), "{err}");
    let (ok, _, err) = common::svidcar(&["agent", "--trust-domain", "Bad_Domain!"]);
    assert!(!ok && err.contains("invalid trust domain"), "{err}");
}
