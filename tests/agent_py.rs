//! Interop: the PyPI `spiffe` client (py-spiffe, in `.venv`) against the real agent binary.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{Agent, TempDir};

fn script(name: &str) -> String {
    format!("{}/tests/py/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn py_spiffe_fetches_x509_bundles_and_jwt() {
    let Some(py) = common::venv_python() else {
        return;
    };
    let dir = TempDir::new("py-fetch");
    let agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("py")]);
    let out = Command::new(&py)
        .arg(script("spiffe_fetch.py"))
        .arg(agent.endpoint())
        .arg("svidcar.local")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "py-spiffe failed:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["x509_id"], "spiffe://svidcar.local/py");
    assert_eq!(v["x509_chain_len"], 1);
    assert_eq!(
        v["context_svids"],
        serde_json::json!(["spiffe://svidcar.local/py"])
    );
    assert_eq!(v["x509_authorities"], 1);
    assert_eq!(v["bundle_tds"], serde_json::json!(["svidcar.local"]));
    assert_eq!(v["jwt_id"], "spiffe://svidcar.local/py");
    assert_eq!(v["jwt_aud"], serde_json::json!(["svidcar-test"]));
    assert_eq!(v["validated_id"], "spiffe://svidcar.local/py");
    assert_eq!(v["local_validated_id"], "spiffe://svidcar.local/py");
    assert_eq!(v["jwt_authorities"], 1);
    let wrong = v["wrong_audience"].as_str().unwrap();
    assert!(
        wrong.starts_with("rejected") && wrong.contains("INVALID_ARGUMENT"),
        "{wrong}"
    );
    // The certificate py-spiffe parsed is the SVID we issued, checked field by field.
    let pem = v["x509_leaf_pem"].as_str().unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert!(!cert.is_ca());
    assert_eq!(
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len(),
        1
    );
}

#[test]
fn py_spiffe_stream_sees_three_rotations_before_expiry() {
    let Some(py) = common::venv_python() else {
        return;
    };
    let dir = TempDir::new("py-stream");
    let agent = Agent::start_in(
        dir.path(),
        &["--svid-ttl", "4s", "--entry", &Agent::self_entry("rot")],
    );
    let mut child = Command::new(&py)
        .arg(script("spiffe_stream.py"))
        .arg(agent.endpoint())
        .arg("3")
        .arg("40")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut records = Vec::new();
    let mut done = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line == "done" {
            done = true;
            break;
        }
        records.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        status.success() && done,
        "stream failed: {err}\nagent log:\n{}",
        agent.log_text()
    );
    let serials: std::collections::BTreeSet<_> = records
        .iter()
        .map(|r| r["serial"].as_str().unwrap().to_string())
        .collect();
    assert!(
        serials.len() >= 4,
        "expected >= 3 rotations, got {records:?}"
    );
    for pair in records.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        if prev["serial"] == next["serial"] {
            continue;
        }
        let received = next["received_at"].as_f64().unwrap();
        let prev_expiry = prev["not_after"].as_f64().unwrap();
        assert!(
            received < prev_expiry,
            "new SVID arrived after the previous expired: {pair:?}"
        );
        // Rotation at half life of a 4 s SVID: well before expiry, not immediately.
        assert!(received + 1.0 < prev_expiry, "rotation too late: {pair:?}");
    }
    for r in &records {
        assert_eq!(r["id"], "spiffe://svidcar.local/rot");
        assert_eq!(r["authorities"], 1);
    }
}
