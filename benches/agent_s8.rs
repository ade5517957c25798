//! Scenario S8 (BENCHMARKS.md): the identity agent.
//!
//! 1. SVIDs issued per second on one core (in-process sign loop: fresh P-256 key + leaf).
//! 2. First-SVID latency over the socket, timed from connect to the first `FetchX509SVID`
//!    message (p50/p99), for N new workloads: N processes (hard links of this binary, one
//!    `unix:path:` entry each), so every first SVID is an issuance. The agent caches one SVID
//!    per identity, so N connections of one process would measure the cache, not issuance;
//!    that is reported on its own row (N more connections of an identity already served).
//! 3. 1000 workload streams through rotation (`--svid-ttl 4s`): every stream must receive its
//!    next SVID before the previous one expires ("zero expired SVIDs served"); agent RSS. The
//!    streams share one identity, so this measures pushing one re-issued SVID to 1000 streams.
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

/// The agent process, killed on drop (also when the bench panics).
struct RunningAgent(Child);

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(dir: &std::path::Path, ttl: &str, entries: &[String]) -> (RunningAgent, PathBuf) {
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
        .arg(format!(
            "spiffe://svidcar.local/bench=unix:uid:{},unix:path:{}",
            uid(),
            std::env::current_exe().expect("current exe").display()
        ))
        .args(entries.iter().flat_map(|e| ["--entry", e.as_str()]))
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
    (RunningAgent(child), socket)
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

/// Child mode (`S8_CHILD_SOCKET` set): one new workload. Prints the microseconds from connect
/// to its first SVID, and the SPIFFE ID it got.
fn child(socket: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let t = Instant::now();
        let mut c = WorkloadApiClient::connect(socket).await.expect("connect");
        let ctx = c.fetch_x509_context().await.expect("fetch");
        println!("{} {}", t.elapsed().as_micros(), ctx.svids[0].id);
    });
}

/// Hard links of this binary, one per new workload (`unix:path:` tells them apart), in a
/// directory beside it (same file system).
fn workload_links(n: usize) -> (PathBuf, Vec<PathBuf>) {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.with_file_name(format!("s8-workloads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("links dir");
    let links = (0..n)
        .map(|i| {
            let l = dir.join(format!("w{i}"));
            std::fs::hard_link(&exe, &l).expect("hard link (same file system)");
            l
        })
        .collect();
    (dir, links)
}

/// First-SVID latency of `links.len()` new workloads, one process each (run one at a time; the
/// process start is not timed).
fn first_svid_new_identities(socket: &std::path::Path, links: &[PathBuf]) -> Vec<Duration> {
    let mut v: Vec<Duration> = links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let out = Command::new(l)
                .env("S8_CHILD_SOCKET", socket)
                .stderr(Stdio::inherit())
                .output()
                .expect("run workload");
            let text = String::from_utf8_lossy(&out.stdout);
            let (us, id) = text.trim().split_once(' ').expect("child output");
            assert_eq!(id, format!("spiffe://svidcar.local/w{i}"), "{text}");
            Duration::from_micros(us.parse().expect("micros"))
        })
        .collect();
    v.sort();
    v
}

/// First-SVID latency of `conns` fresh connections of this process (its identity is cached
/// after the first).
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
    if let Ok(socket) = std::env::var("S8_CHILD_SOCKET") {
        return child(&socket);
    }
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

    let (links_dir, links) = workload_links(conns);
    let entries: Vec<String> = links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "spiffe://svidcar.local/w{i}=unix:uid:{},unix:path:{}",
                uid(),
                l.display()
            )
        })
        .collect();
    let (agent, socket) = start_agent(&dir.join("a"), "1h", &entries);
    let lat = first_svid_new_identities(&socket, &links);
    let cached = rt.block_on(first_svid_latency(&socket, conns));
    drop(agent);
    let _ = std::fs::remove_dir_all(&links_dir);

    let (agent2, socket2) = start_agent(&dir.join("b"), "4s", &[]);
    let rss_before = rss_kib(agent2.0.id());
    let t = Instant::now();
    let late = rt.block_on(streams_through_rotation(&socket2, streams, 2));
    let took = t.elapsed();
    let rss_after = rss_kib(agent2.0.id());
    drop(agent2);
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
        "| first-SVID latency over the socket, {conns} new workloads (each an issuance) | p50 {:.2} ms, p99 {:.2} ms | p99 <= 2 ms |",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| first-SVID latency, {conns} fresh connections of one served identity (cached SVID) | p50 {:.2} ms, p99 {:.2} ms | - |",
        percentile(&cached, 0.5).as_secs_f64() * 1e3,
        percentile(&cached, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| {streams} streams x 2 rotations (svid-ttl 4s) | {late} late (expired) SVIDs, {:.1} s | 0 |",
        took.as_secs_f64()
    );
    println!("| agent RSS idle -> with {streams} streams | {rss_before} KiB -> {rss_after} KiB | bounded |");
}
