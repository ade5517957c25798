//! svidcar's side of the SPIRE interop tests: sidecars (the real `svidcar proxy`, each from its
//! own hard link of the binary so `unix:path:` selectors tell them apart), policies, `/config`
//! readers and a traffic generator.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::proxy::{http_get, KeepAlive, Sidecar};
use crate::common::{free_port, uid, BIN};

/// A hard link (or copy) of the svidcar binary named `name` in `dir`, so that `unix:path:`
/// selectors tell the processes apart.
pub fn link(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    if std::fs::hard_link(BIN, &to).is_err() {
        std::fs::copy(BIN, &to).expect("copy svidcar binary");
    }
    to
}

/// SPIRE selectors for a process of our uid running `bin`.
pub fn selectors(bin: &Path) -> Vec<String> {
    vec![
        format!("unix:uid:{}", uid()),
        format!("unix:path:{}", bin.display()),
    ]
}

/// An inbound policy admitting exactly `ids`.
pub fn allow_only(ids: &[&str]) -> String {
    let list = ids
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: callers\n  direction: inbound\n  action: allow\n  rules: [{{ from: [{{ spiffeIds: [{list}] }}] }}]\n"
    )
}

/// A backend sidecar on `socket`: strict inbound to `app_port` under a policy admitting `ids`.
pub fn backend(
    name: &str,
    bin: &Path,
    socket: &Path,
    dir: &Path,
    app_port: u16,
    ids: &[&str],
) -> (Sidecar, u16) {
    let policy = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy, allow_only(ids)).unwrap();
    let port = free_port();
    let sc = Sidecar::start(
        name,
        bin,
        socket,
        dir,
        &[
            "--inbound".into(),
            format!("127.0.0.1:{port}={app_port}:strict"),
            "--policy".into(),
            policy.display().to_string(),
        ],
    );
    (sc, port)
}

/// A frontend sidecar on `socket`: one outbound route to `upstream` expecting `expect`.
pub fn frontend(
    name: &str,
    bin: &Path,
    socket: &Path,
    dir: &Path,
    upstream: u16,
    expect: &str,
) -> (Sidecar, u16) {
    let port = free_port();
    let sc = Sidecar::start(
        name,
        bin,
        socket,
        dir,
        &[
            "--outbound".into(),
            format!("127.0.0.1:{port}=127.0.0.1:{upstream},{expect}"),
        ],
    );
    (sc, port)
}

/// The sidecar's `/config` as JSON.
pub fn config(sc: &Sidecar) -> serde_json::Value {
    let (status, body) = sc.admin_get("/config").expect("GET /config");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/config is JSON")
}

pub fn svid_field(sc: &Sidecar, field: &str) -> serde_json::Value {
    config(sc)["svid"][field].clone()
}

/// Trust domains the sidecar holds bundles for (from `/config`).
pub fn bundle_domains(sc: &Sidecar) -> Vec<String> {
    config(sc)["bundles"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["trust_domain"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn get(port: u16) -> std::io::Result<(u16, String)> {
    http_get(([127, 0, 0, 1], port).into(), "/")
}

/// Requests on new connections and on one keep-alive connection until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(port: u16, body: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for keep_alive in [false, true] {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            threads.push(std::thread::spawn(move || {
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    let r = if keep_alive {
                        if conn.is_none() {
                            conn = KeepAlive::connect(([127, 0, 0, 1], port).into()).ok();
                        }
                        match conn.as_mut() {
                            Some(c) => c.get("/"),
                            None => Err(std::io::Error::other("keep-alive connect failed")),
                        }
                    } else {
                        get(port)
                    };
                    match r {
                        Ok((200, b)) if b == body => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures
                            .lock()
                            .unwrap()
                            .push(format!("keep_alive={keep_alive}: {other:?}")),
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Self {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// Stops and returns (successes, failures).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}
