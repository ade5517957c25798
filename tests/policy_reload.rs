//! Hot reload (POLICY.md §6): a broken set is rejected (old kept, error counted), the next valid
//! one is applied atomically; file polling and SIGHUP both trigger a reload.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use svidcar_agent::SpiffeId;
use svidcar_proxy::policy::{spawn_watcher_with, Direction, PolicyWatcher, Protocol, Request};

const ALLOW_WEB: &str = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
defaults: {inbound: deny}
policies:
- {name: web, direction: inbound, action: allow, rules: [{from: [{spiffeIds: ["spiffe://td/web"]}]}]}
"#;
const BROKEN: &str = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
policies:
- {name: web, direction: inbound, action: allow, rules: [{from: [{spiffeIds: ["spiffe://td/web-*"]}]}]}
"#;
const DENY_WEB: &str = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
defaults: {inbound: deny}
policies:
- {name: block-web, direction: inbound, action: deny, rules: [{from: [{spiffeIds: ["spiffe://td/web"]}]}]}
- {name: web, direction: inbound, action: allow, rules: [{from: [{spiffeIds: ["spiffe://td/web"]}]}]}
"#;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("svidcar-reload-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes atomically (write + rename), as config management tools do.
fn write(dir: &Path, text: &str) {
    let tmp = dir.join(".policy.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("policy.yaml")).unwrap();
}

fn decide_web(w: &PolicyWatcher) -> String {
    let web = SpiffeId::parse("spiffe://td/web").unwrap();
    let mut req = Request::new(Direction::Inbound, Protocol::Tcp);
    req.peer = Some(&web);
    let d = w.current().decide(&req);
    format!("{} {}", d.label(), d.reason)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn reload_keeps_old_set_on_error_then_applies_next_valid() {
    let dir = temp_dir("poll");
    write(&dir, ALLOW_WEB);
    let local = SpiffeId::parse("spiffe://td/api").unwrap();
    let w = spawn_watcher_with(dir.clone(), local.clone(), Duration::from_millis(50)).unwrap();
    let mut rx = w.subscribe();
    assert_eq!(decide_web(&w), "ALLOW web/rules[0]");

    write(&dir, BROKEN);
    wait_for("the broken set to be counted", || w.reload_errors() >= 1).await;
    assert_eq!(
        decide_web(&w),
        "ALLOW web/rules[0]",
        "old set must stay in force"
    );
    assert_eq!(w.reloads(), 0);

    write(&dir, DENY_WEB);
    wait_for("the new set to be applied", || w.reloads() >= 1).await;
    assert_eq!(decide_web(&w), "DENY block-web/rules[0]");
    assert!(rx.has_changed().unwrap(), "subscribers are notified");
    let latest = rx.borrow_and_update().clone();
    assert_eq!(latest.policies().len(), 2);
    drop(w);

    // SIGHUP: with polling effectively off, only the signal can trigger the reload.
    write(&dir, ALLOW_WEB);
    let w = spawn_watcher_with(dir.clone(), local, Duration::from_secs(3600)).unwrap();
    assert_eq!(decide_web(&w), "ALLOW web/rules[0]");
    write(&dir, DENY_WEB);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        w.reloads(),
        0,
        "no reload without SIGHUP when polling is off"
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    wait_for("the SIGHUP reload", || w.reloads() >= 1).await;
    assert_eq!(decide_web(&w), "DENY block-web/rules[0]");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Publishes `text` the way the kubelet updates a ConfigMap volume (its "atomic writer"): the
/// files go into a new hidden timestamped directory, the hidden `..data` symlink is swapped to
/// it with a rename, and the old directory is removed; `policy.yaml` is a symlink to
/// `..data/policy.yaml` that never changes itself.
fn publish_configmap(dir: &Path, version: u32, text: &str) {
    let data = format!("..2026_11_23_{version:04}");
    std::fs::create_dir(dir.join(&data)).unwrap();
    std::fs::write(dir.join(&data).join("policy.yaml"), text).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&data, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if !dir.join("policy.yaml").exists() {
        std::os::unix::fs::symlink("..data/policy.yaml", dir.join("policy.yaml")).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_volume_update_is_reloaded_and_a_broken_one_rejected() {
    let dir = temp_dir("configmap");
    publish_configmap(&dir, 1, ALLOW_WEB);
    let local = SpiffeId::parse("spiffe://td/api").unwrap();
    let w = spawn_watcher_with(dir.clone(), local, Duration::from_millis(50)).unwrap();
    assert_eq!(
        decide_web(&w),
        "ALLOW web/rules[0]",
        "the hidden ..data directories are not loaded twice"
    );

    publish_configmap(&dir, 2, BROKEN);
    wait_for("the broken ConfigMap to be counted", || {
        w.reload_errors() >= 1
    })
    .await;
    assert_eq!(decide_web(&w), "ALLOW web/rules[0]", "old set kept");

    publish_configmap(&dir, 3, DENY_WEB);
    wait_for("the updated ConfigMap to be applied", || w.reloads() >= 1).await;
    assert_eq!(decide_web(&w), "DENY block-web/rules[0]");
    let _ = std::fs::remove_dir_all(&dir);
}
