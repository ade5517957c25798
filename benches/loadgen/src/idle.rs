//! Idle keep-alive connections (S6): open, complete one request each, hold.
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one HTTP/1.1 response with a `content-length` body.
async fn read_response(s: &mut TcpStream) -> anyhow::Result<()> {
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "connection closed before a full response");
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if got.len() >= end + 4 + len {
            anyhow::ensure!(head.starts_with("http/1.1 200"), "not a 200 response");
            return Ok(());
        }
    }
}

async fn open_one(addr: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    tokio::time::timeout(Duration::from_secs(20), read_response(&mut s))
        .await
        .context("response timed out")??;
    Ok(s)
}

/// Opens `conns` connections to `addr` (64 at a time), prints `ready N`, holds them for `hold`
/// (the harness ends it earlier with SIGTERM).
pub async fn run(addr: &str, conns: usize, hold: Duration) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(conns);
    while held.len() < conns {
        let batch = (conns - held.len()).min(64);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let a = addr.to_string();
            set.spawn(async move { open_one(&a).await });
        }
        while let Some(r) = set.join_next().await {
            held.push(r?.with_context(|| format!("connection {} to {addr}", held.len() + 1))?);
        }
    }
    println!("ready {}", held.len());
    tokio::time::sleep(hold).await;
    drop(held);
    Ok(())
}
