//! Multi-node trust with `svidcar ca`: one offline root, one intermediate per node, two real
//! agents in the same trust domain; each node's SVIDs verify against the other node's bundle.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{uid, Agent, TempDir, BIN};
use rustls::pki_types::UnixTime;
use svidcar_agent::client::{WorkloadApiClient, X509Context};
use svidcar_agent::svid::verify_chain;

const TD: &str = "multinode.example";

fn svidcar(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run svidcar")
}

fn ok(args: &[&str]) -> String {
    let out = svidcar(args);
    assert!(
        out.status.success(),
        "svidcar {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `svidcar ca issue` for `node` of trust domain `td` from the root in `root_dir` into `out`.
fn ca_issue(root_dir: &Path, td: &str, node: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "ca",
        "issue",
        "--root-dir",
        s(root_dir),
        "--trust-domain",
        td,
        "--node",
        node,
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    svidcar(&args)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn context(agent: &Agent) -> X509Context {
    WorkloadApiClient::connect(&agent.socket)
        .await
        .unwrap()
        .fetch_x509_context()
        .await
        .unwrap()
}

fn start_node(base: &Path, nodes: &Path, node: &str) -> Agent {
    let dir = base.join(node);
    std::fs::create_dir_all(&dir).unwrap();
    let entry = format!("spiffe://{TD}/{node}/app=unix:uid:{}", uid());
    Agent::start_in(
        &dir,
        &[
            "--trust-domain",
            TD,
            "--upstream-cert",
            s(&nodes.join(format!("{node}-cert.pem"))),
            "--upstream-key",
            s(&nodes.join(format!("{node}-key.pem"))),
            "--upstream-bundle",
            s(&nodes.join("root-cert.pem")),
            "--entry",
            &entry,
        ],
    )
}

#[tokio::test]
async fn two_nodes_share_one_trust_domain() {
    let dir = TempDir::new("ca-multinode");
    let root_dir = dir.path().join("root");
    let nodes = dir.path().join("nodes");
    ok(&["ca", "init", "--trust-domain", TD, "--out", s(&root_dir)]);
    assert_eq!(mode(&root_dir), 0o700);
    assert_eq!(mode(&root_dir.join("root-key.pem")), 0o600);
    for node in ["node-a", "node-b"] {
        let out = ca_issue(&root_dir, TD, node, &nodes, &["--ttl", "2d"]);
        assert!(out.status.success());
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(!out.contains("PRIVATE KEY"), "keys are never printed");
        assert_eq!(mode(&nodes.join(format!("{node}-key.pem"))), 0o600);
    }
    assert_eq!(mode(&nodes), 0o700);

    let a = start_node(dir.path(), &nodes, "node-a");
    let b = start_node(dir.path(), &nodes, "node-b");
    let (ctx_a, ctx_b) = (context(&a).await, context(&b).await);
    let root = std::fs::read_to_string(root_dir.join("root-cert.pem")).unwrap();
    for (ctx, other, node) in [(&ctx_a, &ctx_b, "node-a"), (&ctx_b, &ctx_a, "node-b")] {
        let svid = &ctx.svids[0];
        assert_eq!(svid.chain.len(), 2, "leaf + the node's intermediate");
        let bundle = other
            .bundles
            .get_by_name(TD)
            .expect("the other node's bundle");
        assert_eq!(bundle.x509_authorities.len(), 1, "the shared root only");
        assert_eq!(
            svidcar_agent::client::to_pem("CERTIFICATE", &bundle.x509_authorities[0]),
            root,
            "the bundle is the root from `svidcar ca init`"
        );
        let id = verify_chain(&svid.chain, &other.bundles, UnixTime::now())
            .unwrap_or_else(|e| panic!("{node}'s SVID against the other node's bundle: {e}"));
        assert_eq!(id.as_str(), format!("spiffe://{TD}/{node}/app"));
    }
    // The two nodes sign with different intermediates.
    assert_ne!(ctx_a.svids[0].chain[1], ctx_b.svids[0].chain[1]);
}

#[test]
fn issue_refuses_another_trust_domain_and_overwrites() {
    let dir = TempDir::new("ca-multinode-refuse");
    let root_dir = dir.path().join("root");
    let nodes = dir.path().join("nodes");
    ok(&["ca", "init", "--trust-domain", TD, "--out", s(&root_dir)]);
    let issue = |td: &str, extra: &[&str]| ca_issue(&root_dir, td, "n1", &nodes, extra);
    let out = issue("other.example", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the root is for \"multinode.example\", not \"other.example\""),
        "{err}"
    );
    assert!(!nodes.join("n1-key.pem").exists(), "nothing written");

    assert!(issue(TD, &[]).status.success());
    let key = std::fs::read(nodes.join("n1-key.pem")).unwrap();
    let out = issue(TD, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(nodes.join("n1-key.pem")).unwrap(), key);
    assert!(issue(TD, &["--force"]).status.success());
    assert_ne!(std::fs::read(nodes.join("n1-key.pem")).unwrap(), key);
    assert_eq!(mode(&nodes.join("n1-key.pem")), 0o600);

    let again = svidcar(&["ca", "init", "--trust-domain", TD, "--out", s(&root_dir)]);
    assert!(!again.status.success(), "init never overwrites a root");
}

/// Runs `svidcar agent` with `args`; it must exit (non-zero) within 10 s: its stderr.
fn agent_refuses(dir: &Path, args: &[&str]) -> String {
    let sock = dir.join("refused.sock");
    let state = dir.join("refused-state");
    let mut child = Command::new(BIN)
        .args(["agent", "--socket", s(&sock), "--state-dir", s(&state)])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the agent started with {args:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(!sock.exists(), "no Workload API socket was created");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_upstream_intermediate_of_another_domain_or_root_is_refused_at_start() {
    let dir = TempDir::new("ca-multinode-upstream-check");
    let (root_a, root_b, nodes) = (
        dir.path().join("root-a"),
        dir.path().join("root-b"),
        dir.path().join("nodes"),
    );
    ok(&["ca", "init", "--trust-domain", TD, "--out", s(&root_a)]);
    ok(&["ca", "init", "--trust-domain", TD, "--out", s(&root_b)]);
    assert!(ca_issue(&root_a, TD, "n1", &nodes, &[]).status.success());
    let (cert, key) = (nodes.join("n1-cert.pem"), nodes.join("n1-key.pem"));
    let upstream = |td: &str, bundle: &Path| {
        agent_refuses(
            dir.path(),
            &[
                "--trust-domain",
                td,
                "--upstream-cert",
                s(&cert),
                "--upstream-key",
                s(&key),
                "--upstream-bundle",
                s(bundle),
            ],
        )
    };
    // The node intermediate names multinode.example; the agent is told other.example.
    let err = upstream("other.example", &root_a.join("root-cert.pem"));
    assert!(
        err.contains("is for trust domain \"multinode.example\"")
            && err.contains("serves \"other.example\""),
        "{err}"
    );
    // Right domain, but the bundle holds another root than the one that signed the node.
    let err = upstream(TD, &root_b.join("root-cert.pem"));
    assert!(
        err.contains("does not verify against the 1 upstream root"),
        "{err}"
    );
}

#[tokio::test]
async fn a_renewed_upstream_intermediate_is_picked_up_without_restart() {
    let dir = TempDir::new("ca-multinode-renew");
    let (root_dir, nodes) = (dir.path().join("root"), dir.path().join("nodes"));
    ok(&["ca", "init", "--trust-domain", TD, "--out", s(&root_dir)]);
    let issue = |extra: &[&str]| {
        let out = ca_issue(&root_dir, TD, "n1", &nodes, extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    issue(&[]);
    let agent = start_node(dir.path(), &nodes, "n1");
    let first = context(&agent).await.svids[0].chain[1].clone();

    // A broken renewal (truncated certificate file) is refused; the agent keeps signing with
    // the intermediate it has.
    let cert = nodes.join("n1-cert.pem");
    let good = std::fs::read_to_string(&cert).unwrap();
    std::fs::write(&cert, &good[..good.len() / 2]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !agent
        .log_text()
        .contains("cannot be used; keeping the current intermediate")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken renewal was not reported:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(context(&agent).await.svids[0].chain[1], first);

    // A real renewal (new key, new intermediate) is used for new SVIDs, no restart.
    issue(&["--force"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let ctx = loop {
        let ctx = context(&agent).await;
        if ctx.svids[0].chain[1] != first {
            break ctx;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed intermediate was not picked up:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let id = verify_chain(&ctx.svids[0].chain, &ctx.bundles, UnixTime::now())
        .expect("an SVID of the renewed intermediate verifies against the root");
    assert_eq!(id.as_str(), format!("spiffe://{TD}/n1/app"));
    assert!(agent
        .log_text()
        .contains("reloaded the upstream intermediate"));
}
