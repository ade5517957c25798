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

/// Peeks (without consuming) at a TLS ClientHello and returns its SNI host name, waiting at most
/// `wait` for the whole first record. `None` for non-TLS traffic, no SNI, or nothing in time.
pub async fn peek_sni(stream: &TcpStream, wait: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || buf[0] != TLS_HANDSHAKE {
            return None;
        }
        if n >= 5 {
            let record = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if n >= record || n == buf.len() {
                return client_hello_sni(&buf[5..n.min(record)]);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The `server_name` (host_name) of a ClientHello handshake message.
pub fn client_hello_sni(handshake: &[u8]) -> Option<String> {
    let mut c = Cursor(handshake);
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    c.take(3)?; // length (the body may be truncated to the first record)
    c.take(2 + 32)?; // legacy_version, random
    c.vec8()?; // session id
    c.vec16()?; // cipher suites
    c.vec8()?; // compression methods
    let mut exts = Cursor(c.vec16()?);
    while let (Some(ty), Some(body)) = (exts.u16(), exts.vec16()) {
        if ty != 0 {
            continue;
        }
        let mut list = Cursor(Cursor(body).vec16()?);
        while let Some(kind) = list.u8() {
            let name = list.vec16()?;
            if kind == 0 {
                return std::str::from_utf8(name).ok().map(str::to_string);
            }
        }
        return None;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_of_a_rustls_client_hello() {
        let config = rustls::ClientConfig::builder_with_provider(svidcar_agent::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        assert_eq!(wire[0], TLS_HANDSHAKE);
        assert_eq!(
            client_hello_sni(&wire[5..]).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(client_hello_sni(&wire[5..40]), None);
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), None);
    }
}
