//! Network namespaces as test "pods" (K8S helper): a pair of namespaces joined by a veth,
//! removed on drop, and a small Python TCP tool run inside them.
//! Include with `#[path = "common/netns.rs"] mod netns;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Is the test allowed to skip (not under `CI=true`)? Panics under CI with the reason.
pub fn skip_or_fail(reason: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but this test cannot run: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    true
}

/// Finds an executable on PATH (or /usr/sbin, /sbin).
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// Are we root (uid 0)?
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &[&str]) -> Output {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// In namespace `ns`, redirects the app's (uid 65534) TCP to `dport` to the sidecar's outbound
/// listener :15001 (`ipt` is `iptables` or `ip6tables`).
pub fn redirect_app_outbound(ipt: &str, ns: &str, dport: u16) {
    let dport = dport.to_string();
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        ipt,
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        &dport,
        "-m",
        "owner",
        "--uid-owner",
        "65534",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, `pod` (10.77.N.2, fd00:77:N::2) and `peer` (10.77.N.1, fd00:77:N::1),
/// joined by a veth; deleted on drop.
pub struct PodPair {
    pub pod: String,
    pub peer: String,
    pub pod_ip: String,
    pub peer_ip: String,
    pub pod_ip6: String,
    pub peer_ip6: String,
    /// An extra address of the peer, inside 10.77.N.128/25.
    pub peer_ip_excluded: String,
}

impl PodPair {
    pub fn new(tag: &str) -> PodPair {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
        let id = format!("{}{}", std::process::id() % 100000, n);
        let pod = format!("svc-{tag}-p{id}");
        let peer = format!("svc-{tag}-c{id}");
        let subnet = (std::process::id() % 200) as u32 + n;
        let pair = PodPair {
            pod: pod.clone(),
            peer: peer.clone(),
            pod_ip: format!("10.77.{subnet}.2"),
            peer_ip: format!("10.77.{subnet}.1"),
            pod_ip6: format!("fd00:77:{subnet}::2"),
            peer_ip6: format!("fd00:77:{subnet}::1"),
            peer_ip_excluded: format!("10.77.{subnet}.129"),
        };
        run(&["ip", "netns", "add", &pod]);
        run(&["ip", "netns", "add", &peer]);
        let (va, vb) = (format!("vp{id}"), format!("vc{id}"));
        run(&[
            "ip", "link", "add", &va, "netns", &pod, "type", "veth", "peer", "name", &vb, "netns",
            &peer,
        ]);
        for (ns, dev, v4, v6) in [
            (&pod, &va, &pair.pod_ip, &pair.pod_ip6),
            (&peer, &vb, &pair.peer_ip, &pair.peer_ip6),
        ] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run(&[
            "ip",
            "-n",
            &peer,
            "addr",
            "add",
            &format!("{}/24", pair.peer_ip_excluded),
            "dev",
            &vb,
        ]);
        pair
    }

    /// Runs `argv` inside namespace `ns`.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Output {
        let mut cmd = vec!["ip", "netns", "exec", ns];
        cmd.extend_from_slice(argv);
        Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
    }

    /// Runs `argv` inside namespace `ns` as the app user (uid/gid 65534, no groups).
    pub fn exec_as_app(&self, ns: &str, argv: &[&str]) -> Output {
        let mut cmd = vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ];
        cmd.extend_from_slice(argv);
        self.exec(ns, &cmd)
    }

    /// Like [`exec`], panicking on failure; returns stdout.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> String {
        let out = self.exec(ns, argv);
        assert!(
            out.status.success(),
            "{argv:?} in {ns} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PodPair {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The Python TCP tool: `serve TAG/ADDR/PORT…` answers every connection with
/// `TAG <original destination>\n` (SO_ORIGINAL_DST when redirected, else the local address);
/// `connect UID SRC DST PORT` prints what the server answered, or `ERR <reason>`.
pub const TCP_TOOL: &str = r#"
import os, socket, struct, sys, threading
def orig(c):
    try:
        if c.family == socket.AF_INET:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            port, = struct.unpack('!H', raw[2:4])
            return '%s:%d' % (socket.inet_ntoa(raw[4:8]), port)
        raw = c.getsockopt(41, 80, 28)
        port, = struct.unpack('!H', raw[2:4])
        return '[%s]:%d' % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    except OSError:
        h = c.getsockname()
        return ('%s:%d' if c.family == socket.AF_INET else '[%s]:%d') % (h[0], h[1])
def serve_one(tag, s):
    while True:
        c, _ = s.accept()
        try:
            c.sendall(('%s %s\n' % (tag, orig(c))).encode())
        finally:
            c.close()
if sys.argv[1] == 'serve':
    for spec in sys.argv[2:]:
        tag, addr, port = spec.split('/')
        fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, int(port)))
        s.listen(16)
        threading.Thread(target=serve_one, args=(tag, s), daemon=True).start()
    print('ready', flush=True)
    sys.stdin.read()
else:
    uid, src, dst, port = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    if uid != '-':
        os.setgid(int(uid)); os.setuid(int(uid))  # before socket(): the socket owner is fixed then
    fam = socket.AF_INET6 if ':' in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    if src != '-':
        s.bind((src, 0))
    try:
        s.connect((dst, port))
        print(s.makefile().readline().strip() or 'ERR empty')
    except OSError as e:
        print('ERR %s' % e)
"#;

/// A running `serve` process inside a namespace; killed on drop.
pub struct Servers(Child);

impl Servers {
    pub fn start(pair: &PodPair, ns: &str, specs: &[String]) -> Servers {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "python3", "-c", TCP_TOOL, "serve"]);
        cmd.args(specs);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3 servers");
        let _ = pair;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready");
        assert_eq!(line.trim(), "ready", "servers in {ns} did not start");
        Servers(child)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects from namespace `ns` (as `uid`, from `src`; `-` for default) and returns the answer.
pub fn connect(pair: &PodPair, ns: &str, uid: &str, src: &str, dst: &str, port: u16) -> String {
    let port = port.to_string();
    let out = pair.exec(
        ns,
        &[
            "timeout", "10", "python3", "-c", TCP_TOOL, "connect", uid, src, dst, &port,
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
