//! Envoy SDS on the agent socket, exercised by an independent client generated from the
//! published Envoy protos (PyPI `xds-protos` + `grpcio`, see tests/py/sds_client.py): streams
//! `default`, `ROOTCA` and `ALL`, sees a rotation with a new version after ACK, a NACK that is
//! not answered by a resend, fetch-all, and refusals.
mod common;

use std::process::Command;

use common::{Agent, TempDir};

fn envoy_python() -> Option<std::path::PathBuf> {
    let py = common::venv_python()?;
    let ok = Command::new(&py)
        .args([
            "-c",
            "import grpc, cryptography, envoy.service.secret.v3.sds_pb2_grpc",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Some(py)
    } else {
        common::skip(
            "the venv lacks xds-protos/grpcio (.venv/bin/pip install -r tests/py/requirements.txt)",
        );
        None
    }
}

#[test]
fn envoy_sds_client_streams_rotates_acks_nacks_and_is_refused() {
    let Some(py) = envoy_python() else { return };
    let dir = TempDir::new("sds-envoy");
    let agent = Agent::start_in(
        dir.path(),
        &["--entry", &Agent::self_entry("envoy"), "--svid-ttl", "4s"],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/sds_client.py");
    let out = Command::new(py)
        .arg(script)
        .arg(&agent.socket)
        .arg("spiffe://svidcar.local/envoy")
        .arg("20")
        .output()
        .expect("run sds_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "done"),
        "sds_client.py failed ({}):\n{stdout}\n{stderr}\nagent log:\n{}",
        out.status,
        agent.log_text()
    );
    eprintln!("{stdout}");
    for step in ["step1 ok", "step2 ok", "step3 ok", "step4 ok", "step5 ok"] {
        assert!(stdout.contains(step), "missing {step}:\n{stdout}");
    }
}

#[test]
fn grpc_health_and_reflection_answer_standard_clients() {
    let Some(py) = envoy_python() else { return };
    let ok = Command::new(&py)
        .args(["-c", "import grpc_health.v1.health_pb2, grpc_reflection.v1alpha.proto_reflection_descriptor_database"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        common::skip("the venv lacks grpcio-health-checking/grpcio-reflection (pip install -r tests/py/requirements.txt)");
        return;
    }
    let dir = TempDir::new("sds-health");
    let agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("envoy")]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/py/sds_health_reflection.py"
    );
    let out = Command::new(py)
        .arg(script)
        .arg(&agent.socket)
        .output()
        .expect("run script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "done"),
        "sds_health_reflection.py failed ({}):\n{stdout}\n{}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    for step in ["health ok", "reflection ok", "envoy subset ok"] {
        assert!(stdout.contains(step), "missing {step}:\n{stdout}");
    }
}
