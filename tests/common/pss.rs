//! Pod Security Standards "restricted" profile, checked offline on a pod spec (K8S helper).
//! Include with `#[path = "common/pss.rs"] mod pss;`.
#![allow(dead_code)]

use serde_json::Value;

/// Documented exceptions to the profile.
#[derive(Default)]
pub struct Exceptions<'a> {
    /// Containers that may run as root with `NET_ADMIN`/`NET_RAW` added (svidcar-init).
    pub net_admin_containers: &'a [&'a str],
    /// Containers that may run as root (with every capability dropped): the node agent.
    pub root_containers: &'a [&'a str],
    /// hostPath volume paths that are allowed.
    pub host_paths: &'a [&'a str],
    /// hostPID allowed (the agent's /proc attestation).
    pub host_pid: bool,
}

const RESTRICTED_VOLUME_TYPES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

fn containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .collect()
}

/// Every violation of the restricted profile in this pod spec, as readable strings.
pub fn violations(spec: &Value, ex: &Exceptions) -> Vec<String> {
    let mut v = Vec::new();
    for field in ["hostNetwork", "hostIPC"] {
        if spec.get(field) == Some(&Value::Bool(true)) {
            v.push(format!("{field}: true"));
        }
    }
    if spec.get("hostPID") == Some(&Value::Bool(true)) && !ex.host_pid {
        v.push("hostPID: true".to_string());
    }
    for vol in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = vol.get("name").and_then(Value::as_str).unwrap_or("?");
        let Some(obj) = vol.as_object() else { continue };
        for (key, val) in obj {
            if key == "name" {
                continue;
            }
            if key == "hostPath" {
                let path = val.get("path").and_then(Value::as_str).unwrap_or("");
                if !ex.host_paths.contains(&path) {
                    v.push(format!("volume {name}: hostPath {path} not allowed"));
                }
            } else if !RESTRICTED_VOLUME_TYPES.contains(&key.as_str()) {
                v.push(format!("volume {name}: type {key} not allowed"));
            }
        }
    }
    let pod_sc = spec.get("securityContext").cloned().unwrap_or(Value::Null);
    let pod_non_root = pod_sc.get("runAsNonRoot") == Some(&Value::Bool(true));
    let pod_seccomp = pod_sc
        .pointer("/seccompProfile/type")
        .and_then(Value::as_str);
    if pod_sc.get("runAsUser").and_then(Value::as_u64) == Some(0) {
        v.push("pod runAsUser: 0".to_string());
    }
    for seccomp in [pod_seccomp].into_iter().flatten() {
        if seccomp != "RuntimeDefault" && seccomp != "Localhost" {
            v.push(format!("pod seccompProfile {seccomp}"));
        }
    }
    for c in containers(spec) {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
        let sc = c.get("securityContext").cloned().unwrap_or(Value::Null);
        let net_admin = ex.net_admin_containers.contains(&name);
        if sc.get("privileged") == Some(&Value::Bool(true)) {
            v.push(format!("{name}: privileged"));
        }
        if sc.get("allowPrivilegeEscalation") != Some(&Value::Bool(false)) {
            v.push(format!("{name}: allowPrivilegeEscalation must be false"));
        }
        let drops: Vec<&str> = sc
            .pointer("/capabilities/drop")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !drops.contains(&"ALL") {
            v.push(format!("{name}: capabilities must drop ALL"));
        }
        for add in sc
            .pointer("/capabilities/add")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let allowed = add == "NET_BIND_SERVICE"
                || (net_admin && (add == "NET_ADMIN" || add == "NET_RAW"));
            if !allowed {
                v.push(format!("{name}: capability {add} added"));
            }
        }
        let non_root = match sc.get("runAsNonRoot") {
            Some(Value::Bool(b)) => *b,
            _ => pod_non_root,
        };
        let uid = sc
            .get("runAsUser")
            .or_else(|| pod_sc.get("runAsUser"))
            .and_then(Value::as_u64);
        if !net_admin && !ex.root_containers.contains(&name) {
            if !non_root {
                v.push(format!("{name}: runAsNonRoot must be true"));
            }
            if uid == Some(0) {
                v.push(format!("{name}: runAsUser 0"));
            }
        }
        match sc
            .pointer("/seccompProfile/type")
            .and_then(Value::as_str)
            .or(pod_seccomp)
        {
            Some("RuntimeDefault") | Some("Localhost") => {}
            other => v.push(format!(
                "{name}: seccompProfile must be RuntimeDefault or Localhost, is {other:?}"
            )),
        }
        for port in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if port.get("hostPort").and_then(Value::as_u64).unwrap_or(0) != 0 {
                v.push(format!("{name}: hostPort"));
            }
        }
        if let Some(pm) = sc.get("procMount").and_then(Value::as_str) {
            if pm != "Default" {
                v.push(format!("{name}: procMount {pm}"));
            }
        }
    }
    v
}

/// The pod spec of a workload object, if it has one.
pub fn pod_spec(object: &Value) -> Option<&Value> {
    let ptr = match object.get("kind").and_then(Value::as_str)? {
        "Pod" => "/spec",
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => "/spec/template/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        _ => return None,
    };
    object.pointer(ptr)
}

/// `.venv/bin/kubernetes-validate` if installed; under `CI=true` it must be.
pub fn kubernetes_validate() -> Option<std::path::PathBuf> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/kubernetes-validate");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true but {} is missing: .venv/bin/pip install kubernetes-validate",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED schema validation: {} not installed",
        path.display()
    );
    None
}

/// Runs kubernetes-validate (strict: unknown fields are errors) on the files; panics with its
/// output when a manifest is invalid.
pub fn validate_schemas(tool: &std::path::Path, files: &[std::path::PathBuf]) {
    let out = std::process::Command::new(tool)
        .arg("--strict")
        .arg("--quiet")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "kubernetes-validate rejected the manifests:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
