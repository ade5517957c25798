//! No key material leaves the processes by the operator-facing channels: with the agent and two
//! sidecars at `debug` log level and traffic flowing, neither the logs, nor the sidecars'
//! `/config` and `/metrics`, nor the agent's health endpoints, nor `svidcar svid show` contain a
//! PEM private key marker, a P-256 PKCS#8 key (base64, hex or Rust `Debug` bytes), or the
//! private scalar of the CA key or of an SVID key (hex, base64, base64url). The state files
//! holding keys are mode 0600, and `svid show --write` writes key.pem 0600.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::proxy::{http_get, Mesh, TestApp, TD};

/// DER prefix of every P-256 PKCS#8 private key (what rcgen and aws-lc-rs write); the 32-byte
/// private scalar follows it.
const P256_PKCS8_PREFIX: [u8; 36] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20,
];

fn b64(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Strings that would betray the key in `file` (PKCS#8, PEM or DER, as the agent writes them).
fn key_needles(file: &[u8]) -> Vec<String> {
    let der = match std::str::from_utf8(file) {
        Ok(pem) if pem.starts_with("-----BEGIN") => rcgen::KeyPair::from_pem(pem)
            .expect("a PEM key")
            .serialize_der(),
        _ => file.to_vec(),
    };
    assert!(
        der.starts_with(&P256_PKCS8_PREFIX),
        "expected a P-256 PKCS#8 key"
    );
    let scalar = &der[P256_PKCS8_PREFIX.len()..P256_PKCS8_PREFIX.len() + 32];
    // Base64 of a 24-byte slice aligned to 3 bytes is position-independent only at offset 0;
    // take slices at every alignment so an embedding at any offset is caught.
    let mut needles = vec![hex(scalar), hex(scalar).to_uppercase()];
    for off in 0..3 {
        needles.push(b64(&scalar[off..off + 24], STD)[..28].to_string());
        needles.push(b64(&scalar[off..off + 24], URL)[..28].to_string());
    }
    needles.push(
        format!("{:?}", &scalar[..12])
            .trim_matches(|c| c == '[' || c == ']')
            .to_string(),
    );
    needles
}

fn generic_needles() -> Vec<String> {
    vec![
        "PRIVATE KEY".into(),
        b64(&P256_PKCS8_PREFIX[..33], STD),
        hex(&P256_PKCS8_PREFIX[..20]),
        format!("{:?}", &P256_PKCS8_PREFIX[..20])
            .trim_end_matches(']')
            .to_string(),
        "\"d\":".into(), // a private JWK member
    ]
}

fn assert_clean(what: &str, text: &str, needles: &[String]) {
    assert!(!text.is_empty(), "{what}: nothing captured");
    for n in needles {
        assert!(
            !text.contains(n.as_str()),
            "{what} contains key material ({n:?})"
        );
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn no_key_material_in_logs_config_metrics_or_cli_output() {
    let mesh = Mesh::start("hostile-secrets", &["--log", "debug"]);
    let app = TestApp::start("backend");
    let debug = || vec!["--log".to_string(), "debug".to_string()];
    let bport = common::free_port();
    let mut args = debug();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{bport}={}:strict", app.port),
    ]);
    let backend = mesh.sidecar("backend", &mesh.backend_bin.clone(), &args);
    let fport = common::free_port();
    let mut args = debug();
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:{fport}=127.0.0.1:{bport},spiffe://{TD}/backend"),
    ]);
    let frontend = mesh.sidecar("frontend", &mesh.frontend_bin.clone(), &args);
    for _ in 0..3 {
        let (status, body) = http_get(([127, 0, 0, 1], fport).into(), "/").unwrap();
        assert_eq!((status, body.as_str()), (200, "hello from backend\n"));
    }
    backend.wait_log(&["outcome=\"allowed\""]);

    // Key files: the CA and JWT signing keys, and an SVID key of ours written by `svid show --write`.
    let state = &mesh.agent.state_dir;
    let mut needles = generic_needles();
    let mut key_files = 0;
    for e in std::fs::read_dir(state).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains("key") {
            assert_eq!(mode(&e.path()), 0o600, "{name} must be 0600");
            needles.extend(key_needles(&std::fs::read(e.path()).unwrap()));
            key_files += 1;
        }
    }
    assert!(
        key_files >= 1,
        "no CA key file found in {}",
        state.display()
    );
    assert_eq!(mode(state) & 0o022, 0, "state dir writable by others");

    let out_dir = mesh.dir.path().join("svid-out");
    std::fs::create_dir_all(&out_dir).unwrap();
    // Our uid has no entry in the mesh's agent: a second agent gives it one.
    let tool = common::TempDir::new("hostile-secrets-tool");
    let agent2 = common::Agent::start_in(
        tool.path(),
        &[
            "--entry",
            &common::Agent::self_entry("operator"),
            "--log",
            "debug",
        ],
    );
    let socket = agent2.socket.display().to_string();
    let (ok, show_out, show_err) = common::svidcar(&[
        "svid",
        "show",
        "--socket",
        &socket,
        "--write",
        &out_dir.display().to_string(),
    ]);
    assert!(ok, "svid show failed: {show_err}");
    let key_pem = std::fs::read_to_string(out_dir.join("key.pem")).expect("key.pem written");
    assert_eq!(
        mode(&out_dir.join("key.pem")),
        0o600,
        "key.pem must be 0600"
    );
    needles.extend(key_needles(key_pem.as_bytes()));
    for e in std::fs::read_dir(&agent2.state_dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().contains("key") {
            needles.extend(key_needles(&std::fs::read(e.path()).unwrap()));
        }
    }
    // The needles do find a key where there is one (in PEM, hex and Debug form).
    let der = rcgen::KeyPair::from_pem(&key_pem).unwrap().serialize_der();
    for form in [key_pem.clone(), hex(&der), format!("{der:?}")] {
        assert!(
            needles.iter().any(|n| form.contains(n.as_str())),
            "needles miss {form}"
        );
    }
    assert_clean("svid show output", &(show_out + &show_err), &needles);

    for sc in [&backend, &frontend] {
        let (status, config) = http_get(sc.admin, "/config").unwrap();
        assert_eq!(status, 200);
        assert!(
            config.contains("spiffe://"),
            "/config shows the SVID: {config}"
        );
        assert_clean(&format!("{} /config", sc.name), &config, &needles);
        assert_clean(&format!("{} /metrics", sc.name), &sc.metrics(), &needles);
        let log = sc.log_text();
        assert!(
            log.contains("DEBUG"),
            "{} did not log at debug level",
            sc.name
        );
        assert_clean(&format!("{} log", sc.name), &log, &needles);
    }
    for (name, agent) in [("agent", &mesh.agent), ("operator agent", &agent2)] {
        let health: std::net::SocketAddr = agent.health.parse().unwrap();
        for path in ["/metrics", "/ready", "/live"] {
            let (_, body) = http_get(health, path).unwrap();
            assert_clean(
                &format!("{name} {path}"),
                &format!("{path}:{body}"),
                &needles,
            );
        }
        let log = agent.log_text();
        assert!(log.contains("DEBUG"), "{name} did not log at debug level");
        assert_clean(&format!("{name} log"), &log, &needles);
    }
}
