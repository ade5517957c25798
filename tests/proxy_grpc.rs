//! gRPC through a sidecar pair with an L7 policy: a real gRPC client (grpcio) gets its allowed
//! call answered by a real gRPC server (grpcio), and a call the policy does not allow refused by
//! the backend sidecar with `PERMISSION_DENIED` (trailers-only `grpc-status: 7`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::proxy::{Mesh, TD};

/// Kills the Python gRPC server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn grpc_call_outside_the_policy_gets_permission_denied() {
    let Some(py) = common::venv_python() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/grpc_authz.py");
    let app_port = common::free_port();
    let mut server = Server(
        Command::new(&py)
            .arg(&script)
            .args(["server", &app_port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the grpcio server"),
    );
    let mut ready = String::new();
    BufReader::new(server.0.stdout.take().expect("server stdout"))
        .read_line(&mut ready)
        .expect("read the server's ready line");
    assert_eq!(ready.trim(), "ready");

    let mesh = Mesh::start("proxy-grpc", &[]);
    let policy = format!(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: health-check-only\n  direction: inbound\n  action: allow\n  rules:\n  - from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}]\n    to: [{{ methods: [\"POST\"], paths: [\"/grpc.health.v1.Health/Check\"] }}]\n"
    );
    let (backend, in_port) = mesh.l7_backend(&policy, app_port);
    let (_frontend, out_port) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));

    let out = Command::new(&py)
        .arg(&script)
        .args(["client", &format!("127.0.0.1:{out_port}")])
        .output()
        .expect("run the grpcio client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Check OK SERVING"), "{stdout}");
    // Without the sidecar's decision the server would answer UNIMPLEMENTED.
    assert!(stdout.contains("List PERMISSION_DENIED"), "{stdout}");
    let line = backend.wait_log(&["request denied", "path=/grpc.health.v1.Health/List"]);
    assert!(line.contains("rule=default:deny(implicit)"), "{line}");
}
