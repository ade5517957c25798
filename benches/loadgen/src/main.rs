//! `svidcar-loadgen`: benchmark-only tools used by `benches/compare/run.sh`.
//!
//! - `rate`: an open-loop, fixed-rate HTTP/1.1 load generator (scenario S3). Request `i` is due
//!   at `start + i / rate` whatever happened to earlier requests; its latency is measured from
//!   that due time, so a stalled connection shows up in the percentiles instead of silently
//!   slowing the offered load (no coordinated omission).
//! - `idle`: opens N keep-alive connections, completes one request on each (so every proxy in
//!   the path has finished its handshakes), prints `ready N`, then holds them idle (scenario S6).
//!
//! Not part of the shipped binary: a separate workspace member so the `svidcar` binary stays lean.
#![forbid(unsafe_code)]

mod idle;
mod rate;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

const USAGE: &str = "usage:
  svidcar-loadgen rate --url http://HOST:PORT/PATH [--rate 1000] [--conns 16] [--duration 5] [--warmup 1]
  svidcar-loadgen idle --addr HOST:PORT [--conns 1000] [--hold 60]
rate prints one line: requests= errors= rps= p50_us= p90_us= p99_us= p999_us= max_us=
idle prints `ready N` once N connections have each completed a request, then holds them
for --hold seconds.";

/// Parsed `--key value` pairs.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let Some(key) = k.strip_prefix("--") else {
                bail!("unexpected argument {k:?}\n{USAGE}");
            };
            let v = it
                .next()
                .with_context(|| format!("--{key} needs a value"))?;
            out.push((key.to_string(), v.clone()));
        }
        Ok(Self(out))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> anyhow::Result<T> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{key} {v:?}: not a number")),
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    let flags = Flags::parse(rest)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cmd.as_str() {
        "rate" => {
            let cfg = rate::RateConfig {
                url: flags.get("url").context("rate needs --url")?.parse()?,
                rate: flags.num("rate", 1000.0)?,
                conns: flags.num("conns", 16)?,
                duration: Duration::from_secs_f64(flags.num("duration", 5.0)?),
                warmup: Duration::from_secs_f64(flags.num("warmup", 1.0)?),
            };
            let report = rt.block_on(rate::run(cfg))?;
            println!("{report}");
        }
        "idle" => {
            let addr = flags.get("addr").context("idle needs --addr")?.to_string();
            let conns: usize = flags.num("conns", 1000)?;
            let hold = Duration::from_secs_f64(flags.num("hold", 60.0)?);
            rt.block_on(idle::run(&addr, conns, hold))?;
        }
        "-h" | "--help" | "help" => println!("{USAGE}"),
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svidcar-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
