//! Scenario S8 (BENCHMARKS.md): the identity agent.
//!
//! 1. SVIDs issued per second on one core (in-process sign loop: fresh P-256 key + leaf).
//! 2. First-SVID latency over the socket: N fresh connections, each timed from connect to the
//!    first `FetchX509SVID` message (p50/p99).
//! 3. 1000 workload streams through rotation (`--svid-ttl 4s`): every stream must receive its
//!    next SVID before the previous one expires ("zero expired SVIDs served"); agent RSS.
//!
//! Run: `cargo bench --bench agent_s8` (env `S8_CONNS`, `S8_STREAMS` to change sizes).
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use svidcar_agent::agent::ca::SigningCa;
use svidcar_agent::client::WorkloadApiClient;
use svidcar_agent::{SpiffeId, TrustDomain};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn start_agent(dir: &std::path::Path, ttl: &str) -> (Child, PathBuf) {
    let socket = dir.join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_svidcar"))
        .args([
            "--log",
            "warn",
            "agent",
            "--health-addr",
            "off",
            "--svid-ttl",
            ttl,
        ])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--entry")
        .arg(format!("spiffe://svidcar.local/bench=unix:uid:{}", uid()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start agent");
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    (child, socket)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU seconds used by this thread so far (utime + stime from /proc, 100 Hz ticks).
fn thread_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // After ")": state is field 3 (not numeric, skipped); utime/stime are fields 14/15.
    match (f.get(10), f.get(11)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => 0.0,
    }
}

/// Returns (SVIDs per wall second, SVIDs per CPU second of the signing thread).
fn sign_loop() -> (f64, f64) {
    let td = TrustDomain::parse("svidcar.local").expect("td");
    let id = SpiffeId::parse("spiffe://svidcar.local/bench").expect("id");
    let (ca, _) =
        SigningCa::generate_root(&td, Duration::from_secs(86400), SystemTime::now()).expect("ca");
    let ttl = Duration::from_secs(3600);
    for _ in 0..200 {
        ca.issue(&id, "", ttl, SystemTime::now()).expect("issue");
    }
    let start = Instant::now();
    let cpu0 = thread_cpu_secs();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        ca.issue(&id, "", ttl, SystemTime::now()).expect("issue");
        n += 1;
    }
    let cpu = (thread_cpu_secs() - cpu0).max(0.01);
    (n as f64 / start.elapsed().as_secs_f64(), n as f64 / cpu)
}

async fn first_svid_latency(socket: &std::path::Path, conns: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(conns);
    for _ in 0..conns {
        let t = Instant::now();
        let mut c = WorkloadApiClient::connect(socket).await.expect("connect");
        let ctx = c.fetch_x509_context().await.expect("fetch");
        v.push(t.elapsed());
        assert_eq!(ctx.svids.len(), 1);
    }
    v.sort();
    v
}

/// Opens `n` streams, waits for `rotations` pushes on each; returns (late pushes, max gap).
async fn streams_through_rotation(socket: &std::path::Path, n: usize, rotations: usize) -> usize {
    let late = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let socket = socket.to_path_buf();
        let late = late.clone();
        tasks.spawn(async move {
            let mut c = WorkloadApiClient::connect(&socket).await.expect("connect");
            let mut s = c.stream_x509_contexts().await.expect("stream");
            let mut prev = s.next().await.expect("first").svids[0].not_after;
            for _ in 0..rotations {
                let ctx = s.next().await.expect("push");
                if SystemTime::now() >= prev {
                    late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                prev = ctx.svids[0].not_after;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("stream task");
    }
    late.load(std::sync::atomic::Ordering::Relaxed)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` too. Only run when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let conns = env_usize("S8_CONNS", 500);
    let streams = env_usize("S8_STREAMS", 1000);
    let dir = std::env::temp_dir().join(format!("svidcar-s8-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);

    let (per_sec, per_cpu_sec) = sign_loop();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let (mut agent, socket) = start_agent(&dir.join("a"), "1h");
    let lat = rt.block_on(first_svid_latency(&socket, conns));
    let _ = agent.kill();
    let _ = agent.wait();

    let (mut agent2, socket2) = start_agent(&dir.join("b"), "4s");
    let rss_before = rss_kib(agent2.id());
    let t = Instant::now();
    let late = rt.block_on(streams_through_rotation(&socket2, streams, 2));
    let took = t.elapsed();
    let rss_after = rss_kib(agent2.id());
    let _ = agent2.kill();
    let _ = agent2.wait();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nS8 identity agent (load average at start: {})",
        load.trim()
    );
    println!("| metric | value | target |");
    println!("|---|---|---|");
    println!(
        "| SVIDs issued per CPU-second, one thread (in-process) | {per_cpu_sec:.0} | >= 10000 |"
    );
    println!("| SVIDs issued per wall second, one thread | {per_sec:.0} | - |");
    println!(
        "| first-SVID latency over the socket, {conns} fresh connections | p50 {:.2} ms, p99 {:.2} ms | p99 <= 2 ms |",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| {streams} streams x 2 rotations (svid-ttl 4s) | {late} late (expired) SVIDs, {:.1} s | 0 |",
        took.as_secs_f64()
    );
    println!("| agent RSS idle -> with {streams} streams | {rss_before} KiB -> {rss_after} KiB | bounded |");
}
