//! The pod UID and container ID of a process, from `/proc/<pid>/cgroup`.
//!
//! Understood layouts (cgroup v1 `N:controllers:/path` lines and the v2 `0::/path` line):
//!
//! * cgroupfs driver: `/kubepods/<qos>/pod<uid>/<container-id>` (no `<qos>` for Guaranteed
//!   pods), possibly nested under another prefix (kind, Docker-in-Docker: `/docker/<id>/kubepods/…`);
//! * systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/
//!   <runtime>-<container-id>.scope` with `<runtime>` one of `cri-containerd`, `docker`, `crio`,
//!   `containerd` (also under `kubelet.slice/kubelet-kubepods.slice`).
//!
//! A process in its own cgroup namespace (it sees `0::/`) or outside any pod yields `None`.

/// Where a process lives in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// The pod's `metadata.uid` (with dashes).
    pub pod_uid: String,
    /// The container ID as the runtime knows it (64 hex digits), if the process is in a
    /// container cgroup rather than the pod's own.
    pub container_id: Option<String>,
}

/// Runtime prefixes of systemd scope names.
const SCOPE_PREFIXES: [&str; 4] = ["cri-containerd-", "docker-", "crio-", "containerd-"];

/// Parses the contents of `/proc/<pid>/cgroup`. The first line naming a pod wins, preferring
/// one that also names a container.
pub fn parse(text: &str) -> Option<ContainerRef> {
    let mut pod_only = None;
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        if let Some(r) = parse_path(path) {
            if r.container_id.is_some() {
                return Some(r);
            }
            pod_only.get_or_insert(r);
        }
    }
    pod_only
}

/// Parses one cgroup path.
pub fn parse_path(path: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // The last segment naming a pod (nested hierarchies repeat prefixes, never pods).
    let (i, pod_uid) = segments
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, s)| pod_uid_of(s).map(|u| (i, u)))?;
    let container_id = segments.get(i + 1).and_then(|s| container_id_of(s));
    Some(ContainerRef {
        pod_uid,
        container_id,
    })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(segment: &str) -> Option<String> {
    let raw = if let Some(slice) = segment.strip_suffix(".slice") {
        let at = slice.rfind("-pod")?;
        if !slice.contains("kubepods") {
            return None;
        }
        slice[at + 4..].replace('_', "-")
    } else {
        segment.strip_prefix("pod")?.to_string()
    };
    valid_uid(&raw).then(|| raw.to_ascii_lowercase())
}

/// A UUID (8-4-4-4-12 hex) or, for static pods, a 32-hex-digit hash.
fn valid_uid(s: &str) -> bool {
    let hex = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = s.split('-').collect();
    match parts.as_slice() {
        [one] => one.len() == 32 && hex(one),
        [a, b, c, d, e] => {
            a.len() == 8
                && b.len() == 4
                && c.len() == 4
                && d.len() == 4
                && e.len() == 12
                && parts.iter().all(|p| hex(p))
        }
        _ => false,
    }
}

/// `<id>` (cgroupfs) or `<runtime>-<id>.scope` (systemd); `crio-conmon-…` is the monitor, not
/// the container.
fn container_id_of(segment: &str) -> Option<String> {
    let id = match segment.strip_suffix(".scope") {
        Some(scope) => SCOPE_PREFIXES.iter().find_map(|p| scope.strip_prefix(p))?,
        None => segment,
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Strips the runtime scheme of a `status.containerStatuses[].containerID`
/// (`containerd://<id>`, `docker://<id>`, `cri-o://<id>`).
pub fn strip_runtime_scheme(container_id: &str) -> &str {
    container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

    #[test]
    fn v2_systemd_containerd() {
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-{CID}.scope\n");
        let r = parse(&text).unwrap();
        assert_eq!(r.pod_uid, UID);
        assert_eq!(r.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn v1_cgroupfs_and_guaranteed() {
        let text = format!("12:pids:/kubepods/besteffort/pod{UID}/{CID}\n11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}\n");
        assert_eq!(parse(&text).unwrap().container_id.as_deref(), Some(CID));
        let g = parse(&format!("4:memory:/kubepods/pod{UID}/{CID}\n")).unwrap();
        assert_eq!(
            (g.pod_uid.as_str(), g.container_id.as_deref()),
            (UID, Some(CID))
        );
    }

    #[test]
    fn not_a_pod_or_no_container() {
        assert_eq!(parse("0::/\n"), None);
        assert_eq!(
            parse("0::/user.slice/user-1000.slice/session-2.scope\n"),
            None
        );
        assert_eq!(parse("0::/kubepods/podnot-a-uid/abc\n"), None);
        let pod = parse(&format!("0::/kubepods/burstable/pod{UID}\n")).unwrap();
        assert_eq!((pod.pod_uid.as_str(), pod.container_id), (UID, None));
    }
}
