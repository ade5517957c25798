//! Issue 5 end to end: two network namespaces as pods joined by a veth, the real agent on the
//! host (its socket reachable from both: namespaces share the filesystem), and in each pod the
//! rules of `svidcar init` (iptables in the client pod, nftables in the server pod), a sidecar
//! `svidcar proxy --transparent` running as its own UID (1337 / 1338, so each gets its own
//! identity through `unix:uid:`), and an unmodified app: curl in pod A, nginx in pod B.
//!
//! Asserts: curl to pod B's IP:80 gets nginx's answer; the capture on the veth shows a TLS 1.3
//! handshake (ServerHello with supported_versions 0x0304) and application-data records, and no
//! plaintext HTTP; nginx sees the request from 127.0.0.6 (the passthrough source); a path the
//! policy does not allow gets 403; egress to a name the policy denies is refused (and logged);
//! `svidcar init --cleanup` leaves no rule behind in either pod.
//!
//! Needs root, ip, iptables, nft, nginx, curl, tcpdump, setpriv (under `CI=true` a missing one
//! fails the test; otherwise it is skipped with the reason).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{is_root, skip_or_fail, which, PodPair};
use common::{Agent, TempDir, BIN};

const CLIENT_ID: &str = "spiffe://svidcar.local/ns/a/sa/client";
const SERVER_ID: &str = "spiffe://svidcar.local/ns/b/sa/server";

fn prerequisites() -> bool {
    if !is_root() {
        return !skip_or_fail("needs root (network namespaces, iptables, other UIDs)");
    }
    for tool in [
        "ip",
        "iptables-restore",
        "iptables-save",
        "nft",
        "nginx",
        "curl",
        "tcpdump",
        "setpriv",
    ] {
        if which(tool).is_none() {
            return !skip_or_fail(&format!(
                "`{tool}` is not installed (apt-get install iproute2 iptables nftables nginx curl tcpdump util-linux)"
            ));
        }
    }
    true
}

/// A process killed (SIGTERM, then SIGKILL) on drop, its output in a log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(argv: &[&str], log: &Path) -> Proc {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?}: {e}"));
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait up to 5 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `curl` inside `ns`: (exit code, HTTP status or 0, body).
fn curl(pair: &PodPair, ns: &str, args: &[&str]) -> (i32, u16, String) {
    let mut argv = vec!["curl", "-sS", "-m", "10", "-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    let out = pair.exec(ns, &argv);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn wait_until(what: &str, logs: &dyn Fn() -> String, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} not ready after 20s:\n{}", logs());
}

fn veth_of(pair: &PodPair, ns: &str) -> String {
    let out = pair.exec_ok(ns, &["ip", "-o", "link", "show", "type", "veth"]);
    // "2: vp123@if3: <...>"
    let name = out
        .split(':')
        .nth(1)
        .map(|s| s.trim().split('@').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(!name.is_empty(), "no veth in {ns}: {out}");
    name
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn sidecar(ns: &str, uid: &str, config: &Path, log: &Path) -> Proc {
    let cfg = config.display().to_string();
    Proc::spawn(
        &[
            "ip",
            "netns",
            "exec",
            ns,
            "setpriv",
            "--reuid",
            uid,
            "--regid",
            uid,
            "--clear-groups",
            BIN,
            "--log",
            "info,access=info",
            "proxy",
            "--config",
            &cfg,
        ],
        log,
    )
}

#[test]
fn curl_to_nginx_across_two_pods_is_mtls_and_authorized() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("k8s-two-pods");
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let agent = Agent::start_in(
        d,
        &[
            "--entry",
            &format!("{CLIENT_ID}=unix:uid:1337"),
            "--entry",
            &format!("{SERVER_ID}=unix:uid:1338"),
        ],
    );
    let pair = PodPair::new("2pod");
    // Pod A = pair.pod (client, curl), pod B = pair.peer (server, nginx).
    let (a, b) = (pair.pod.clone(), pair.peer.clone());
    let b_ip = pair.peer_ip.clone();
    let b_ip6 = pair.peer_ip6.clone();
    let b_other = pair.peer_ip_excluded.clone();

    // The app of pod B: an unmodified nginx on :80.
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/nginx-access.log;\n  client_body_temp_path {d}/nb;\n  proxy_temp_path {d}/np;\n  fastcgi_temp_path {d}/nf;\n  uwsgi_temp_path {d}/nu;\n  scgi_temp_path {d}/ns;\n\
             \x20 server {{ listen 80; location / {{ return 200 \"hello from pod b\\n\"; }} }}\n}}\n",
            d = d.display()
        ),
    )
    .unwrap();
    let conf_s = conf.display().to_string();
    let err_s = d.join("nginx-stderr.log").display().to_string();
    let _nginx = Proc::spawn(
        &[
            "ip", "netns", "exec", &b, "nginx", "-e", &err_s, "-c", &conf_s,
        ],
        &d.join("nginx.out"),
    );
    wait_until(
        "nginx",
        &|| std::fs::read_to_string(d.join("nginx.out")).unwrap_or_default(),
        || curl(&pair, &b, &["http://127.0.0.1:80/"]).1 == 200,
    );

    // Interception rules in both pods (iptables in A, nftables in B), each for its proxy UID.
    pair.exec_ok(
        &a,
        &[BIN, "init", "--backend", "iptables", "--proxy-uid", "1337"],
    );
    pair.exec_ok(
        &b,
        &[BIN, "init", "--backend", "nft", "--proxy-uid", "1338"],
    );

    // Policy (one file for the mesh): B admits the client on /public/* and / only; egress
    // admits the server's identity and allowed.example, denies blocked.example.
    let policy = d.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n\
             - name: web-from-client\n  direction: inbound\n  action: allow\n  selector: {{ spiffeIds: [\"{SERVER_ID}\"] }}\n  rules:\n  - from: [{{ spiffeIds: [\"{CLIENT_ID}\"] }}]\n    to: [{{ ports: [80], paths: [\"/\", \"/public/*\"] }}]\n\
             - name: mesh-and-allowed\n  direction: egress\n  action: allow\n  rules:\n  - to: [{{ spiffeIds: [\"{SERVER_ID}\"] }}]\n  - to: [{{ hosts: [\"allowed.example\"] }}]\n\
             - name: block-names\n  direction: egress\n  action: deny\n  rules:\n  - to: [{{ hosts: [\"blocked.example\"] }}]\n"
        ),
    )
    .unwrap();
    let sock = agent.socket.display().to_string();
    let pol = policy.display().to_string();
    let cfg_a = d.join("proxy-a.yaml");
    std::fs::write(
        &cfg_a,
        format!(
            "agent_socket: {sock}\nadmin_addr: 127.0.0.1:15000\npolicy: {pol}\ntransparent:\n  enabled: true\n  destinations:\n  - dst: {b_ip}\n    port: 80\n    expect: {SERVER_ID}\n  - dst: \"[{b_ip6}]:80\"\n    expect: {SERVER_ID}\n"
        ),
    )
    .unwrap();
    let cfg_b = d.join("proxy-b.yaml");
    std::fs::write(
        &cfg_b,
        format!(
            "agent_socket: {sock}\nadmin_addr: 127.0.0.1:15000\npolicy: {pol}\ntransparent:\n  enabled: true\n  protocols: {{ 80: http }}\n"
        ),
    )
    .unwrap();
    let side_a = sidecar(&a, "1337", &cfg_a, &d.join("proxy-a.log"));
    let side_b = sidecar(&b, "1338", &cfg_b, &d.join("proxy-b.log"));
    let logs = || {
        format!(
            "--- proxy A\n{}\n--- proxy B\n{}\n--- agent\n{}",
            side_a.log_text(),
            side_b.log_text(),
            agent.log_text()
        )
    };
    for ns in [&a, &b] {
        wait_until(&format!("sidecar in {ns}"), &logs, || {
            curl(&pair, ns, &["http://127.0.0.1:15000/ready"]).1 == 200
        });
    }
    // Least privilege: the serving sidecars run as their own non-root UID with no capability
    // at all (transparent mode needs none: SO_ORIGINAL_DST and the 127.0.0.6 bind are allowed).
    for (side, uid) in [(&side_a, "1337"), (&side_b, "1338")] {
        let status = std::fs::read_to_string(format!("/proc/{}/status", side.child.id()))
            .unwrap_or_else(|e| panic!("sidecar {uid} is gone: {e}\n{}", logs()));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(
            field("Uid:"),
            [uid; 4],
            "sidecar UIDs (real, effective, saved, fs)"
        );
        assert_eq!(field("Gid:"), [uid; 4], "sidecar GIDs");
        for caps in ["CapPrm:", "CapEff:", "CapInh:", "CapAmb:"] {
            assert_eq!(
                field(caps),
                ["0000000000000000"],
                "sidecar {uid} holds capabilities ({caps})"
            );
        }
        assert!(
            field("Name:")
                .first()
                .is_some_and(|c| c.starts_with("svidcar")),
            "pid {} is the sidecar itself, not a wrapper: {:?}",
            side.child.id(),
            field("Name:")
        );
    }

    // Capture on pod A's veth while the app talks.
    let veth = veth_of(&pair, &a);
    let pcap = d.join("veth.pcap");
    let pcap_s = pcap.display().to_string();
    let mut dump = Proc::spawn(
        &[
            "ip",
            "netns",
            "exec",
            &a,
            "tcpdump",
            "--immediate-mode",
            "-i",
            &veth,
            "-U",
            "-s",
            "0",
            "-w",
            &pcap_s,
            "tcp",
        ],
        &d.join("tcpdump.log"),
    );
    wait_until("tcpdump", &|| dump.log_text(), || {
        dump.log_text().contains("listening on")
    });

    // 1. Allowed: curl → (redirect) proxy A → mTLS → proxy B → nginx.
    let (rc, code, body) = curl(&pair, &a, &[&format!("http://{b_ip}/")]);
    assert_eq!(
        (rc, code),
        (0, 200),
        "curl to pod B failed: {body}\n{}",
        logs()
    );
    assert!(body.contains("hello from pod b"), "{body}");
    // The same over IPv6 (init's ip6tables rules, the proxies' IPv6 listeners).
    let (rc, code, body) = curl(&pair, &a, &["-6", &format!("http://[{b_ip6}]/")]);
    assert_eq!((rc, code), (0, 200), "IPv6: {body}\n{}", logs());
    // 2. Denied path: 403 from proxy B's per-request policy; nginx never sees it.
    let (_, code, body) = curl(&pair, &a, &[&format!("http://{b_ip}/secret")]);
    assert_eq!(code, 403, "{body}\n{}", logs());
    assert!(body.contains("RBAC: access denied"), "{body}");

    std::thread::sleep(Duration::from_millis(300));
    dump.stop();
    let bytes = std::fs::read(&pcap).unwrap();
    assert!(bytes.len() > 24, "empty capture: {}", dump.log_text());
    // TLS 1.3: the ServerHello's supported_versions extension selects 0x0304, and the
    // traffic is application-data records (0x17 0x03 0x03).
    assert!(
        contains(&bytes, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 ServerHello on the veth"
    );
    assert!(
        contains(&bytes, &[0x17, 0x03, 0x03]),
        "no TLS application data on the veth"
    );
    for plain in [&b"GET /"[..], b"hello from pod b", b"HTTP/1.1", b"RBAC"] {
        assert!(
            !contains(&bytes, plain),
            "plaintext {:?} on the veth",
            String::from_utf8_lossy(plain)
        );
    }
    let ascii = Command::new("tcpdump")
        .args(["-r", &pcap_s, "-A", "-nn"])
        .output()
        .unwrap();
    let ascii = String::from_utf8_lossy(&ascii.stdout);
    assert!(
        ascii.contains(&format!("{b_ip}.80")),
        "capture has the flow: {ascii}"
    );
    assert!(!ascii.contains("GET /"), "plaintext HTTP seen by tcpdump");

    // nginx got the allowed request only, from the passthrough source 127.0.0.6.
    let access = std::fs::read_to_string(d.join("nginx-access.log")).unwrap_or_default();
    let forwarded: Vec<&str> = access
        .lines()
        .filter(|l| l.starts_with("127.0.0.6 "))
        .collect();
    assert_eq!(forwarded.len(), 2, "nginx access log:\n{access}");
    assert!(
        forwarded
            .iter()
            .all(|l| l.contains("\"GET / HTTP/1.1\" 200")),
        "{access}"
    );
    assert!(!access.contains("/secret"), "{access}");
    assert!(side_b.log_text().contains(CLIENT_ID), "{}", logs());

    // 3. Egress to a name the policy denies: refused by proxy A (never dialed).
    let resolve = format!("blocked.example:443:{b_other}");
    let (rc, _, out) = curl(
        &pair,
        &a,
        &["-k", "--resolve", &resolve, "https://blocked.example/"],
    );
    assert_ne!(rc, 0, "egress to blocked.example must fail: {out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !side_a.log_text().contains("blocked.example") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = side_a
        .log_text()
        .lines()
        .find(|l| l.contains("blocked.example"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("egress denial not logged:\n{}", logs()));
    assert!(
        line.to_lowercase().contains("deny") && line.contains("block-names"),
        "{line}"
    );

    // 4. Loop guard: a peer dialing pod B's outbound port lands on B's inbound listener, and
    // the app of pod A dialing a proxy port lands on A's outbound listener: both refused.
    // (As the proxy UID of pod A, so pod A does not capture it and it reaches pod B as is.)
    let direct = pair.exec(
        &a,
        &[
            "setpriv",
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            "curl",
            "-sS",
            "-m",
            "5",
            &format!("http://{b_ip}:15001/"),
        ],
    );
    assert!(!direct.status.success(), "{direct:?}");
    let (rc, _, out) = curl(&pair, &a, &[&format!("http://{b_ip}:15006/")]);
    assert_ne!(rc, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && !(side_a.log_text().contains("redirect loop")
            && side_b.log_text().contains("redirect loop"))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        side_a.log_text().contains(&format!("{b_ip}:15006"))
            && side_a.log_text().contains("redirect loop"),
        "{}",
        logs()
    );
    assert!(
        side_b.log_text().contains(":15001") && side_b.log_text().contains("redirect loop"),
        "{}",
        logs()
    );

    // 5. Cleanup leaves nothing behind in either pod.
    drop(side_a);
    drop(side_b);
    pair.exec_ok(&a, &[BIN, "init", "--backend", "iptables", "--cleanup"]);
    pair.exec_ok(&b, &[BIN, "init", "--backend", "nft", "--cleanup"]);
    let nat_a = pair.exec_ok(&a, &["iptables-save", "-t", "nat"]);
    assert!(!nat_a.contains("SVIDCAR"), "{nat_a}");
    let nat6_a = pair.exec(&a, &["ip6tables-save", "-t", "nat"]);
    assert!(!String::from_utf8_lossy(&nat6_a.stdout).contains("SVIDCAR"));
    let rules_b = pair.exec_ok(&b, &["nft", "list", "ruleset"]);
    assert!(!rules_b.contains("svidcar"), "{rules_b}");
    // And traffic is plain again: curl reaches nginx directly.
    let (rc, code, _) = curl(&pair, &a, &[&format!("http://{b_ip}/")]);
    assert_eq!((rc, code), (0, 200));
}
