//! Limits in `svidcar policy replay`: the recorded connections and requests that the candidate
//! set allows are played again, in the order of their recorded start times, through the
//! candidate's limits with the same counters the proxy runs (concurrent connections from start
//! to end, both token buckets on the recorded clock). What a limit would refuse is counted per
//! limit and kind, with examples.
//!
//! The result is as good as the log's clock: record times have millisecond resolution, and a
//! request's start is its record time minus its duration.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use svidcar_agent::SpiffeId;

use super::{CompiledLimits, LimitKind};
use crate::policy::replay::Example;
use crate::policy::{Direction, Protocol, Request};

/// One recorded connection or request, allowed by the candidate.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// For the report.
    pub example: Example,
    /// The caller.
    pub peer: Option<SpiffeId>,
    /// Its IP.
    pub source_ip: Option<IpAddr>,
    /// The destination port as evaluated.
    pub port: Option<u16>,
    /// Start (milliseconds since the Unix epoch).
    pub start_ms: i64,
    /// A connection's end; `None` for a request.
    pub end_ms: Option<i64>,
}

/// What one limit would do to the recorded traffic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitOutcome {
    /// The limit's name.
    pub limit: String,
    /// Which kind.
    pub kind: LimitKind,
    /// Recorded connections or requests it counts.
    pub applied: usize,
    /// How many of them it would refuse.
    pub exceeded: usize,
    /// The first refused ones, in time order.
    pub examples: Vec<Example>,
}

/// Parses the access log's `time` (`2025-01-31T12:00:00.123Z`) into milliseconds since the
/// Unix epoch.
pub fn parse_time_ms(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !t.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let ms = match t.get(19..t.len() - 1)? {
        "" => 0,
        frac => {
            let digits = frac.strip_prefix('.')?;
            let three: String = digits.chars().chain("000".chars()).take(3).collect();
            three.parse::<i64>().ok()?
        }
    };
    // Days from civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms)
}

/// Plays `attempts` (of one local ID, under the candidate's `limits`) in time order.
pub fn simulate(
    limits: &CompiledLimits,
    attempts: &[Attempt],
    examples: usize,
) -> Vec<LimitOutcome> {
    if limits.is_empty() || attempts.is_empty() {
        return Vec::new();
    }
    // Events: (time, 0 = a connection ends, 1 = starts / a request; index).
    let mut events: Vec<(i64, u8, usize)> = Vec::with_capacity(attempts.len() * 2);
    for (i, a) in attempts.iter().enumerate() {
        events.push((a.start_ms, 1, i));
        if let Some(end) = a.end_ms {
            events.push((end.max(a.start_ms), 0, i));
        }
    }
    events.sort_unstable();
    let base = events[0].0;
    let mut open: BTreeMap<usize, super::Admitted> = BTreeMap::new();
    let mut out: BTreeMap<(String, LimitKind), LimitOutcome> = BTreeMap::new();
    for (t, what, i) in events {
        let a = &attempts[i];
        if what == 0 {
            open.remove(&i);
            continue;
        }
        let now = Duration::from_millis(u64::try_from(t - base).unwrap_or(0));
        let connection = a.end_ms.is_some();
        let protocol = if connection {
            Protocol::Tcp
        } else {
            Protocol::Http
        };
        let mut req = Request::new(Direction::Inbound, protocol);
        req.peer = a.peer.as_ref();
        req.source_ip = a.source_ip;
        req.destination_port = a.port;
        if connection {
            let refused = match limits.admit(&req, now) {
                Ok(adm) => {
                    open.insert(i, adm);
                    None
                }
                Err(e) => Some(e.kind),
            };
            for l in limits.describe(&req) {
                if l.kind != LimitKind::RequestsPerSecond {
                    let hit = (refused == Some(l.kind)).then_some(&a.example);
                    count(&mut out, &l.name, l.kind, hit, examples);
                }
            }
        } else if let Some(bucket) = limits.request_bucket(&req, now) {
            let hit = bucket.take(now).is_err().then_some(&a.example);
            count(
                &mut out,
                &bucket.name,
                LimitKind::RequestsPerSecond,
                hit,
                examples,
            );
        }
    }
    out.into_values().collect()
}

fn count(
    out: &mut BTreeMap<(String, LimitKind), LimitOutcome>,
    name: &str,
    kind: LimitKind,
    refused: Option<&Example>,
    examples: usize,
) {
    let o = out
        .entry((name.to_string(), kind))
        .or_insert_with(|| LimitOutcome {
            limit: name.to_string(),
            kind,
            applied: 0,
            exceeded: 0,
            examples: Vec::new(),
        });
    o.applied += 1;
    if let Some(e) = refused {
        o.exceeded += 1;
        if o.examples.len() < examples {
            o.examples.push(e.clone());
        }
    }
}
