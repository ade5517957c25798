//! Planning: an object in, the JSON Patch that injects it out (or the reason it is skipped).

use serde::Serialize;
use serde_json::Value;

use super::sidecar::{self, Exclusions};
use super::{
    InjectConfig, InjectError, ANNOTATION_EXCLUDE_INBOUND_PORTS, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS, ANNOTATION_INJECT, ANNOTATION_POLICY_CONFIGMAP,
    ANNOTATION_PROXY_IMAGE, INIT_CONTAINER, INIT_SCRATCH_VOLUME, POLICY_VOLUME, PROXY_CONTAINER,
    SOCKET_VOLUME,
};
use crate::init::Cidr;

/// One JSON Patch (RFC 6902) operation; injection only ever adds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatchOp {
    /// Always `"add"`.
    pub op: &'static str,
    /// JSON Pointer of the target.
    pub path: String,
    /// The value added.
    pub value: Value,
}

impl PatchOp {
    fn add(path: String, value: Value) -> Self {
        PatchOp {
            op: "add",
            path,
            value,
        }
    }
}

/// What to do with one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Leave it unchanged, for this reason (not a pod workload, opted out, already injected…).
    Skip(String),
    /// Apply these operations, in order.
    Patch(Vec<PatchOp>),
}

/// JSON Pointer of the pod spec inside an object of this kind, `None` for kinds that have no
/// pod template (they pass through unchanged).
pub fn pod_spec_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some("/spec"),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "Job"
        | "ReplicaSet"
        | "ReplicationController" => Some("/spec/template/spec"),
        "CronJob" => Some("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    }
}

fn pod_metadata_pointer(spec_pointer: &str) -> String {
    match spec_pointer.strip_suffix("/spec") {
        Some("") => "/metadata".to_string(),
        Some(prefix) => format!("{prefix}/metadata"),
        None => "/metadata".to_string(),
    }
}

/// The annotation value on the pod template, or else on the object itself.
fn annotation<'a>(object: &'a Value, pod_meta: &str, key: &str) -> Option<&'a str> {
    let lookup = |meta: &str| {
        object
            .pointer(&format!("{meta}/annotations"))
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
    };
    lookup(pod_meta).or_else(|| lookup("/metadata"))
}

fn parse_list<T>(
    key: &'static str,
    value: Option<&str>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, InjectError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            parse(item).map_err(|reason| InjectError::BadAnnotation {
                key,
                value: value.to_string(),
                reason,
            })
        })
        .collect()
}

/// A Kubernetes object name (RFC 1123 subdomain): ConfigMap names.
fn is_object_name(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    name.len() <= 253
        && name.chars().all(ok_char)
        && ok_end(name.chars().next())
        && ok_end(name.chars().last())
}

fn parse_port(item: &str) -> Result<u16, String> {
    match item.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("`{item}` is not a TCP port (1-65535)")),
    }
}

fn names(list: Option<&Value>) -> Vec<&str> {
    list.and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// Plans the injection of one object of the given kind. Pure: the object is not modified.
pub fn plan(object: &Value, kind: &str, config: &InjectConfig) -> Result<Plan, InjectError> {
    let Some(spec_ptr) = pod_spec_pointer(kind) else {
        return Ok(Plan::Skip(format!("kind {kind} has no pod template")));
    };
    let name = object
        .pointer("/metadata/name")
        .or_else(|| object.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let malformed = |reason: &str| InjectError::Malformed {
        kind: kind.to_string(),
        name: name.clone(),
        reason: reason.to_string(),
    };
    let meta_ptr = pod_metadata_pointer(spec_ptr);
    match annotation(object, &meta_ptr, ANNOTATION_INJECT) {
        Some("false") => return Ok(Plan::Skip(format!("{ANNOTATION_INJECT} is \"false\""))),
        Some("true") | None => {}
        Some(other) => {
            return Err(InjectError::BadAnnotation {
                key: ANNOTATION_INJECT,
                value: other.to_string(),
                reason: "expected \"true\" or \"false\"".to_string(),
            })
        }
    }
    let spec = object
        .pointer(spec_ptr)
        .filter(|s| s.is_object())
        .ok_or_else(|| malformed(&format!("no pod spec at {spec_ptr}")))?;
    let containers = names(spec.get("containers"));
    let init_containers = names(spec.get("initContainers"));
    if containers
        .iter()
        .chain(&init_containers)
        .any(|n| *n == PROXY_CONTAINER || *n == INIT_CONTAINER)
    {
        return Ok(Plan::Skip("already injected".to_string()));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Plan::Skip(
            "hostNetwork pod: interception would capture the node's traffic".to_string(),
        ));
    }
    if containers.is_empty() {
        return Err(malformed("the pod spec has no containers"));
    }
    let volume_names = names(spec.get("volumes"));
    if let Some(clash) = volume_names
        .iter()
        .find(|n| **n == SOCKET_VOLUME || **n == INIT_SCRATCH_VOLUME || **n == POLICY_VOLUME)
    {
        return Err(malformed(&format!("a volume named {clash} already exists")));
    }

    let exclusions = Exclusions {
        inbound_ports: parse_list(
            ANNOTATION_EXCLUDE_INBOUND_PORTS,
            annotation(object, &meta_ptr, ANNOTATION_EXCLUDE_INBOUND_PORTS),
            parse_port,
        )?,
        outbound_ports: parse_list(
            ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
            annotation(object, &meta_ptr, ANNOTATION_EXCLUDE_OUTBOUND_PORTS),
            parse_port,
        )?,
        outbound_cidrs: parse_list(
            ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
            annotation(object, &meta_ptr, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS),
            |s| s.parse::<Cidr>().map_err(|e| e.to_string()),
        )?,
    };
    let image = match annotation(object, &meta_ptr, ANNOTATION_PROXY_IMAGE) {
        Some(img) if img.trim().is_empty() || img.contains(char::is_whitespace) => {
            return Err(InjectError::BadAnnotation {
                key: ANNOTATION_PROXY_IMAGE,
                value: img.to_string(),
                reason: "not an image reference".to_string(),
            })
        }
        Some(img) => img,
        None => config.image.as_str(),
    };

    let policy = match annotation(object, &meta_ptr, ANNOTATION_POLICY_CONFIGMAP) {
        Some(name) if !is_object_name(name) => {
            return Err(InjectError::BadAnnotation {
                key: ANNOTATION_POLICY_CONFIGMAP,
                value: name.to_string(),
                reason: "not a ConfigMap name (lowercase letters, digits, '-' and '.', at most \
                         253)"
                    .to_string(),
            })
        }
        other => other,
    };

    let init = sidecar::init_container(image, config, &exclusions);
    let proxy = sidecar::proxy_container(image, config, policy.is_some());
    let [socket_vol, scratch_vol] = sidecar::volumes(config);
    let mut new_volumes = vec![socket_vol, scratch_vol];
    new_volumes.extend(policy.map(sidecar::policy_volume));
    let mut ops = Vec::new();
    if spec.get("initContainers").is_some_and(Value::is_array) {
        // Inserted at the front, proxy then init, so the order is init, proxy, the rest.
        ops.push(PatchOp::add(format!("{spec_ptr}/initContainers/0"), proxy));
        ops.push(PatchOp::add(format!("{spec_ptr}/initContainers/0"), init));
    } else {
        ops.push(PatchOp::add(
            format!("{spec_ptr}/initContainers"),
            Value::Array(vec![init, proxy]),
        ));
    }
    if spec.get("volumes").is_some_and(Value::is_array) {
        for v in new_volumes {
            ops.push(PatchOp::add(format!("{spec_ptr}/volumes/-"), v));
        }
    } else {
        ops.push(PatchOp::add(
            format!("{spec_ptr}/volumes"),
            Value::Array(new_volumes),
        ));
    }
    Ok(Plan::Patch(ops))
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
