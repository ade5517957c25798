//! The containers and volumes that injection adds, as Kubernetes JSON.

use serde_json::{json, Value};

use super::{
    InjectConfig, SocketVolume, INIT_CONTAINER, INIT_SCRATCH_VOLUME, POLICY_MOUNT_PATH,
    POLICY_VOLUME, PROXY_CONTAINER, SOCKET_FILE, SOCKET_MOUNT_PATH, SOCKET_VOLUME,
};
use crate::init::{Cidr, DEFAULT_ADMIN_PORT, DEFAULT_PROXY_UID};

/// Per-pod interception exclusions, from the annotations.
#[derive(Debug, Default, Clone)]
pub(crate) struct Exclusions {
    pub inbound_ports: Vec<u16>,
    pub outbound_ports: Vec<u16>,
    pub outbound_cidrs: Vec<Cidr>,
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The native sidecar: an init container with `restartPolicy: Always`. With a policy ConfigMap
/// ([`policy_volume`]) it is mounted read-only and passed as `--policy`.
pub(crate) fn proxy_container(image: &str, config: &InjectConfig, policy: bool) -> Value {
    let uid = DEFAULT_PROXY_UID;
    let mut args = config.proxy_args.clone();
    let mut mounts = vec![json!(
        {"name": SOCKET_VOLUME, "mountPath": SOCKET_MOUNT_PATH, "readOnly": true}
    )];
    if policy {
        args.extend(["--policy".to_string(), POLICY_MOUNT_PATH.to_string()]);
        mounts
            .push(json!({"name": POLICY_VOLUME, "mountPath": POLICY_MOUNT_PATH, "readOnly": true}));
    }
    json!({
        "name": PROXY_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "args": args,
        "env": [
            {"name": "SPIFFE_ENDPOINT_SOCKET",
             "value": format!("unix://{SOCKET_MOUNT_PATH}/{SOCKET_FILE}")},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [
            {"name": "svidcar-admin", "containerPort": DEFAULT_ADMIN_PORT, "protocol": "TCP"},
        ],
        "startupProbe": {
            "httpGet": {"path": "/ready", "port": DEFAULT_ADMIN_PORT},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 120,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": DEFAULT_ADMIN_PORT},
            "periodSeconds": 5,
            "timeoutSeconds": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": DEFAULT_ADMIN_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
        "securityContext": {
            "runAsUser": uid,
            "runAsGroup": uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    })
}

/// The volume of the pod's policy ConfigMap `name`. Not optional: a pod whose policy is missing
/// does not start (rather than running without its policy).
pub(crate) fn policy_volume(name: &str) -> Value {
    json!({
        "name": POLICY_VOLUME,
        "configMap": {"name": name, "optional": false, "defaultMode": 0o444},
    })
}

/// The init container that installs the interception rules: root, but only with `NET_ADMIN`
/// and `NET_RAW` (the only exception to the "restricted" Pod Security profile).
pub(crate) fn init_container(image: &str, config: &InjectConfig, ex: &Exclusions) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--backend".to_string(),
        config.init_backend.to_string(),
        "--proxy-uid".to_string(),
        DEFAULT_PROXY_UID.to_string(),
    ];
    for (flag, value) in [
        ("--exclude-inbound-ports", join(&ex.inbound_ports)),
        ("--exclude-outbound-ports", join(&ex.outbound_ports)),
        ("--exclude-outbound-cidrs", join(&ex.outbound_cidrs)),
    ] {
        if !value.is_empty() {
            args.push(flag.to_string());
            args.push(value);
        }
    }
    json!({
        "name": INIT_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": [
            {"name": "XTABLES_LOCKFILE", "value": "/run/svidcar-init/xtables.lock"},
        ],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": INIT_SCRATCH_VOLUME, "mountPath": "/run/svidcar-init"},
        ],
    })
}

/// The agent socket volume and the init container's scratch volume.
pub(crate) fn volumes(config: &InjectConfig) -> [Value; 2] {
    let socket = match &config.socket_volume {
        SocketVolume::HostPath(dir) => json!({
            "name": SOCKET_VOLUME,
            "hostPath": {"path": dir, "type": "Directory"},
        }),
        SocketVolume::Csi(driver) => json!({
            "name": SOCKET_VOLUME,
            "csi": {"driver": driver, "readOnly": true},
        }),
    };
    let scratch = json!({
        "name": INIT_SCRATCH_VOLUME,
        "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
    });
    [socket, scratch]
}
