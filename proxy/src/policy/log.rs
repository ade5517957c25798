//! The decision log event (POLICY.md §6): direction, decision, reason, dry-run and audit info,
//! and the attributes used. `dry_run_decision` / `dry_run_rule` appear only when the shadow
//! decision differs from the actual one.

use super::request::{Decision, Request};

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Emits one `tracing` event (target `svidcar::authz`, INFO) for a decision.
pub fn log_decision(req: &Request<'_>, d: &Decision) {
    let audit = if d.audit.is_empty() {
        "-".to_string()
    } else {
        d.audit.join(",")
    };
    macro_rules! event {
        ($($extra:tt)*) => {
            tracing::info!(
                target: "svidcar::authz",
                direction = ?req.direction,
                protocol = ?req.protocol,
                decision = d.label(),
                reason = %d.reason,
                $($extra)*
                audit = %audit,
                peer = %opt(req.peer),
                src_ip = %opt(req.source_ip),
                dst_ip = %opt(req.destination_ip),
                dst_port = %opt(req.destination_port),
                dst_spiffe_id = %opt(req.destination_spiffe_id),
                sni = req.sni.unwrap_or("-"),
                connect = req.connect_authority.unwrap_or("-"),
                host = req.host.unwrap_or("-"),
                method = req.method.unwrap_or("-"),
                path = req.path.unwrap_or("-"),
                "authorization decision"
            )
        };
    }
    match &d.shadow {
        Some(s) => event!(
            dry_run_decision = if s.allow { "ALLOW" } else { "DENY" },
            dry_run_rule = %s.reason,
        ),
        None => event!(),
    }
}
