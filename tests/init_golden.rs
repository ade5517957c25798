//! Golden files of the interception rulesets (`tests/golden/init-*.rules`).
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test --test init_golden`,
//! then review the diff.
use std::path::PathBuf;
use std::process::Command;

use svidcar_proxy::init::{render, render_cleanup, Backend, InterceptionConfig};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("missing golden file {}: {e}", path.display()));
    assert_eq!(
        actual,
        expected,
        "ruleset differs from {} (UPDATE_GOLDEN=1 to regenerate after an intended change)",
        path.display()
    );
}

fn excluding() -> InterceptionConfig {
    InterceptionConfig {
        exclude_inbound_ports: vec![22, 9090, 22],
        exclude_outbound_ports: vec![5432, 53],
        exclude_outbound_cidrs: vec![
            "10.96.0.0/12".parse().unwrap(),
            "169.254.169.254".parse().unwrap(),
            "fd00:10:96::/112".parse().unwrap(),
        ],
        ..InterceptionConfig::default()
    }
}

fn custom() -> InterceptionConfig {
    InterceptionConfig {
        outbound_port: 16001,
        inbound_port: 16006,
        admin_port: 16000,
        proxy_uid: 2000,
        ipv6: true,
        ..InterceptionConfig::default()
    }
}

#[test]
fn iptables_defaults() {
    check_golden(
        "init-iptables-default.rules",
        &render(&InterceptionConfig::default(), Backend::Iptables),
    );
}

#[test]
fn iptables_exclusions_dual_stack() {
    let config = InterceptionConfig {
        ipv6: true,
        ..excluding()
    };
    check_golden(
        "init-iptables-exclusions-ipv6.rules",
        &render(&config, Backend::Iptables),
    );
}

#[test]
fn iptables_custom_ports_and_uid() {
    check_golden(
        "init-iptables-custom.rules",
        &render(&custom(), Backend::Iptables),
    );
}

#[test]
fn nft_defaults() {
    check_golden(
        "init-nft-default.rules",
        &render(&InterceptionConfig::default(), Backend::Nft),
    );
}

#[test]
fn nft_exclusions_dual_stack() {
    let config = InterceptionConfig {
        ipv6: true,
        ..excluding()
    };
    check_golden(
        "init-nft-exclusions-ipv6.rules",
        &render(&config, Backend::Nft),
    );
}

#[test]
fn nft_exclusions_ipv4_only_drops_ipv6_networks() {
    let text = render(&excluding(), Backend::Nft);
    check_golden("init-nft-exclusions-ipv4.rules", &text);
    assert!(
        !text.contains("fd00:10:96::"),
        "IPv6 networks must not appear without --ipv6"
    );
    assert!(text.contains("meta nfproto ipv6 return"));
}

#[test]
fn nft_custom_ports_and_uid() {
    check_golden("init-nft-custom.rules", &render(&custom(), Backend::Nft));
}

#[test]
fn cleanup_rulesets() {
    check_golden(
        "init-iptables-cleanup.rules",
        &render_cleanup(Backend::Iptables),
    );
    check_golden("init-nft-cleanup.rules", &render_cleanup(Backend::Nft));
}

#[test]
fn rendering_is_deterministic_and_dedups() {
    let a = render(&excluding(), Backend::Iptables);
    assert_eq!(a, render(&excluding(), Backend::Iptables));
    assert_eq!(a.matches("--dport 22 -j RETURN").count(), 1, "{a}");
}

/// The CLI's `--dry-run` prints exactly the library's rendering for the same flags.
#[test]
fn cli_dry_run_prints_the_rendered_ruleset() {
    let out = Command::new(env!("CARGO_BIN_EXE_svidcar"))
        .args([
            "init",
            "--dry-run",
            "--ipv6",
            "on",
            "--exclude-inbound-ports",
            "22,9090",
            "--exclude-outbound-ports",
            "5432,53",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,169.254.169.254,fd00:10:96::/112",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = render(
        &InterceptionConfig {
            ipv6: true,
            ..excluding()
        },
        Backend::Iptables,
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);

    let out = Command::new(env!("CARGO_BIN_EXE_svidcar"))
        .args(["init", "--dry-run", "--backend", "nft", "--ipv6", "off"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        render(&InterceptionConfig::default(), Backend::Nft)
    );
}

#[test]
fn cli_rejects_bad_cidr_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_svidcar"))
        .args([
            "init",
            "--dry-run",
            "--exclude-outbound-cidrs",
            "10.0.0.0/40",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid prefix length"), "{err}");
}
