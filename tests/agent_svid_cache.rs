//! One X.509-SVID per identity (the agent's SVID cache), seen from real clients of the real
//! agent: Workload API streams (svidcar's Rust client on separate connections) and an SDS
//! `StreamSecrets` stream (Envoy's protocol, generated from Envoy's protos) of the same
//! identity get the same certificate and private key, and all move to the same successor at
//! half life; separate processes of one identity share it too; other identities get others.
mod common;

use std::path::Path;
use std::time::Duration;

use common::{uid, Agent, TempDir, BIN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use svidcar_agent::client::WorkloadApiClient;
use svidcar_agent::X509Svid;
use svidcar_proto::envoy::config::core::v3::data_source::Specifier;
use svidcar_proto::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use svidcar_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use svidcar_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use svidcar_proto::prost::Message;
use tokio::sync::mpsc;
use tonic::transport::Channel;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What identifies one issued SVID: the certificate's serial and its private key (PKCS#8 DER).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issued {
    serial: String,
    key: Vec<u8>,
}

fn serial_of(leaf_der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(leaf_der).expect("leaf parses");
    c.raw_serial_as_string().replace(':', "").to_lowercase()
}

fn of_svid(s: &X509Svid) -> Issued {
    Issued {
        serial: serial_of(s.leaf()),
        key: s.key.secret_pkcs8_der().to_vec(),
    }
}

fn of_secret(s: &Secret) -> Issued {
    let Some(secret::Type::TlsCertificate(t)) = &s.r#type else {
        panic!("{} is not a TLS certificate", s.name)
    };
    let inline = |d: &Option<_>| match d {
        Some(svidcar_proto::envoy::config::core::v3::DataSource {
            specifier: Some(Specifier::InlineBytes(b)),
        }) => b.clone(),
        other => panic!("not inline bytes: {other:?}"),
    };
    Issued {
        serial: serial_of(&CertificateDer::from_pem_slice(&inline(&t.certificate_chain)).unwrap()),
        key: PrivatePkcs8KeyDer::from_pem_slice(&inline(&t.private_key))
            .unwrap()
            .secret_pkcs8_der()
            .to_vec(),
    }
}

async fn sds(socket: &Path) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(common::unix_channel(socket).await)
}

/// An SDS `StreamSecrets` subscription to `default` that ACKs every response, like Envoy.
struct SdsStream {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
    _client: SecretDiscoveryServiceClient<Channel>,
}

impl SdsStream {
    async fn open(socket: &Path) -> Self {
        let mut client = sds(socket).await;
        let (requests, rx) = mpsc::channel(4);
        requests
            .send(DiscoveryRequest {
                resource_names: vec!["default".into()],
                type_url: SECRET_TYPE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let responses = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("StreamSecrets")
            .into_inner();
        Self {
            requests,
            responses,
            _client: client,
        }
    }

    /// The next pushed `default` SVID (the response is ACKed).
    async fn next(&mut self) -> Issued {
        let resp = self
            .responses
            .message()
            .await
            .expect("SDS stream")
            .expect("SDS push");
        self.requests
            .send(DiscoveryRequest {
                version_info: resp.version_info.clone(),
                resource_names: vec!["default".into()],
                type_url: SECRET_TYPE.into(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(resp.resources.len(), 1);
        of_secret(&Secret::decode(resp.resources[0].value.as_slice()).unwrap())
    }
}

/// Awaits `$next` until it yields an SVID other than `$old` (at most 15 s).
macro_rules! successor {
    ($old:expr, $next:expr) => {{
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let got = tokio::time::timeout_at(deadline, $next)
                .await
                .expect("a re-issued SVID within 15 s");
            if got != *$old {
                break got;
            }
        }
    }};
}

fn metric(health: &str, name: &str) -> f64 {
    let (_, body) = common::proxy::http_get(health.parse().unwrap(), "/metrics").unwrap();
    body.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{body}"))
}

#[tokio::test]
async fn workload_api_and_sds_streams_share_one_svid_and_rotate_together() {
    let dir = TempDir::new("svid-cache-rotate");
    let agent = Agent::start_in(
        dir.path(),
        &["--svid-ttl", "4s", "--entry", &Agent::self_entry("shared")],
    );
    let mut c1 = WorkloadApiClient::connect(&agent.socket).await.unwrap();
    let mut c2 = WorkloadApiClient::connect(&agent.socket).await.unwrap();
    let (mut s1, mut s2) = (
        c1.stream_x509_contexts().await.unwrap(),
        c2.stream_x509_contexts().await.unwrap(),
    );
    let mut envoy = SdsStream::open(&agent.socket).await;
    let first = of_svid(&s1.next().await.unwrap().svids[0]);
    assert_eq!(of_svid(&s2.next().await.unwrap().svids[0]), first);
    assert_eq!(
        envoy.next().await,
        first,
        "SDS serves the Workload API's SVID"
    );

    // Half life (~2 s): every stream gets the same successor, with a new key.
    let a = successor!(&first, async {
        of_svid(&s1.next().await.unwrap().svids[0])
    });
    let b = successor!(&first, async {
        of_svid(&s2.next().await.unwrap().svids[0])
    });
    let e = successor!(&first, envoy.next());
    assert_ne!(a.serial, first.serial);
    assert_ne!(a.key, first.key);
    assert_eq!(a, b, "both Workload API streams moved to the same SVID");
    assert_eq!(a, e, "SDS moved to the same SVID");
    assert!(
        !agent.log_text().contains("cannot issue"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test]
async fn streams_arriving_at_once_issue_once_and_other_identities_get_their_own() {
    let dir = TempDir::new("svid-cache-once");
    let link = |name: &str| {
        let to = dir.path().join(name);
        std::fs::hard_link(BIN, &to)
            .or_else(|_| std::fs::copy(BIN, &to).map(|_| ()))
            .unwrap();
        to
    };
    let (app_a, app_b) = (link("app-a"), link("app-b"));
    let me = std::env::current_exe().unwrap();
    let entry = |name: &str, exe: &Path| {
        format!(
            "spiffe://svidcar.local/{name}=unix:uid:{},unix:path:{}",
            uid(),
            exe.display()
        )
    };
    let agent = Agent::start_in(
        dir.path(),
        &[
            "--entry",
            &entry("me", &me),
            "--entry",
            &entry("a", &app_a),
            "--entry",
            &entry("b", &app_b),
        ],
    );
    // Eight Workload API streams and two SDS streams of one identity, opened together.
    let wl = (0..8).map(|_| {
        let socket = agent.socket.clone();
        async move {
            let mut c = WorkloadApiClient::connect(&socket).await.unwrap();
            let ctx = c.fetch_x509_context().await.unwrap();
            assert_eq!(ctx.svids.len(), 1);
            assert_eq!(ctx.svids[0].id.as_str(), "spiffe://svidcar.local/me");
            of_svid(&ctx.svids[0])
        }
    });
    let envoys = (0..2).map(|_| {
        let socket = agent.socket.clone();
        async move { SdsStream::open(&socket).await.next().await }
    });
    let (wl, envoys) = tokio::join!(
        futures_join_all(wl.collect()),
        futures_join_all(envoys.collect())
    );
    let me_svid = wl[0].clone();
    assert!(wl.iter().chain(&envoys).all(|s| *s == me_svid), "{wl:?}");
    assert_eq!(
        metric(&agent.health, "svidcar_agent_x509_svids_issued_total"),
        1.0,
        "ten streams of one identity: one SVID issued"
    );

    // Two other processes (identities a and b), each twice: a's two runs share a's SVID,
    // b has another, and neither is ours.
    let show = |exe: &Path| {
        let out = std::process::Command::new(exe)
            .args(["svid", "show", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}{}", agent.log_text());
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(k))
                .map(|v| v.trim().to_lowercase())
                .unwrap_or_else(|| panic!("no {k} in {text}"))
        };
        (field("SPIFFE ID:"), field("serial:"))
    };
    let (a1, a2, b1) = (show(&app_a), show(&app_a), show(&app_b));
    assert_eq!(a1.0, "spiffe://svidcar.local/a");
    assert_eq!(b1.0, "spiffe://svidcar.local/b");
    assert_eq!(a1, a2, "one identity, two processes: one SVID");
    assert_ne!(a1.1, b1.1);
    assert_ne!(a1.1, me_svid.serial);
    assert_ne!(b1.1, me_svid.serial);
    assert_eq!(
        metric(&agent.health, "svidcar_agent_x509_svids_issued_total"),
        3.0
    );
    assert_eq!(
        metric(&agent.health, "svidcar_agent_svid_cache_identities"),
        3.0
    );
}

/// Awaits all futures (no `futures` crate in the dev-dependencies).
async fn futures_join_all<T: Send + 'static>(
    futs: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
