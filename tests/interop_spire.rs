//! svidcar with real SPIRE v1.13.3 (built by `tests/spire/install.sh`):
//! - SPIRE as the identity plane: a spire-server with join-token node attestation, a
//!   spire-agent with the `unix` workload attestor, and an unchanged svidcar sidecar pair on the
//!   spire-agent socket: traffic flows, policy is enforced on SPIRE identities, and both sidecars
//!   pick up SPIRE's rotated SVIDs (30 s TTL on the entries) with zero failed requests;
//! - svidcar's Workload API client against the spire-agent socket (X.509, JWT-SVIDs, JWT
//!   bundles in SPIRE's standard-JWKS form, validation) and `svidcar svid show`;
//! - federation both ways over the standard bundle endpoint, `https_spiffe` and `https_web`:
//!   svidcar's agent polls the SPIRE server's endpoint, the SPIRE server polls svidcar's agent
//!   (`federates_with`), and sidecars of the two trust domains talk mTLS both ways, each
//!   verifying the other's chain through the federated bundle.
mod common;
mod spire;

use std::time::{Duration, Instant};

use common::proxy::{Sidecar, TestApp};
use common::TempDir;
use spire::mesh::{backend, bundle_domains, frontend, get, link, selectors, svid_field, Traffic};
use spire::SpireServer;

#[test]
fn svidcar_sidecars_on_a_spire_agent_carry_traffic_enforce_policy_and_rotate() {
    let Some(bins) = spire::bin_dir() else { return };
    let dir = TempDir::new("spire-plane");
    let d = dir.path();
    let server = SpireServer::start(&bins, &d.join("server"), "b.test", "", &[]);
    let agent = server.agent(&bins, &d.join("agent"));
    let (fe_bin, be_bin, intruder_bin) = (
        link(d, "frontend-proxy"),
        link(d, "backend-proxy"),
        link(d, "intruder-proxy"),
    );
    let node = server.node_id();
    for (name, bin) in [
        ("frontend", &fe_bin),
        ("backend", &be_bin),
        ("intruder", &intruder_bin),
    ] {
        server.entry(
            &node,
            &format!("spiffe://b.test/{name}"),
            &selectors(bin),
            &["-x509SVIDTTL", "30"],
        );
    }

    let app = TestApp::start("app");
    let (be, in_port) = backend(
        "backend",
        &be_bin,
        &agent.socket,
        d,
        app.port,
        &["spiffe://b.test/frontend"],
    );
    let (fe, out_port) = frontend(
        "frontend",
        &fe_bin,
        &agent.socket,
        d,
        in_port,
        "spiffe://b.test/backend",
    );
    assert_eq!(get(out_port).unwrap(), (200, "hello from app\n".into()));
    let line = be.wait_log(&[
        "peer_id=\"spiffe://b.test/frontend\"",
        "outcome=\"allowed\"",
    ]);
    assert!(line.contains("spiffe://b.test/backend"), "{line}");

    // The SVIDs are SPIRE's: the IDs of the entries, and their 30 s TTL (not SPIRE's 1 h default).
    for (sc, id) in [
        (&fe, "spiffe://b.test/frontend"),
        (&be, "spiffe://b.test/backend"),
    ] {
        assert_eq!(svid_field(sc, "spiffe_id"), id);
        let left = svid_field(sc, "expires_in_seconds").as_u64().unwrap();
        assert!(left <= 30, "{id}: the entry's 30 s TTL, got {left} s left");
        assert_eq!(bundle_domains(sc), vec!["b.test".to_string()]);
    }

    // Policy on SPIRE identities: another SPIRE workload of the same trust domain is refused.
    let (_intruder, intruder_port) = frontend(
        "intruder",
        &intruder_bin,
        &agent.socket,
        d,
        in_port,
        "spiffe://b.test/backend",
    );
    let r = get(intruder_port);
    assert!(!matches!(r, Ok((200, _))), "intruder got through: {r:?}");
    be.wait_log(&["peer_id=\"spiffe://b.test/intruder\"", "outcome=\"denied\""]);

    // Rotation under traffic: both sidecars take SPIRE's next SVIDs (the agent renews at half
    // life) and not one request fails, on new connections or on the open one.
    let serials = |scs: &[&Sidecar]| -> Vec<String> {
        scs.iter()
            .map(|s| {
                svid_field(s, "serial")
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    let first = serials(&[&fe, &be]);
    let traffic = Traffic::start(out_port, "hello from app\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = serials(&[&fe, &be]);
        if now.iter().zip(&first).all(|(n, f)| n != f && !n.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rotation within 60 s: {first:?} -> {now:?}\nagent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failures) = traffic.finish();
    eprintln!(
        "rotated {first:?} -> {:?} with {ok} requests",
        serials(&[&fe, &be])
    );
    assert!(
        failures.is_empty(),
        "{} failed requests during rotation: {failures:?}",
        failures.len()
    );
    assert!(ok > 20, "too little traffic during rotation: {ok}");
    for sc in [&fe, &be] {
        let installs = sc.log_text().matches("installed X.509-SVID").count();
        assert!(installs >= 2, "{}: {installs} SVIDs installed", sc.name);
    }
    assert_eq!(get(out_port).unwrap(), (200, "hello from app\n".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svidcar_client_and_cli_read_the_spire_workload_api() {
    use svidcar_agent::client::WorkloadApiClient;
    use svidcar_agent::spiffe_id::TrustDomain;
    let Some(bins) = spire::bin_dir() else { return };
    let dir = TempDir::new("spire-client");
    let d = dir.path();
    let server = SpireServer::start(&bins, &d.join("server"), "b.test", "", &[]);
    let agent = server.agent(&bins, &d.join("agent"));
    let me = std::env::current_exe().unwrap();
    let cli = link(d, "svid-cli");
    let node = server.node_id();
    server.entry(&node, "spiffe://b.test/probe", &selectors(&me), &[]);
    server.entry(&node, "spiffe://b.test/cli", &selectors(&cli), &[]);

    // The agent learns new entries at its next sync (5 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let ctx = loop {
        let r = async {
            WorkloadApiClient::connect(&agent.socket)
                .await?
                .fetch_x509_context()
                .await
        }
        .await;
        match r {
            Ok(ctx) => break ctx,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the entry: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("no SVID from SPIRE: {e}\n{}", agent.log_text()),
        }
    };
    let b = TrustDomain::parse("b.test").unwrap();
    assert_eq!(
        ctx.default_svid().unwrap().id.as_str(),
        "spiffe://b.test/probe"
    );
    assert!(!ctx.bundles.get(&b).unwrap().x509_authorities.is_empty());

    let mut c = WorkloadApiClient::connect(&agent.socket).await.unwrap();
    let x509_bundles = c.fetch_bundles().await.expect("FetchX509Bundles");
    assert_eq!(
        x509_bundles.get(&b).unwrap().x509_authorities,
        ctx.bundles.get(&b).unwrap().x509_authorities
    );
    // SPIRE sends JWT bundles as standard JWKS (no `use`): they must parse.
    let jwt_bundles = c
        .fetch_jwt_bundles()
        .await
        .expect("FetchJWTBundles from SPIRE");
    let jwt_keys = &jwt_bundles
        .get(&b)
        .expect("b.test JWT bundle")
        .jwt_authorities;
    assert!(!jwt_keys.is_empty());
    let tokens = c
        .fetch_jwt_svid(&["svidcar-aud".to_string()], None)
        .await
        .expect("FetchJWTSVID");
    assert_eq!(tokens[0].id.as_str(), "spiffe://b.test/probe");
    // svidcar validates SPIRE's token locally with the JWT bundle it parsed from SPIRE.
    let local = svidcar_agent::jwt::validate(
        &tokens[0].token,
        "svidcar-aud",
        &jwt_bundles,
        std::time::SystemTime::now(),
    )
    .expect("SPIRE's JWT-SVID validates against SPIRE's JWT bundle");
    assert_eq!(local.id.as_str(), "spiffe://b.test/probe");
    let (id, claims) = c
        .validate_jwt_svid(&tokens[0].token, "svidcar-aud")
        .await
        .expect("ValidateJWTSVID");
    assert_eq!(id.as_str(), "spiffe://b.test/probe");
    assert!(claims.fields.contains_key("aud"), "{claims:?}");
    assert!(c
        .validate_jwt_svid(&tokens[0].token, "other-aud")
        .await
        .is_err());

    // `svidcar svid show` on the spire-agent socket.
    let sock = agent.socket.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&cli)
            .args([
                "svid",
                "show",
                "--socket",
                &sock,
                "--jwt-audience",
                "svidcar-aud",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("spiffe://b.test/cli"), "{text}");
    assert!(
        text.contains("JWT-SVID spiffe://b.test/cli (aud svidcar-aud)"),
        "{text}"
    );
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}

#[test]
fn svidcar_agent_and_spire_server_federate_both_ways_over_https_spiffe() {
    spire::federation::federate_both_ways(spire::federation::Profile::HttpsSpiffe);
}

#[test]
fn svidcar_agent_and_spire_server_federate_both_ways_over_https_web() {
    spire::federation::federate_both_ways(spire::federation::Profile::HttpsWeb);
}
