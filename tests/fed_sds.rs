//! Federated bundles reach SDS and the Workload API only as the caller's entries'
//! `federates_with` allow: a foreign trust domain outside it is absent from the Workload API,
//! left out of SDS `ALL`, and refused (`PERMISSION_DENIED`) when asked for by name.
mod common;

use common::{uid, Agent, TempDir};
use svidcar_agent::client::WorkloadApiClient;
use svidcar_agent::spiffe_id::TrustDomain;
use svidcar_proto::envoy::extensions::transport_sockets::tls::v3::{
    secret, Secret, SpiffeCertValidatorConfig,
};
use svidcar_proto::envoy::service::discovery::v3::DiscoveryRequest;
use svidcar_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use svidcar_proto::prost::Message;
use tonic::transport::Channel;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn ca_pem(td: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{td}").try_into().unwrap(),
    )];
    p.self_signed(&key).unwrap().pem()
}

async fn sds(socket: &std::path::Path) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(common::unix_channel(socket).await)
}

async fn fetch(
    c: &mut SecretDiscoveryServiceClient<Channel>,
    names: &[&str],
) -> Result<Vec<Secret>, tonic::Status> {
    let resp = c
        .fetch_secrets(DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(resp.type_url, SECRET_TYPE);
    Ok(resp
        .resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect())
}

#[tokio::test]
async fn federates_with_filters_workload_api_and_sds() {
    let dir = TempDir::new("fed-sds");
    let (b_pem, c_pem) = (ca_pem("b.test"), ca_pem("c.test"));
    std::fs::write(dir.path().join("b.pem"), &b_pem).unwrap();
    std::fs::write(dir.path().join("c.pem"), &c_pem).unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain: a.test\nentries:\n  - spiffe_id: spiffe://a.test/limited\n    selectors: [\"unix:uid:{}\"]\n    federates_with: [\"c.test\"]\nfederation:\n  - trust_domain: b.test\n    bundle_file: {}\n  - trust_domain: c.test\n    bundle_file: {}\n",
            uid(),
            dir.path().join("b.pem").display(),
            dir.path().join("c.pem").display()
        ),
    )
    .unwrap();
    let agent = Agent::start_in(dir.path(), &["--config", cfg.to_str().unwrap()]);

    // Workload API: own + c.test, never b.test.
    let mut wl = WorkloadApiClient::connect(&agent.socket).await.unwrap();
    let ctx = wl.fetch_x509_context().await.unwrap();
    let td = |s: &str| TrustDomain::parse(s).unwrap();
    assert!(ctx.bundles.get(&td("a.test")).is_some());
    assert!(ctx.bundles.get(&td("c.test")).is_some());
    assert!(ctx.bundles.get(&td("b.test")).is_none());

    // SDS: c.test by name; b.test refused; ALL lists a.test and c.test only.
    let mut c = sds(&agent.socket).await;
    let got = fetch(&mut c, &["spiffe://c.test"]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, "spiffe://c.test");
    let Some(secret::Type::ValidationContext(vc)) = &got[0].r#type else {
        panic!("not a validation context")
    };
    let pem = match vc.trusted_ca.as_ref().and_then(|d| d.specifier.clone()) {
        Some(svidcar_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("trusted_ca {other:?}"),
    };
    assert_eq!(String::from_utf8(pem).unwrap().trim(), c_pem.trim());
    let denied = fetch(&mut c, &["spiffe://b.test"]).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    let all = fetch(&mut c, &["ALL"]).await.unwrap();
    let Some(secret::Type::ValidationContext(vc)) = &all[0].r#type else {
        panic!("ALL")
    };
    let cfg = vc.custom_validator_config.as_ref().unwrap();
    assert_eq!(cfg.name, "envoy.tls.cert_validator.spiffe");
    let spiffe =
        SpiffeCertValidatorConfig::decode(cfg.typed_config.as_ref().unwrap().value.as_slice())
            .unwrap();
    let mut names: Vec<&str> = spiffe
        .trust_domains
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["a.test", "c.test"]);
    // Fetch-all: the SVID by ID and the visible bundles by trust domain ID.
    let mut everything: Vec<String> = fetch(&mut c, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    everything.sort();
    assert_eq!(
        everything,
        [
            "spiffe://a.test",
            "spiffe://a.test/limited",
            "spiffe://c.test"
        ]
    );

    // A federated bundle change is pushed on an open StreamSecrets with a new version.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = |version: &str, nonce: &str| DiscoveryRequest {
        version_info: version.into(),
        resource_names: vec!["spiffe://c.test".into()],
        type_url: SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(req("", "")).await.unwrap();
    let mut stream = c
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    tx.send(req(&first.version_info, &first.nonce))
        .await
        .unwrap();
    let new_c = ca_pem("c.test");
    std::fs::write(dir.path().join("c.pem"), &new_c).unwrap();
    let pushed = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
        .await
        .expect("no push after the c.test bundle changed")
        .unwrap()
        .unwrap();
    assert_ne!(pushed.version_info, first.version_info);
    assert_ne!(pushed.nonce, first.nonce);
    let s = Secret::decode(pushed.resources[0].value.as_slice()).unwrap();
    let Some(secret::Type::ValidationContext(vc)) = &s.r#type else {
        panic!("pushed secret")
    };
    let Some(svidcar_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(pem)) =
        vc.trusted_ca.as_ref().and_then(|d| d.specifier.clone())
    else {
        panic!("pushed trusted_ca");
    };
    assert_eq!(String::from_utf8(pem).unwrap().trim(), new_c.trim());
}
