//! `svidcar policy check` and `svidcar policy lint` (POLICY.md §10): offline evaluation with
//! exactly the engine the proxy runs.
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use svidcar_agent::SpiffeId;
use svidcar_proxy::policy::limits::{AppliedLimit, LimitKind};
use svidcar_proxy::policy::{
    normalize_name, Decision, Direction, Explanation, PolicyLoadError, PolicySet, Protocol, Reason,
    Request,
};

/// `svidcar policy`.
#[derive(Args)]
pub struct PolicyCmd {
    #[command(subcommand)]
    command: PolicySub,
}

#[derive(Subcommand)]
enum PolicySub {
    /// Evaluate one connection or request and show which rules did or did not match.
    Check(Box<CheckArgs>),
    /// Print the lint warnings of a policy set (exit 1 if there are any).
    Lint(LintArgs),
    /// Print a least-privilege policy set that allows exactly what a JSON access log recorded.
    Suggest(super::policy_observe::SuggestArgs),
    /// Decide a JSON access log again with a candidate set and print what would change (exit 2
    /// if anything that was allowed would be denied, or refused by a limit).
    Replay(super::policy_observe::ReplayArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum DirectionArg {
    Inbound,
    Egress,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Http,
    Grpc,
    Tcp,
    Tls,
    Connect,
}

#[derive(Args)]
struct CheckArgs {
    /// Policy file or directory.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// This proxy's own SPIFFE ID (selectors are matched against it).
    #[arg(long)]
    local_id: String,
    /// Direction.
    #[arg(long, value_enum)]
    direction: DirectionArg,
    /// Protocol (default: http if --method/--path given, else tcp).
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
    /// Inbound peer SPIFFE ID (verified X.509-SVID).
    #[arg(long, conflicts_with = "plaintext")]
    peer: Option<String>,
    /// Plaintext peer (no identity). Neither --peer nor --plaintext also means unauthenticated.
    #[arg(long)]
    plaintext: bool,
    /// Source IP.
    #[arg(long)]
    source_ip: Option<IpAddr>,
    /// Original destination port.
    #[arg(long)]
    port: Option<u16>,
    /// HTTP method.
    #[arg(long)]
    method: Option<String>,
    /// HTTP path (normalized with the set's pathNormalization and escapedSlashes before
    /// evaluation; a path the proxy refuses is `DENY by normalize:<reason>`).
    #[arg(long)]
    path: Option<String>,
    /// HTTP Host (checked like the proxy does: a value it answers `400` is
    /// `DENY by authority:<reason>`; then lowercased, port and trailing dot removed).
    #[arg(long)]
    host: Option<String>,
    /// HTTP header NAME=VALUE (repeatable; repeated names are joined with ",").
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Egress TLS SNI.
    #[arg(long)]
    sni: Option<String>,
    /// Egress CONNECT target HOST:PORT.
    #[arg(long)]
    connect: Option<String>,
    /// Egress destination IP.
    #[arg(long)]
    dest_ip: Option<IpAddr>,
    /// Egress mesh destination's expected SPIFFE ID.
    #[arg(long)]
    dest_spiffe_id: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Args)]
struct LintArgs {
    /// Policy file or directory.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Local SPIFFE IDs the set is meant for (enables L006).
    #[arg(long = "local-id")]
    local_ids: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

impl PolicyCmd {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            PolicySub::Check(a) => check(*a),
            PolicySub::Lint(a) => lint(a),
            PolicySub::Suggest(a) => super::policy_observe::suggest(a),
            PolicySub::Replay(a) => super::policy_observe::replay(a),
        }
    }
}

fn load_or_report(file: &PathBuf) -> Result<PolicySet, ExitCode> {
    PolicySet::load(file).map_err(|e: PolicyLoadError| {
        eprintln!("svidcar: policy set {} rejected:", file.display());
        for issue in &e.issues {
            eprintln!("  {issue}");
        }
        ExitCode::from(2)
    })
}

fn parse_id(s: &str, what: &str) -> anyhow::Result<SpiffeId> {
    SpiffeId::parse_lenient(s).with_context(|| format!("{what} {s:?} is not a SPIFFE ID"))
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let set = match load_or_report(&a.file) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let local = parse_id(&a.local_id, "--local-id")?;
    let peer = a
        .peer
        .as_deref()
        .map(|p| parse_id(p, "--peer"))
        .transpose()?;
    let dest_id = a
        .dest_spiffe_id
        .as_deref()
        .map(|p| parse_id(p, "--dest-spiffe-id"))
        .transpose()?;
    let policy = set.compile(&local);
    let protocol = match a.protocol {
        Some(ProtocolArg::Http) => Protocol::Http,
        Some(ProtocolArg::Grpc) => Protocol::Grpc,
        Some(ProtocolArg::Tcp) => Protocol::Tcp,
        Some(ProtocolArg::Tls) => Protocol::Tls,
        Some(ProtocolArg::Connect) => Protocol::Connect,
        None if a.method.is_some() || a.path.is_some() => Protocol::Http,
        None => Protocol::Tcp,
    };
    let direction = match a.direction {
        DirectionArg::Inbound => Direction::Inbound,
        DirectionArg::Egress => Direction::Egress,
    };
    // As in the proxy, the authority is checked first, then the path. A Host the proxy refuses
    // (answered `400`) is reported as `DENY by authority:<reason>`; an empty one names no host
    // on egress (RFC 9112 §3.2) and is refused inbound.
    let host = match a.host.as_deref() {
        Some("") if direction == Direction::Egress => None,
        Some(h) => match svidcar_proxy::http_authority::canonical(h) {
            Ok(h) => Some(normalize_name(&h).into_owned()),
            Err(reason) => {
                eprintln!("svidcar: the proxy refuses Host {h:?} ({reason})");
                print_explanation(a.output, &Explanation::refused_for(reason), &[])?;
                return Ok(ExitCode::SUCCESS);
            }
        },
        None => None,
    };
    // A path the proxy refuses (answered `400`) is reported as `DENY by normalize:<reason>`.
    let path = match a
        .path
        .as_deref()
        .map(|p| policy.settings().normalize_path(p))
    {
        Some(Err(e)) => {
            eprintln!("svidcar: {e}");
            print_explanation(a.output, &Explanation::refused(&e), &[])?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("--header {h:?} must be NAME=VALUE"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.to_string()));
    }
    let (connect_host, connect_port) = match &a.connect {
        Some(c) => {
            let (h, p) = c
                .rsplit_once(':')
                .with_context(|| format!("--connect {c:?} must be HOST:PORT"))?;
            let port: u16 = p
                .parse()
                .with_context(|| format!("--connect {c:?}: bad port"))?;
            (Some(normalize_name(h).into_owned()), Some(port))
        }
        None => (None, None),
    };
    let sni = a.sni.as_deref().map(|h| normalize_name(h).into_owned());
    let mut req = Request::new(direction, protocol);
    req.peer = peer.as_ref();
    req.source_ip = a.source_ip;
    req.destination_ip = a.dest_ip;
    req.destination_port = a.port.or(connect_port);
    req.destination_spiffe_id = dest_id.as_ref();
    req.sni = sni.as_deref();
    req.connect_authority = connect_host.as_deref();
    req.host = host.as_deref();
    req.method = a.method.as_deref();
    req.path = path.as_deref();
    req.headers = &headers;
    let limits = if direction == Direction::Inbound {
        policy.limits().describe(&req)
    } else {
        Vec::new()
    };
    print_explanation(a.output, &policy.explain(&req), &limits)?;
    if let Output::Text = a.output {
        print_limits(&limits, protocol.is_http());
    }
    Ok(ExitCode::SUCCESS)
}

/// The limits that apply to the caller and port (inbound), after the decision.
fn print_limits(limits: &[AppliedLimit], http: bool) {
    match limits {
        [] => println!("limits: none (unlimited)"),
        _ => {
            println!("limits:");
            for l in limits {
                let burst = l.burst.map(|b| format!(", burst {b}")).unwrap_or_default();
                let unit = match l.kind {
                    LimitKind::Connections => " open at once",
                    _ => " per second",
                };
                let note = if l.kind == LimitKind::RequestsPerSecond && !http {
                    " (HTTP requests only)"
                } else {
                    ""
                };
                println!(
                    "  {} {}{unit}{burst} by {}{note}",
                    l.kind.as_str(),
                    l.value,
                    l.name
                );
            }
        }
    }
}

fn print_explanation(
    output: Output,
    ex: &Explanation,
    limits: &[AppliedLimit],
) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let v = serde_json::json!({
                "decision": ex.decision.label(),
                "rule": ex.decision.reason.to_string(),
                "shadow": ex.decision.shadow.as_ref().map(|s| serde_json::json!({
                    "decision": if s.allow { "ALLOW" } else { "DENY" },
                    "rule": s.reason.to_string(),
                })),
                "audit": ex.decision.audit.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                "rules": ex.rules,
                "limits": limits,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => print_text(&ex.decision, &ex.rules),
    }
    Ok(())
}

fn print_text(d: &Decision, rules: &[svidcar_proxy::policy::RuleCheck]) {
    println!("{} by {}", d.label(), d.reason);
    if let Some(s) = &d.shadow {
        println!(
            "dry-run: {} by {}",
            if s.allow { "ALLOW" } else { "DENY" },
            s.reason
        );
    }
    if !d.audit.is_empty() {
        println!("audit: {}", d.audit.join(", "));
    }
    if matches!(d.reason, Reason::Refused(_)) {
        println!("rules: none evaluated (the proxy answers this request 400)");
    } else if rules.is_empty() {
        println!("rules: none for this direction");
    }
    for r in rules {
        let name = r
            .name
            .as_deref()
            .map(|n| format!(" [{n}]"))
            .unwrap_or_default();
        let mark = if r.matched {
            "matched    "
        } else {
            "not matched"
        };
        println!("  {mark} {}{name}: {}", r.id, r.reason);
    }
}

fn lint(a: LintArgs) -> anyhow::Result<ExitCode> {
    let set = match load_or_report(&a.file) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let ids = a
        .local_ids
        .iter()
        .map(|s| parse_id(s, "--local-id"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let warnings = set.lint(&ids);
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&warnings)?),
        Output::Text => {
            for w in &warnings {
                println!("{w}");
            }
            if warnings.is_empty() {
                println!("no warnings");
            }
        }
    }
    Ok(if warnings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
