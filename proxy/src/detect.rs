//! Protocol detection on an accepted inbound socket: mesh TLS or plaintext, by peeking at the
//! first byte without consuming it.

use std::time::Duration;

use tokio::net::TcpStream;

/// What the first byte says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS handshake record (content type 22).
    Tls,
    /// Anything else, or nothing within the wait (a server-first protocol).
    Plaintext,
    /// The peer closed before sending anything.
    Closed,
}

/// TLS record content type `handshake`.
const TLS_HANDSHAKE: u8 = 0x16;

/// Peeks at the first byte, waiting at most `wait`.
pub async fn detect(stream: &TcpStream, wait: Duration) -> std::io::Result<Detected> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut first)).await {
        Err(_elapsed) => Ok(Detected::Plaintext),
        Ok(Ok(0)) => Ok(Detected::Closed),
        Ok(Ok(_)) if first[0] == TLS_HANDSHAKE => Ok(Detected::Tls),
        Ok(Ok(_)) => Ok(Detected::Plaintext),
        Ok(Err(e)) => Err(e),
    }
}
