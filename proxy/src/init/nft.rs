//! Rendering for the nftables backend: one `nft -f` file that (re)creates the `inet svidcar`
//! table. `table inet svidcar` (create if missing) + `delete table inet svidcar` + the full
//! table is one atomic transaction, whatever was installed before.

use std::fmt::Write as _;

use super::{Family, InterceptionConfig, INBOUND_PASSTHROUGH_SOURCE_V4, NFT_TABLE};

fn set(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().collect();
    format!("{{ {} }}", items.join(", "))
}

/// The whole table, both families in one `inet` table (IPv6 skipped unless enabled).
pub(crate) fn render(config: &InterceptionConfig) -> String {
    let uid = config.proxy_uid;
    let skip_v6 = if config.ipv6 {
        ""
    } else {
        "\t\tmeta nfproto ipv6 return\n"
    };
    let mut out = String::new();
    let _ = writeln!(out, "table inet {NFT_TABLE}");
    let _ = writeln!(out, "delete table inet {NFT_TABLE}");
    let _ = writeln!(out, "table inet {NFT_TABLE} {{");
    let _ = write!(
        out,
        "\tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;\n\
         {skip_v6}\t\tmeta l4proto tcp jump inbound\n\t}}\n"
    );
    let _ = write!(
        out,
        "\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\
         {skip_v6}\t\tmeta l4proto tcp jump outbound\n\t}}\n"
    );
    let inbound_ports = set(config
        .effective_inbound_exclusions()
        .iter()
        .map(u16::to_string));
    let _ = write!(
        out,
        "\tchain inbound {{\n\t\ttcp dport {inbound_ports} return\n\t\tjump in_redirect\n\t}}\n"
    );
    let _ = write!(
        out,
        "\tchain in_redirect {{\n\t\tmeta l4proto tcp redirect to :{}\n\t}}\n",
        config.inbound_port
    );
    out.push_str("\tchain outbound {\n");
    let _ = writeln!(
        out,
        "\t\toifname \"lo\" ip saddr {INBOUND_PASSTHROUGH_SOURCE_V4} return"
    );
    let _ = writeln!(
        out,
        "\t\toifname \"lo\" ip daddr != 127.0.0.0/8 meta skuid {uid} jump in_redirect"
    );
    if config.ipv6 {
        let _ = writeln!(
            out,
            "\t\toifname \"lo\" ip6 daddr != ::1 meta skuid {uid} jump in_redirect"
        );
    }
    let _ = writeln!(out, "\t\toifname \"lo\" meta skuid != {uid} return");
    let _ = writeln!(out, "\t\tmeta skuid {uid} return");
    out.push_str("\t\tip daddr 127.0.0.0/8 return\n");
    if config.ipv6 {
        out.push_str("\t\tip6 daddr ::1 return\n");
    }
    let v4 = config.outbound_cidrs(Family::V4);
    if !v4.is_empty() {
        let _ = writeln!(
            out,
            "\t\tip daddr {} return",
            set(v4.iter().map(|c| c.to_string()))
        );
    }
    let v6 = config.outbound_cidrs(Family::V6);
    if config.ipv6 && !v6.is_empty() {
        let _ = writeln!(
            out,
            "\t\tip6 daddr {} return",
            set(v6.iter().map(|c| c.to_string()))
        );
    }
    let ports = config.effective_outbound_port_exclusions();
    if !ports.is_empty() {
        let _ = writeln!(
            out,
            "\t\ttcp dport {} return",
            set(ports.iter().map(u16::to_string))
        );
    }
    out.push_str("\t\tjump out_redirect\n\t}\n");
    let _ = write!(
        out,
        "\tchain out_redirect {{\n\t\tmeta l4proto tcp redirect to :{}\n\t}}\n",
        config.outbound_port
    );
    out.push_str("}\n");
    out
}

/// Removal: create-if-missing then delete, so it succeeds whether or not the table exists.
pub(crate) fn render_cleanup() -> String {
    format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
}
