//! The svidcar sidecar proxy: inbound and outbound mTLS, egress, the policy engine, the hot path,
//! admin endpoints, traffic interception (`init`) and Kubernetes injection (`inject`).

pub mod init;
pub mod inject;
pub mod policy;
