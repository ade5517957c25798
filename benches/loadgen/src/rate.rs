//! Open-loop fixed-rate HTTP/1.1 load (S3).
//!
//! A dedicated OS thread (precise `nanosleep`, not the 1 ms tokio timer wheel) hands out the due
//! time of request `i` (`start + i / rate`) to connection `i % conns`. Each connection task sends
//! its requests in order on one keep-alive connection; latency = response complete − due time.
//! A slow response therefore delays the following requests of that connection and their
//! latencies include the wait — exactly what a user would have seen (no coordinated omission).
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

/// What `rate` runs.
pub struct RateConfig {
    /// Target URL (`http://host:port/path`).
    pub url: Uri,
    /// Requests per second, offered whatever the responses do.
    pub rate: f64,
    /// Keep-alive connections the requests are spread over (round robin).
    pub conns: usize,
    /// Measured period (after the warm-up).
    pub duration: Duration,
    /// Period at the start whose requests are sent but not recorded.
    pub warmup: Duration,
}

/// Latency percentiles of the recorded requests.
pub struct Report {
    requests: usize,
    errors: u64,
    rps: f64,
    sorted_us: Vec<u64>,
}

impl Report {
    fn pct(&self, p: f64) -> u64 {
        if self.sorted_us.is_empty() {
            return 0;
        }
        let i = ((self.sorted_us.len() as f64 - 1.0) * p).round() as usize;
        self.sorted_us[i.min(self.sorted_us.len() - 1)]
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} errors={} rps={:.1} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
            self.requests,
            self.errors,
            self.rps,
            self.pct(0.50),
            self.pct(0.90),
            self.pct(0.99),
            self.pct(0.999),
            self.sorted_us.last().copied().unwrap_or(0)
        )
    }
}

async fn connect(authority: &str) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn one_request(
    send: &mut SendRequest<Empty<Bytes>>,
    uri: &Uri,
    host: &str,
) -> anyhow::Result<()> {
    send.ready().await?;
    let req = hyper::Request::get(uri.path())
        .header(hyper::header::HOST, host)
        .body(Empty::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}");
    Ok(())
}

/// One connection: sends its due requests in order, reconnecting after an error.
async fn conn_task(
    mut due: mpsc::UnboundedReceiver<Instant>,
    uri: Uri,
    record_from: Instant,
) -> (Vec<u64>, u64) {
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut send: Option<SendRequest<Empty<Bytes>>> = None;
    while let Some(at) = due.recv().await {
        let result = async {
            if send.is_none() {
                send = Some(connect(&authority).await?);
            }
            match send.as_mut() {
                Some(s) => one_request(s, &uri, &authority).await,
                None => anyhow::bail!("no connection"),
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), result).await {
            Ok(Ok(())) => {
                if at >= record_from {
                    lat.push(at.elapsed().as_micros() as u64);
                }
            }
            Ok(Err(_)) | Err(_) => {
                errors += 1;
                send = None;
            }
        }
    }
    (lat, errors)
}

/// Runs the load and returns the latency report.
pub async fn run(cfg: RateConfig) -> anyhow::Result<Report> {
    anyhow::ensure!(
        cfg.rate > 0.0 && cfg.conns > 0,
        "--rate and --conns must be > 0"
    );
    anyhow::ensure!(cfg.url.authority().is_some(), "--url needs host:port");
    let start = Instant::now() + Duration::from_millis(50);
    let record_from = start + cfg.warmup;
    let total = ((cfg.warmup + cfg.duration).as_secs_f64() * cfg.rate).round() as u64;
    let mut senders = Vec::with_capacity(cfg.conns);
    let mut tasks = Vec::with_capacity(cfg.conns);
    for _ in 0..cfg.conns {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        tasks.push(tokio::spawn(conn_task(rx, cfg.url.clone(), record_from)));
    }
    let period = Duration::from_secs_f64(1.0 / cfg.rate);
    let conns = cfg.conns as u64;
    let dispatcher = std::thread::spawn(move || {
        for i in 0..total {
            let at = start + period.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if let Some(tx) = senders.get((i % conns) as usize) {
                let _ = tx.send(at);
            }
        }
        // Dropping the senders ends the connection tasks once their queues are drained.
    });
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        all.extend(lat);
        errors += e;
    }
    let measured = record_from
        .elapsed()
        .min(cfg.duration + Duration::from_secs(60));
    let _ = dispatcher.join();
    all.sort_unstable();
    Ok(Report {
        requests: all.len(),
        errors,
        rps: all.len() as f64 / measured.as_secs_f64().max(cfg.duration.as_secs_f64()),
        sorted_us: all,
    })
}
