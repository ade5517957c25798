//! Transparent-mode egress evasion (issue #13 item 4, POLICY.md §3): with `defaults.egress:
//! allow` and a `deny` rule on the host `evil.test`, a ClientHello naming evil.test that is
//! delayed, split over records or 1-byte segments, or padded past 16 KiB must still be denied,
//! and a plaintext request naming evil.test after a pause, pipelined, or as an absolute-form
//! target behind an innocent `Host` must never reach the server. The application runs in its
//! own network namespace (redirected by iptables to the sidecar), the server in another one
//! records every raw byte it receives. Needs root, `ip`, `iptables`, `setpriv`, `python3`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::egress::{client, first_flight, recut, Recorder};
use common::netns::{is_root, redirect_app_outbound, PodPair};
use common::proxy::Mesh;
use common::{skip, spawn_quiet, which};

/// Records the bytes of every connection on :8443 and :8080 into `<dir>/<port>-<n>.bin`
/// (renamed `.done` when it ends); :8080 answers each request head with `200 ok`.
const RECORDER: &str = r#"import os, socket, sys, threading
d = sys.argv[1]
lock = threading.Lock()
count = [0]
def serve(c, port):
    with lock:
        count[0] += 1
        path = os.path.join(d, '%d-%04d.bin' % (port, count[0]))
    f = open(path, 'wb')
    pending = b''
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            f.write(b)
            f.flush()
            if port == 8080:
                pending += b
                while b'\r\n\r\n' in pending:
                    pending = pending.split(b'\r\n\r\n', 1)[1]
                    c.sendall(b'HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n')
    except OSError:
        pass
    f.close()
    os.rename(path, path + '.done')
    c.close()
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c, port), daemon=True).start()
for p in (8443, 8080):
    threading.Thread(target=listen, args=(p,), daemon=True).start()
open(os.path.join(d, 'ready'), 'w').close()
threading.Event().wait()
"#;

/// Connects to argv[1]:argv[2], sends each `delay_ms:hex` chunk, then prints how the
/// connection ended (`reset`, `eof`, `timeout`) and what came back.
const CLIENT: &str = r#"import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for chunk in sys.argv[3:]:
    delay, data = chunk.split(':')
    time.sleep(int(delay) / 1000)
    try:
        s.sendall(bytes.fromhex(data))
    except OSError:
        print('reset')
        sys.exit(0)
s.settimeout(1.5)
got = b''
end = 'timeout'
try:
    while True:
        b = s.recv(65536)
        if not b:
            end = 'eof'
            break
        got += b
except socket.timeout:
    pass
except OSError:
    end = 'reset'
print(end)
sys.stdout.write(got.decode('latin-1'))
"#;

/// What the client sends: (pause in ms before, bytes) in order.
type Chunks = Vec<(u64, Vec<u8>)>;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The connections recorded in `dir` for `port`, in order, once all of them have ended.
fn recorded(dir: &Path, port: u16) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{port}-")))
            .collect();
        names.sort();
        if names.iter().all(|n| n.ends_with(".done")) {
            return names
                .iter()
                .map(|n| std::fs::read(dir.join(n)).unwrap())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "recorded connections did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn transparent_egress_deny_host_rules_survive_evasion() {
    if !is_root() {
        return skip("transparent egress test needs root (network namespaces, iptables)");
    }
    for tool in ["ip", "iptables", "setpriv", "python3"] {
        if which(tool).is_none() {
            return skip(&format!("{tool} is not installed"));
        }
    }
    // The app user (nobody) cannot run a python under /root (pyenv shims).
    let app_python = if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let pair = PodPair::new("ae");
    let (client_ns, external_ns) = (pair.peer.clone(), pair.pod.clone());
    let mesh = Mesh::start("attack-egress-transparent", &[]);
    let rec_dir = mesh.dir.path().join("recorded");
    std::fs::create_dir_all(&rec_dir).unwrap();
    let _server = spawn_quiet(
        Command::new("ip")
            .args(["netns", "exec", &external_ns, "python3", "-c", RECORDER])
            .arg(&rec_dir),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rec_dir.join("ready").exists() {
        assert!(
            Instant::now() < deadline,
            "the recording server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    redirect_app_outbound("iptables", &client_ns, 8443);
    redirect_app_outbound("iptables", &client_ns, 8080);
    let fe = mesh.transparent_egress_frontend(
        &client_ns,
        "egress-deny-evil.yaml",
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\ndefaults: {egress: allow}\npolicies:\n- name: block-evil\n  direction: egress\n  action: deny\n  rules: [{ to: [{ hosts: [\"evil.test\"] }] }]\n",
    );
    let run = |port: u16, chunks: &[(u64, Vec<u8>)]| -> (String, Vec<Vec<u8>>) {
        let before = recorded(&rec_dir, port).len();
        let port_s = port.to_string();
        let args: Vec<String> = chunks
            .iter()
            .map(|(delay, b)| format!("{delay}:{}", hex(b)))
            .collect();
        let mut argv = vec![app_python, "-c", CLIENT, &pair.pod_ip, &port_s];
        argv.extend(args.iter().map(String::as_str));
        let out = pair.exec_as_app(&client_ns, &argv);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (text, recorded(&rec_dir, port)[before..].to_vec())
    };
    let up = Recorder::tls();
    let ca = up.ca.clone().unwrap();
    let bytes = |w: &[u8], pause: u64| -> Chunks { w.iter().map(|b| (pause, vec![*b])).collect() };
    // (what, SNI, chunks)
    let mut cases: Vec<(&str, &str, Chunks)> = Vec::new();
    for sni in ["allowed.test", "evil.test"] {
        let w = first_flight(&mut client(&ca, sni, 0));
        cases.push(("whole", sni, vec![(0, w.clone())]));
        cases.push(("two records", sni, vec![(0, recut(&w, &[1]))]));
        cases.push(("1-byte segments", sni, bytes(&w, 1)));
        cases.push(("after 700 ms", sni, vec![(700, w.clone())]));
        let big = first_flight(&mut client(&ca, sni, 20_000));
        cases.push(("padded past 16 KiB", sni, vec![(0, big)]));
    }
    for (what, sni, chunks) in &cases {
        let sent: Vec<u8> = chunks.iter().flat_map(|c| c.1.clone()).collect();
        let (end, conns) = run(8443, chunks);
        let got = conns.concat();
        if *sni == "allowed.test" {
            assert_eq!(
                got, sent,
                "{what}, {sni}: the server did not get the original bytes"
            );
        } else {
            assert!(
                got.is_empty(),
                "{what}, {sni}: the server got {} bytes ({end})",
                got.len()
            );
            assert!(
                end.starts_with("reset") || end.starts_with("eof"),
                "{what}: {end}"
            );
        }
    }
    fe.wait_log(&["(SNI evil.test) denied by block-evil/rules[0]"]);

    // Plaintext: a late first request, a pipelined one, an absolute-form target.
    let (out, conns) = run(
        8080,
        &[(
            700,
            b"GET /late HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_vec(),
        )],
    );
    assert!(out.contains("HTTP/1.1 403"), "{out}");
    assert!(
        conns.concat().is_empty(),
        "a late request reached the server"
    );
    let pipelined =
        b"GET /a HTTP/1.1\r\nHost: ok.test\r\n\r\nGET /b HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    let (out, conns) = run(8080, &[(0, pipelined.to_vec())]);
    assert!(
        out.contains("HTTP/1.1 200") && out.contains("HTTP/1.1 403"),
        "{out}"
    );
    let got = String::from_utf8_lossy(&conns.concat()).into_owned();
    assert!(got.contains("GET /a ") && !got.contains("evil"), "{got}");
    for (req, want) in [
        (
            &b"GET http://evil.test/x HTTP/1.1\r\nHost: ok.test\r\n\r\n"[..],
            "HTTP/1.1 400",
        ),
        (b"GET http://evil.test/x HTTP/1.1\r\n\r\n", "HTTP/1.1 403"),
        (
            b" GET /x HTTP/1.1\r\nHost: evil.test\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ] {
        let (out, conns) = run(8080, &[(0, req.to_vec())]);
        assert!(
            out.contains(want),
            "{}: {out}",
            String::from_utf8_lossy(req)
        );
        assert!(
            conns.concat().is_empty(),
            "{}",
            String::from_utf8_lossy(req)
        );
    }
    let (out, conns) = run(
        8080,
        &[(
            0,
            b"GET http://ok.test/y HTTP/1.1\r\nHost: ok.test\r\n\r\n".to_vec(),
        )],
    );
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    let got = String::from_utf8_lossy(&conns.concat()).into_owned();
    assert!(
        got.starts_with("GET /y HTTP/1.1\r\n"),
        "forwarded in origin form: {got}"
    );
}
