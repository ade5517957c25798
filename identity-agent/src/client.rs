//! Workload API client (stub).
