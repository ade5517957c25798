//! `svidcar inject`: Kubernetes sidecar injection (stub).
