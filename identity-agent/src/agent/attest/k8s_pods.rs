//! The kubelet's `/pods` answer (a `PodList`): only what attestation reads, and the selectors
//! of a pod.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::k8s_cgroup;
use super::Selectors;

/// What we keep of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub service_account: String,
    pub node_name: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Container ID (without runtime scheme) → container name; init, sidecar and ephemeral
    /// containers included.
    pub containers: HashMap<String, String>,
}

impl PodInfo {
    /// The selectors of this pod (and of the container, when known).
    pub fn selectors(&self, container_id: Option<&str>) -> Selectors {
        let mut s = Selectors::new();
        s.insert(format!("k8s:ns:{}", self.namespace));
        s.insert(format!("k8s:sa:{}", self.service_account));
        s.insert(format!("k8s:pod-name:{}", self.name));
        s.insert(format!("k8s:pod-uid:{}", self.uid));
        if let Some(n) = &self.node_name {
            s.insert(format!("k8s:node-name:{n}"));
        }
        for (k, v) in &self.labels {
            s.insert(format!("k8s:pod-label:{k}:{v}"));
        }
        if let Some(name) = container_id.and_then(|c| self.containers.get(c)) {
            s.insert(format!("k8s:container-name:{name}"));
        }
        s
    }
}

// --- kubelet JSON (only what we read; everything else ignored) ---------------------------

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default = "default_ns")]
    namespace: String,
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn default_ns() -> String {
    "default".into()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    service_account_name: Option<String>,
    node_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Status {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    name: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

/// Parses a kubelet `/pods` answer (a `PodList`) into pods by UID.
pub fn parse_pod_list(json: &[u8]) -> Result<HashMap<String, PodInfo>, String> {
    let list: PodList = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .map(|p| {
            let st = p.status;
            let containers = st
                .container_statuses
                .into_iter()
                .chain(st.init_container_statuses)
                .chain(st.ephemeral_container_statuses)
                .filter_map(|c| {
                    let id = c.container_id?;
                    Some((k8s_cgroup::strip_runtime_scheme(&id).to_string(), c.name))
                })
                .collect();
            let uid = p.metadata.uid.to_ascii_lowercase();
            let info = PodInfo {
                name: p.metadata.name,
                namespace: p.metadata.namespace,
                uid: uid.clone(),
                service_account: p
                    .spec
                    .service_account_name
                    .unwrap_or_else(|| "default".into()),
                node_name: p.spec.node_name,
                labels: p.metadata.labels,
                containers,
            };
            (uid, info)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::attest::k8s::auto_identity;
    use crate::spiffe_id::TrustDomain;

    #[test]
    fn pod_list_and_selectors() {
        let json = br#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[{"metadata":{"name":"web-0","namespace":"shop","uid":"2C48913C-B29F-11E7-9350-020968147796","labels":{"app":"web"}},"spec":{"serviceAccountName":"web","nodeName":"n1","containers":[{"name":"app"}]},"status":{"phase":"Running","containerStatuses":[{"name":"app","containerID":"containerd://abc","ready":true}],"initContainerStatuses":[{"name":"svidcar","containerID":"containerd://def"}]}}]}"#;
        let pods = parse_pod_list(json).unwrap();
        let p = &pods["2c48913c-b29f-11e7-9350-020968147796"];
        let s = p.selectors(Some("def"));
        for want in [
            "k8s:ns:shop",
            "k8s:sa:web",
            "k8s:pod-name:web-0",
            "k8s:pod-label:app:web",
            "k8s:container-name:svidcar",
            "k8s:node-name:n1",
            "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796",
        ] {
            assert!(s.contains(want), "{want} missing from {s:?}");
        }
        let td = TrustDomain::parse("example.org").unwrap();
        assert_eq!(
            auto_identity(&td, &s).unwrap().as_str(),
            "spiffe://example.org/ns/shop/sa/web"
        );
        assert!(auto_identity(&td, &Selectors::new()).is_none());
        assert!(parse_pod_list(b"{not json").is_err());
    }
}
