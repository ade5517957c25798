//! Transparent mode in network-namespace "pods" with real iptables REDIRECT rules:
//! client (uid 65534) in pod A → iptables OUTPUT → frontend sidecar :15001 (SO_ORIGINAL_DST,
//! destination map → expected ID) → mTLS → pod B PREROUTING → backend sidecar :15006
//! (SO_ORIGINAL_DST → app port) → app on 127.0.0.1:8080 in pod B. IPv4 and IPv6.
//! Needs root, `ip`, `iptables`, `ip6tables`, `curl`, `setpriv`, `python3`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{is_root, redirect_app_outbound, run, PodPair};
use common::proxy::{Mesh, Sidecar, TD};
use common::{skip, which};

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl_as_nobody(pair: &PodPair, ns: &str, url: &str) -> (bool, String) {
    let out = pair.exec_as_app(ns, &["curl", "-sS", "-g", "--max-time", "10", url]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn transparent_mode_with_iptables_redirect_ipv4_and_ipv6() {
    if !is_root() {
        return skip("transparent mode test needs root (network namespaces, iptables)");
    }
    for tool in ["ip", "iptables", "ip6tables", "curl", "setpriv", "python3"] {
        if which(tool).is_none() {
            return skip(&format!("{tool} is not installed"));
        }
    }
    let pair = PodPair::new("tp");
    let (client_ns, server_ns) = (pair.peer.clone(), pair.pod.clone());
    let mesh = Mesh::start("proxy-transparent", &[]);

    // The app in the server pod, on loopback only (reachable only through the sidecar).
    let www = mesh.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the server pod\n").unwrap();
    let _app4 = Guard(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &server_ns,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Interception rules.
    for ipt in ["iptables", "ip6tables"] {
        run(&[
            "ip",
            "netns",
            "exec",
            &server_ns,
            ipt,
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ]);
        redirect_app_outbound(ipt, &client_ns, 8080);
    }

    let yaml = |dests: &str| {
        format!(
            "transparent:\n  enabled: true\n  inbound_addr: \"[::]:15006\"\n  outbound_addr: \"[::]:15001\"\n  destinations:\n{dests}"
        )
    };
    let backend_cfg = mesh.dir.path().join("backend.yaml");
    std::fs::write(&backend_cfg, yaml("    []\n")).unwrap();
    let frontend_cfg = mesh.dir.path().join("frontend.yaml");
    std::fs::write(
        &frontend_cfg,
        yaml(&format!(
            "    - {{ dst: \"{}/32\", port: 8080, expect: \"spiffe://{TD}/backend\" }}\n    - {{ dst: \"{}/128\", port: 8080, expect: \"{TD}\" }}\n",
            pair.pod_ip, pair.pod_ip6
        )),
    )
    .unwrap();
    let backend = Sidecar::start_in(
        Some(&server_ns),
        "backend",
        &mesh.backend_bin,
        &mesh.agent.socket,
        mesh.dir.path(),
        &["--config".into(), backend_cfg.display().to_string()],
    );
    let frontend = Sidecar::start_in(
        Some(&client_ns),
        "frontend",
        &mesh.frontend_bin,
        &mesh.agent.socket,
        mesh.dir.path(),
        &["--config".into(), frontend_cfg.display().to_string()],
    );

    // Wait for the app to listen.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pair
        .exec(&server_ns, &["curl", "-s", "http://127.0.0.1:8080/"])
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "python http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    for (ip, url) in [
        (pair.pod_ip.clone(), format!("http://{}:8080/", pair.pod_ip)),
        (
            format!("[{}]", pair.pod_ip6),
            format!("http://[{}]:8080/", pair.pod_ip6),
        ),
    ] {
        let (ok, text) = curl_as_nobody(&pair, &client_ns, &url);
        assert!(
            ok && text == "hello from the server pod\n",
            "{url}: {text}\nfrontend:\n{}\nbackend:\n{}",
            frontend.log_text(),
            backend.log_text()
        );
        let dst = format!("dst={ip}:8080");
        frontend.wait_log(&[
            "direction=\"outbound\"",
            &dst,
            &format!("peer_id=\"spiffe://{TD}/backend\""),
        ]);
        backend.wait_log(&[
            "direction=\"inbound\"",
            &dst,
            &format!("peer_id=\"spiffe://{TD}/frontend\""),
            "outcome=\"allowed\"",
        ]);
    }

    // Plaintext straight to the server pod (not redirected on the client: root's traffic) is
    // refused by the backend's strict default.
    let out = pair.exec(
        &client_ns,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:8080/", pair.pod_ip),
        ],
    );
    assert!(
        !out.status.success(),
        "plaintext reached the app: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    backend.wait_log(&["outcome=\"refused\"", "plaintext on a strict"]);
}

/// Passthrough egress in transparent mode: a non-mesh destination is spliced through unchanged
/// when the egress policy allows the TLS SNI the app sent, and reset otherwise.
#[test]
fn transparent_egress_passthrough_decided_on_sni() {
    if !is_root() {
        return skip("transparent mode test needs root (network namespaces, iptables)");
    }
    for tool in ["ip", "iptables", "curl", "setpriv", "openssl"] {
        if which(tool).is_none() {
            return skip(&format!("{tool} is not installed"));
        }
    }
    let pair = PodPair::new("eg");
    let (client_ns, external_ns) = (pair.peer.clone(), pair.pod.clone());
    let mesh = Mesh::start("proxy-egress-sni", &[]);
    let (cert, key) = common::proxy::foreign_svid(mesh.dir.path(), "external.example");
    let _server = Guard(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &external_ns,
                "openssl",
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                "8443",
            ])
            .args([
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    redirect_app_outbound("iptables", &client_ns, 8443);
    let frontend = mesh.transparent_egress_frontend(
        &client_ns,
        "egress-policy.yaml",
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: saas\n  direction: egress\n  action: allow\n  rules: [{ to: [{ hosts: [\"allowed.example\"], ports: [8443] }] }]\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pair
        .exec(
            &client_ns,
            &[
                "curl",
                "-sk",
                "--max-time",
                "2",
                &format!("https://{}:8443/", pair.pod_ip),
            ],
        )
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let curl_sni = |host: &str| {
        let resolve = format!("{host}:8443:{}", pair.pod_ip);
        let url = format!("https://{host}:8443/");
        pair.exec_as_app(
            &client_ns,
            &[
                "curl",
                "-sk",
                "--max-time",
                "10",
                "--resolve",
                &resolve,
                &url,
            ],
        )
    };
    let out = curl_sni("allowed.example");
    assert!(
        out.status.success(),
        "allowed SNI failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        frontend.log_text()
    );
    frontend.wait_log(&[
        "direction=\"egress\"",
        "rule=\"saas/rules[0]\"",
        "outcome=\"allowed\"",
    ]);
    let out = curl_sni("blocked.example");
    assert!(!out.status.success(), "blocked SNI went through");
    frontend.wait_log(&[
        "outcome=\"denied\"",
        "SNI blocked.example",
        "default:deny(implicit)",
    ]);
}
