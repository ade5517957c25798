//! rustls verifiers and config builders (stub).
