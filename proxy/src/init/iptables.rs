//! Rendering for the iptables backend: `iptables-restore --noflush` input for the nat table.
//!
//! Each chain svidcar owns is declared (`:CHAIN - [0:0]`), which under `--noflush` creates it
//! or flushes it, then refilled — one transaction, so re-running replaces the rules instead of
//! duplicating them. The two jumps from the built-in chains are added only when missing (see
//! `apply`), the only lines that depend on the installed state.

use std::fmt::Write as _;

use super::{Family, InterceptionConfig, INBOUND_PASSTHROUGH_SOURCE_V4};

/// The jumps from the built-in nat chains into svidcar's chains, as `iptables-save` prints them.
pub(crate) fn jump_rules() -> [&'static str; 2] {
    [
        "-A PREROUTING -p tcp -j SVIDCAR_INBOUND",
        "-A OUTPUT -p tcp -j SVIDCAR_OUTPUT",
    ]
}

/// Is this `iptables-save` line a jump from a built-in chain into one of svidcar's chains?
pub(crate) fn is_installed_jump(line: &str) -> bool {
    let line = line.trim();
    (line.starts_with("-A PREROUTING ") || line.starts_with("-A OUTPUT "))
        && line.contains(" -j SVIDCAR_")
}

/// The loopback network of a family: never redirected outbound.
fn loopback(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    }
}

/// The full ruleset of one family, jumps included.
pub(crate) fn render(config: &InterceptionConfig, family: Family) -> String {
    render_with_jumps(config, family, &[], &jump_rules())
}

/// Given an `iptables-save -t nat` dump, the jump lines to delete (stale forms, duplicates) and
/// the canonical jumps to add, so that exactly one copy of each canonical jump remains.
pub(crate) fn reconcile_jumps(save: &str) -> (Vec<String>, Vec<&'static str>) {
    let canonical = jump_rules();
    let mut deletes = Vec::new();
    let mut seen = [false; 2];
    for line in save.lines().map(str::trim).filter(|l| is_installed_jump(l)) {
        match canonical.iter().position(|c| *c == line) {
            Some(i) if !seen[i] => seen[i] = true,
            _ => deletes.push(line.to_string()),
        }
    }
    let adds = canonical
        .iter()
        .zip(seen)
        .filter(|(_, present)| !present)
        .map(|(jump, _)| *jump)
        .collect();
    (deletes, adds)
}

/// The ruleset that first deletes `deletes` (installed jump lines, as `iptables-save` prints
/// them) and ends with only the jump lines `adds`.
pub(crate) fn render_with_jumps(
    config: &InterceptionConfig,
    family: Family,
    deletes: &[String],
    adds: &[&str],
) -> String {
    let mut out = String::from("*nat\n");
    for line in deletes {
        if let Some(rest) = line.strip_prefix("-A ") {
            let _ = writeln!(out, "-D {rest}");
        }
    }
    for chain in super::IPTABLES_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    // Inbound: own and excluded ports stay, everything else goes to the inbound listener.
    for port in config.effective_inbound_exclusions() {
        let _ = writeln!(out, "-A SVIDCAR_INBOUND -p tcp --dport {port} -j RETURN");
    }
    out.push_str("-A SVIDCAR_INBOUND -p tcp -j SVIDCAR_IN_REDIRECT\n");
    let _ = writeln!(
        out,
        "-A SVIDCAR_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        config.inbound_port
    );
    // Outbound, in order: the proxy's inbound forwarding, the proxy calling its own pod,
    // the application over loopback, the proxy's own traffic, loopback, exclusions.
    let uid = config.proxy_uid;
    let lo = loopback(family);
    if family == Family::V4 {
        let _ = writeln!(
            out,
            "-A SVIDCAR_OUTPUT -s {INBOUND_PASSTHROUGH_SOURCE_V4}/32 -o lo -j RETURN"
        );
    }
    let _ = writeln!(
        out,
        "-A SVIDCAR_OUTPUT ! -d {lo} -o lo -p tcp -m owner --uid-owner {uid} -j SVIDCAR_IN_REDIRECT"
    );
    let _ = writeln!(
        out,
        "-A SVIDCAR_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"
    );
    let _ = writeln!(
        out,
        "-A SVIDCAR_OUTPUT -m owner --uid-owner {uid} -j RETURN"
    );
    let _ = writeln!(out, "-A SVIDCAR_OUTPUT -d {lo} -j RETURN");
    for cidr in config.outbound_cidrs(family) {
        let _ = writeln!(out, "-A SVIDCAR_OUTPUT -d {cidr} -j RETURN");
    }
    for port in config.effective_outbound_port_exclusions() {
        let _ = writeln!(out, "-A SVIDCAR_OUTPUT -p tcp --dport {port} -j RETURN");
    }
    out.push_str("-A SVIDCAR_OUTPUT -j SVIDCAR_REDIRECT\n");
    let _ = writeln!(
        out,
        "-A SVIDCAR_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    );
    for jump in adds {
        out.push_str(jump);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// Removal: delete the given installed jump lines (as `iptables-save` printed them), then
/// flush and delete svidcar's chains. Declaring a chain under `--noflush` creates or flushes
/// it, so `-X` succeeds whether or not it existed.
pub(crate) fn render_cleanup(installed_jumps: &[&str]) -> String {
    let mut out = String::from("*nat\n");
    for jump in installed_jumps {
        if let Some(rest) = jump.trim().strip_prefix("-A ") {
            let _ = writeln!(out, "-D {rest}");
        }
    }
    for chain in super::IPTABLES_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for chain in super::IPTABLES_CHAINS {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Does this `iptables-save -t nat` output contain anything svidcar installed?
pub(crate) fn is_installed(save: &str) -> bool {
    save.lines().any(|l| {
        is_installed_jump(l)
            || super::IPTABLES_CHAINS
                .iter()
                .any(|c| l.trim().starts_with(&format!(":{c} ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_keeps_one_canonical_copy_and_removes_stale_forms() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n\
            -A PREROUTING -p tcp -j SVIDCAR_INBOUND\n\
            -A PREROUTING -p tcp -j SVIDCAR_INBOUND\n\
            -A OUTPUT -j SVIDCAR_OUTPUT\n\
            -A OUTPUT -p udp -j OTHER\nCOMMIT\n";
        let (deletes, adds) = reconcile_jumps(save);
        assert_eq!(
            deletes,
            [
                "-A PREROUTING -p tcp -j SVIDCAR_INBOUND",
                "-A OUTPUT -j SVIDCAR_OUTPUT"
            ]
        );
        assert_eq!(adds, ["-A OUTPUT -p tcp -j SVIDCAR_OUTPUT"]);
        let text = render_with_jumps(&InterceptionConfig::default(), Family::V4, &deletes, &adds);
        assert!(text.starts_with(
            "*nat\n-D PREROUTING -p tcp -j SVIDCAR_INBOUND\n-D OUTPUT -j SVIDCAR_OUTPUT\n"
        ));
        assert!(text.ends_with("-A OUTPUT -p tcp -j SVIDCAR_OUTPUT\nCOMMIT\n"));
        assert!(!text.contains("-A PREROUTING"));
    }

    #[test]
    fn reconcile_on_a_pristine_table_adds_both_jumps() {
        let (deletes, adds) = reconcile_jumps("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n");
        assert!(deletes.is_empty());
        assert_eq!(adds, jump_rules());
    }
}
