//! Installing and removing the rules with the system tools, one atomic transaction per family.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::{iptables, nft, Backend, Family, InterceptionConfig};

/// Why the rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The tool could not be started at all.
    #[error(
        "could not run `{tool}`: {source} (is the {package} package installed in this image, \
         and does the container have CAP_NET_ADMIN and CAP_NET_RAW?)"
    )]
    Spawn {
        /// The program.
        tool: &'static str,
        /// The package that ships it.
        package: &'static str,
        /// The error from the OS.
        #[source]
        source: std::io::Error,
    },
    /// The tool ran and refused the ruleset.
    #[error("`{tool}` failed ({status}): {stderr}")]
    Failed {
        /// The program.
        tool: &'static str,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Runs `tool args…`, feeding `stdin`, and returns its stdout.
fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
    let package = if tool == "nft" {
        "nftables"
    } else {
        "iptables"
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ApplyError::Spawn {
            tool,
            package,
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| ApplyError::Spawn {
                tool,
                package,
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| ApplyError::Spawn {
            tool,
            package,
            source,
        })?;
    if !output.status.success() {
        return Err(ApplyError::Failed {
            tool,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn save_tool(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-save",
        Family::V6 => "ip6tables-save",
    }
}

fn restore_tool(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    }
}

/// Installs (or replaces) the rules. Idempotent: running it twice leaves one copy of every rule.
/// With iptables, IPv4 and IPv6 are two transactions (IPv4 first).
pub fn apply(config: &InterceptionConfig, backend: Backend) -> Result<(), ApplyError> {
    match backend {
        Backend::Nft => run("nft", &["-f", "-"], Some(&nft::render(config))).map(|_| ()),
        Backend::Iptables => {
            let mut families = vec![Family::V4];
            if config.ipv6 {
                families.push(Family::V6);
            }
            for family in families {
                let save = run(save_tool(family), &["-t", "nat"], None)?;
                let (deletes, adds) = iptables::reconcile_jumps(&save);
                let text = iptables::render_with_jumps(config, family, &deletes, &adds);
                run(restore_tool(family), &["--noflush"], Some(&text))?;
            }
            Ok(())
        }
    }
}

/// Removes everything svidcar installed, for both families. Idempotent: succeeds, changing
/// nothing, when nothing is installed. With iptables, a family whose tables cannot be read
/// (e.g. IPv6 disabled in the kernel) has nothing of ours and is skipped.
pub fn cleanup(backend: Backend) -> Result<(), ApplyError> {
    match backend {
        Backend::Nft => run("nft", &["-f", "-"], Some(&nft::render_cleanup())).map(|_| ()),
        Backend::Iptables => {
            for family in [Family::V4, Family::V6] {
                let save = match run(save_tool(family), &["-t", "nat"], None) {
                    Ok(save) => save,
                    Err(e) if family == Family::V6 => {
                        tracing::debug!(error = %e, "no IPv6 nat table to clean");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if !iptables::is_installed(&save) {
                    continue;
                }
                let jumps: Vec<&str> = save
                    .lines()
                    .filter(|l| iptables::is_installed_jump(l))
                    .collect();
                run(
                    restore_tool(family),
                    &["--noflush"],
                    Some(&iptables::render_cleanup(&jumps)),
                )?;
            }
            Ok(())
        }
    }
}
