//! The README's first command: `svidcar demo` runs the agent, two sidecars and the apps, shows
//! the identities, an allowed call and two refused ones with their reasons, and exits 0.

mod common;

use std::process::Command;

#[test]
fn demo_shows_identities_an_allowed_and_refused_calls() {
    let out = Command::new(common::BIN)
        .arg("demo")
        .output()
        .expect("run svidcar demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "identity spiffe://demo.svidcar/backend",
        "identity spiffe://demo.svidcar/frontend",
        "ALLOWED",
        "HTTP 200 \"hello from the backend app\"",
        "sidecar reason: no_client_certificate",
        "sidecar reason: plaintext on a strict",
        "sidecar reason: denied by default:deny(implicit)",
        "demo OK",
    ] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle:?}:\n{stdout}"
        );
    }
    assert_eq!(stdout.matches("REFUSED").count(), 3, "{stdout}");
}
