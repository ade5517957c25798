//! Unit tests of [`super`] over real loopback TCP sockets.
use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// `client ⇄ [a | copy | b] ⇄ server`, the copy running in a task.
async fn proxied<F>(
    idle: Duration,
    run: impl FnOnce(TcpStream, TcpStream) -> F + Send + 'static,
) -> (TcpStream, TcpStream, tokio::task::JoinHandle<CopyStats>)
where
    F: Future<Output = CopyStats> + Send + 'static,
{
    let _ = idle;
    let (client, a) = pair().await;
    let (b, server) = pair().await;
    let task = tokio::spawn(run(a, b));
    (client, server, task)
}

#[test]
fn buffer_ladder_grows_under_bulk_and_steps_down_when_light() {
    let mut s = BufSize::new();
    assert_eq!(s.size, MIN_BUF);
    s.observe(MIN_BUF);
    assert_eq!(s.size, MID_BUF);
    s.observe(MID_BUF);
    assert_eq!(s.size, MAX_BUF);
    s.observe(MAX_BUF);
    assert_eq!(s.size, MAX_BUF);
    for _ in 0..SHRINK_AFTER {
        s.observe(10);
    }
    assert_eq!(s.size, MID_BUF);
    // A medium read in between restarts the count.
    for _ in 0..SHRINK_AFTER - 1 {
        s.observe(10);
    }
    s.observe(MID_BUF / 2);
    s.observe(10);
    assert_eq!(s.size, MID_BUF);
    for _ in 0..SHRINK_AFTER {
        s.observe(10);
    }
    assert_eq!(s.size, MIN_BUF);
}

#[tokio::test]
async fn copies_both_ways_and_passes_half_close_on() {
    let idle = Duration::from_secs(30);
    let (mut client, mut server, task) =
        proxied(idle, move |a, b| copy_bidirectional(a, b, idle)).await;
    // Bulk one way (grows the buffer), then EOF.
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got == payload, "payload corrupted");
    // The other direction still flows after the half-close.
    let mut client = writer.await.unwrap();
    server.write_all(b"reply after half-close").await.unwrap();
    server.shutdown().await.unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"reply after half-close");
    let stats = task.await.unwrap();
    assert_eq!(stats.end, CopyEnd::Closed);
    assert_eq!(stats.a_to_b, payload.len() as u64);
    assert_eq!(stats.b_to_a, 22);
}

#[tokio::test]
async fn a_reset_ends_the_copy_with_an_error() {
    let idle = Duration::from_secs(30);
    let (mut client, server, task) =
        proxied(idle, move |a, b| copy_bidirectional(a, b, idle)).await;
    client.write_all(b"hello").await.unwrap();
    // The server resets its connection: the copy must report an error, not a clean close.
    server.set_zero_linger().unwrap();
    drop(server);
    // Keep writing so the proxy's write to the reset socket fails even if its read saw EOF.
    let stats = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if task.is_finished() {
                return task.await.unwrap();
            }
            let _ = client.write_all(b"more").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(stats.failed(), "{stats:?}");
    assert!(matches!(stats.end, CopyEnd::Error(_)), "{stats:?}");
}

#[tokio::test]
async fn idle_timeout_counts_from_the_last_byte() {
    let idle = Duration::from_millis(300);
    let (mut client, mut server, task) =
        proxied(idle, move |a, b| copy_bidirectional(a, b, idle)).await;
    let mut last_byte = std::time::Instant::now();
    // Traffic every 100 ms for ~600 ms keeps it alive past the first idle deadline.
    for _ in 0..6 {
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();
        last_byte = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!task.is_finished(), "timed out despite traffic");
    let stats = task.await.unwrap();
    assert_eq!(stats.end, CopyEnd::IdleTimeout);
    // Timer resolution is 1 ms; the deadline is never early by more than that.
    assert!(last_byte.elapsed() >= idle - Duration::from_millis(2));
    assert_eq!(stats.a_to_b, 6);
}

#[tokio::test]
async fn stop_future_resets_with_the_rule() {
    let idle = Duration::from_secs(30);
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let (_client, _server, task) = proxied(idle, move |a, b| {
        copy_bidirectional_until(a, b, idle, async move { rx.await.unwrap_or_default() })
    })
    .await;
    tx.send("rule deny-all".into()).unwrap();
    let stats = task.await.unwrap();
    assert_eq!(stats.end, CopyEnd::PolicyReset("rule deny-all".into()));
}

#[tokio::test]
async fn buffered_writer_is_flushed_when_the_reader_would_block() {
    // A BufWriter side only emits what it buffered on flush (like TLS records): a small
    // message must still arrive while the connection stays open.
    let idle = Duration::from_secs(30);
    let (mut client, mut server, _task) = proxied(idle, move |a, b| async move {
        let mut b = BufWriter::new(b);
        copy_bidirectional(a, &mut b, idle).await
    })
    .await;
    client.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got))
        .await
        .expect("not flushed")
        .unwrap();
    assert_eq!(&got, b"ping");
}

#[tokio::test]
async fn an_idle_direction_holds_no_buffer() {
    let (mut client, mut a) = pair().await;
    let (mut b, mut server) = pair().await;
    let mut dir = Direction::new();
    let poll_once = |dir: &mut Direction, a: &mut TcpStream, b: &mut TcpStream| {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        dir.poll_copy(&mut cx, Pin::new(a), Pin::new(b))
    };
    assert!(poll_once(&mut dir, &mut a, &mut b).is_pending());
    assert_eq!(dir.held(), 0);
    client.write_all(b"light").await.unwrap();
    a.readable().await.unwrap();
    assert!(poll_once(&mut dir, &mut a, &mut b).is_pending());
    assert_eq!(dir.bytes, 5);
    assert_eq!(
        dir.held(),
        0,
        "a light direction keeps a buffer while waiting"
    );
    let mut got = [0u8; 5];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"light");
}

#[tokio::test]
async fn splice_copies_and_half_closes() {
    let idle = Duration::from_secs(30);
    let (mut client, mut server, task) =
        proxied(idle, move |a, b| splice_bidirectional(a, b, idle)).await;
    client.write_all(&[7u8; 200_000]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), 200_000);
    server.write_all(b"ok").await.unwrap();
    drop(server);
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"ok");
    let stats = task.await.unwrap();
    assert_eq!(stats.end, CopyEnd::Closed);
    assert_eq!((stats.a_to_b, stats.b_to_a), (200_000, 2));
}
