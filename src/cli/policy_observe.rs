//! `svidcar policy suggest` and `svidcar policy replay`: from an observed JSON access log
//! (`svidcar proxy --access-log`, docs/access-log.md) to an enforced least-privilege set.
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use svidcar_agent::SpiffeId;
use svidcar_proxy::access_log::{parse_line, AccessRecord};
use svidcar_proxy::policy::replay::{replay as run_replay, Report};
use svidcar_proxy::policy::suggest::{suggest as run_suggest, Options};
use svidcar_proxy::policy::PolicySet;

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `svidcar policy suggest`.
#[derive(Args)]
pub struct SuggestArgs {
    /// JSON access log(s) (`-` = stdin); lines that are not `svidcar.access/v1` are ignored.
    #[arg(long = "from", value_name = "LOG", required = true, num_args = 1..)]
    from: Vec<PathBuf>,
    /// Only the traffic of this local SPIFFE ID (default: every local ID in the log, each with
    /// its own selector).
    #[arg(long)]
    local_id: Option<String>,
    /// Path patterns per caller at most; past it, prefixes (`/a/{**}`) are used.
    #[arg(long, default_value_t = 20)]
    max_paths: usize,
    /// Egress: a `*.<parent>` wildcard once N (≥ 2) distinct names under one parent domain were
    /// seen (default: exact names only).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(2..))]
    collapse_hosts: Option<u16>,
    /// Also allow what the log recorded as denied.
    #[arg(long)]
    include_denied: bool,
}

/// `svidcar policy replay`.
#[derive(Args)]
pub struct ReplayArgs {
    /// Candidate policy file or directory.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// JSON access log(s) (`-` = stdin); lines that are not `svidcar.access/v1` are ignored.
    #[arg(long = "from", value_name = "LOG", required = true, num_args = 1..)]
    from: Vec<PathBuf>,
    /// Only the traffic of this local SPIFFE ID.
    #[arg(long)]
    local_id: Option<String>,
    /// Examples per group at most.
    #[arg(long, default_value_t = 5)]
    examples: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// `(file:line, record)` of every v1 record; other lines are skipped, a v1 record that does
/// not parse is an error naming its line.
fn read_logs(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, AccessRecord)>> {
    let mut out = Vec::new();
    for path in paths {
        let name = path.display().to_string();
        let reader: Box<dyn BufRead> = if name == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            let f = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
            Box::new(std::io::BufReader::new(f))
        };
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {name}"))?;
            match parse_line(&line) {
                Ok(Some(r)) => out.push((format!("{name}:{}", i + 1), r)),
                Ok(None) => {}
                Err(e) => anyhow::bail!("{name}:{}: bad svidcar.access/v1 record: {e}", i + 1),
            }
        }
    }
    Ok(out)
}

fn local(id: &Option<String>) -> anyhow::Result<Option<SpiffeId>> {
    id.as_deref()
        .map(|s| SpiffeId::parse_lenient(s).with_context(|| format!("--local-id {s:?}")))
        .transpose()
}

/// Prints the suggested set on stdout (a summary on stderr).
pub fn suggest(a: SuggestArgs) -> anyhow::Result<ExitCode> {
    let records = read_logs(&a.from)?;
    let opts = Options {
        max_paths: a.max_paths,
        collapse_hosts: a.collapse_hosts.map_or(0, usize::from),
        include_denied: a.include_denied,
    };
    let local = local(&a.local_id)?;
    let s = run_suggest(records.iter().map(|(_, r)| r), local.as_ref(), &opts)
        .map_err(anyhow::Error::msg)?;
    print!("{}", s.yaml);
    let skipped: Vec<String> = s.skipped.iter().map(|(k, n)| format!("{n} {k}")).collect();
    eprintln!(
        "svidcar: suggested from {} of {} records{}",
        s.used,
        records.len(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(" (left out: {})", skipped.join(", "))
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints what the candidate would change; exit 2 when something allowed would be denied.
pub fn replay(a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let set = match PolicySet::load(&a.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("svidcar: policy set {} rejected:", a.file.display());
            for issue in &e.issues {
                eprintln!("  {issue}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let records = read_logs(&a.from)?;
    let local = local(&a.local_id)?;
    let report = run_replay(
        &set,
        records.iter().map(|(s, r)| (s.clone(), r)),
        local.as_ref(),
        a.examples,
    );
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => print_text(&report),
    }
    Ok(if report.newly_denied() > 0 || report.limited() > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(r: &Report) {
    let skipped: usize = r.skipped.values().sum();
    println!(
        "replayed {} of {} records ({skipped} not replayed)",
        r.replayed, r.records
    );
    for (why, n) in &r.skipped {
        println!("  not replayed: {n} {}", why.label());
    }
    if r.changed.is_empty() {
        println!("no decision changes");
    }
    for g in &r.changed {
        println!("CHANGED {} -> {} by {}: {}", g.old, g.new, g.rule, g.count);
        for e in &g.examples {
            let was = e.old_rule.as_deref().unwrap_or("-");
            println!("    {}  {} (was {was})", e.source, e.summary);
        }
    }
    for g in &r.unchanged {
        println!("same    {} by {}: {}", g.new, g.rule, g.count);
    }
    for h in &r.unrecorded_headers {
        println!(
            "warning: the candidate's conditions use header {h:?}, which the log does not record \
             (replayed as absent)"
        );
    }
    for l in &r.limits {
        let what = if l.exceeded > 0 { "LIMITED" } else { "limit  " };
        println!(
            "{what} {} ({}): {} of {} recorded would be refused",
            l.limit,
            l.kind.as_str(),
            l.exceeded,
            l.applied
        );
        for e in &l.examples {
            println!("    {}  {}", e.source, e.summary);
        }
    }
    if r.limits_untimed > 0 && !r.limits.is_empty() {
        println!(
            "warning: {} records without a readable time were left out of the limits",
            r.limits_untimed
        );
    }
    let denied = r.newly_denied();
    if denied > 0 {
        println!("{denied} recorded connections/requests that were allowed would be denied");
    }
    let limited = r.limited();
    if limited > 0 {
        println!("{limited} recorded connections/requests would be refused by a limit");
    }
}
