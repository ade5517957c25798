//! The TLS ClientHello of an egress connection, read whole (POLICY.md §3): reassembled across
//! TCP segments and TLS records up to its declared length (≤ [`MAX_HELLO`]), parsed strictly.
//! Anything that starts as TLS but does not yield one complete, well-formed ClientHello is
//! [`Progress::Bad`] (the caller denies it as `egress:unreadable-client-hello`); only a complete
//! ClientHello without the `server_name` extension is "no name".
//!
//! [`HelloReader`] is fed the raw bytes as they are read from the socket and keeps them, so the
//! caller can replay them to the upstream unchanged. [`sniff`] classifies the first bytes of a
//! connection (TLS, SSLv2-style hello, plaintext HTTP/1.x or anything else) without consuming
//! them.

/// Largest accepted ClientHello handshake body (its declared 24-bit length).
pub const MAX_HELLO: usize = 64 * 1024;
/// Largest TLS plaintext record payload (RFC 8446 §5.1: 2^14).
const MAX_RECORD: usize = 16 * 1024;
/// Most raw bytes buffered while reassembling (headers of many small records included).
pub const MAX_BUFFERED: usize = 2 * MAX_HELLO;

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 0x16;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// Extension type `server_name` (RFC 6066).
const SERVER_NAME: u16 = 0;

/// Why a ClientHello could not be read; the label goes to logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// The first record (or a later one before the ClientHello ended) is not a handshake record.
    NotHandshake,
    /// A record header with a bad version or length.
    BadRecord,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// The declared ClientHello is larger than [`MAX_HELLO`] (or its records than
    /// [`MAX_BUFFERED`]).
    TooLarge,
    /// The ClientHello does not parse (lengths, duplicate extensions, a bad `server_name`).
    Malformed,
    /// An SSLv2-style (record-less) hello: it cannot carry SNI and modern TLS refuses it.
    SslV2,
    /// The client stopped before the ClientHello was complete.
    Truncated,
    /// Not complete within the handshake timeout.
    Timeout,
}

impl Unreadable {
    /// A short label for logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotHandshake => "not-a-handshake-record",
            Self::BadRecord => "bad-record",
            Self::NotClientHello => "not-a-client-hello",
            Self::TooLarge => "too-large",
            Self::Malformed => "malformed",
            Self::SslV2 => "sslv2-hello",
            Self::Truncated => "truncated",
            Self::Timeout => "timeout",
        }
    }
}

/// Where reading a ClientHello stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    NeedMore,
    /// A complete ClientHello: its `server_name` host name, `None` without the extension.
    Done(Option<String>),
    /// Not a readable ClientHello: deny.
    Bad(Unreadable),
}

/// Reassembles a ClientHello from the raw bytes of a connection.
#[derive(Debug, Default)]
pub struct HelloReader {
    /// Every byte fed so far, to be replayed upstream.
    raw: Vec<u8>,
    /// Offset in `raw` of the next record header.
    next: usize,
    /// The handshake bytes of the records parsed so far.
    handshake: Vec<u8>,
    /// The final state, once reached.
    done: Option<Progress>,
}

impl HelloReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// The raw bytes fed so far (record headers included), in order.
    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Takes the raw bytes fed so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.raw
    }

    /// How many more bytes to read at most before the next decision point (the rest of the
    /// current record header or payload); 0 once finished.
    pub fn wanted(&self) -> usize {
        if self.done.is_some() {
            return 0;
        }
        let have = self.raw.len() - self.next;
        if have < 5 {
            return 5 - have;
        }
        let len = usize::from(u16::from_be_bytes([
            self.raw[self.next + 3],
            self.raw[self.next + 4],
        ]));
        (5 + len).saturating_sub(have).max(1)
    }

    /// Adds `bytes` and processes every complete record.
    pub fn feed(&mut self, bytes: &[u8]) -> Progress {
        if let Some(p) = &self.done {
            return p.clone();
        }
        self.raw.extend_from_slice(bytes);
        let p = self.process();
        if p != Progress::NeedMore {
            self.done = Some(p.clone());
        }
        p
    }

    fn process(&mut self) -> Progress {
        loop {
            let rest = &self.raw[self.next..];
            if let Some(&ty) = rest.first() {
                if ty != HANDSHAKE {
                    return Progress::Bad(Unreadable::NotHandshake);
                }
            }
            if let Some(&major) = rest.get(1) {
                if major != 3 {
                    return Progress::Bad(Unreadable::BadRecord);
                }
            }
            if rest.len() < 5 {
                return Progress::NeedMore;
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if len == 0 || len > MAX_RECORD {
                return Progress::Bad(Unreadable::BadRecord);
            }
            if self.next + 5 + len > MAX_BUFFERED {
                return Progress::Bad(Unreadable::TooLarge);
            }
            if rest.len() < 5 + len {
                return Progress::NeedMore;
            }
            self.handshake.extend_from_slice(&rest[5..5 + len]);
            self.next += 5 + len;
            if let Some(&ty) = self.handshake.first() {
                if ty != CLIENT_HELLO {
                    return Progress::Bad(Unreadable::NotClientHello);
                }
            }
            if self.handshake.len() >= 4 {
                let h = &self.handshake;
                let body = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
                if body > MAX_HELLO {
                    return Progress::Bad(Unreadable::TooLarge);
                }
                if h.len() >= 4 + body {
                    return match parse_client_hello(&h[4..4 + body]) {
                        Ok(sni) => Progress::Done(sni),
                        Err(why) => Progress::Bad(why),
                    };
                }
            }
        }
    }
}

/// Reads a whole ClientHello from `data` as it arrived on the wire (TLS records).
pub fn read_all(data: &[u8]) -> Progress {
    HelloReader::new().feed(data)
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ()> {
        if self.0.len() < n {
            return Err(());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<usize, ()> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Result<usize, ()> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Result<&'a [u8], ()> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], ()> {
        let n = self.u16()?;
        self.take(n)
    }
    fn end(&self) -> Result<(), ()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(())
        }
    }
}

/// The `server_name` host name of a complete ClientHello body (after the 4-byte handshake
/// header): `Ok(None)` without the extension, [`Unreadable::Malformed`] when anything does not
/// parse exactly (trailing bytes, duplicate extensions, a server name list that is not exactly
/// one host name of DNS characters).
pub fn parse_client_hello(body: &[u8]) -> Result<Option<String>, Unreadable> {
    parse(body).map_err(|()| Unreadable::Malformed)
}

fn parse(body: &[u8]) -> Result<Option<String>, ()> {
    let mut c = Cursor(body);
    if c.u8()? != 3 {
        return Err(()); // legacy_version major
    }
    c.take(1 + 32)?; // legacy_version minor, random
    if c.vec8()?.len() > 32 {
        return Err(()); // session id
    }
    let suites = c.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(());
    }
    if c.vec8()?.is_empty() {
        return Err(()); // compression methods
    }
    if c.0.is_empty() {
        return Ok(None); // no extensions at all (TLS 1.2 allows it)
    }
    let mut exts = Cursor(c.vec16()?);
    c.end()?;
    let mut seen = Vec::new();
    let mut sni = None;
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let body = exts.vec16()?;
        if seen.contains(&ty) {
            return Err(());
        }
        seen.push(ty);
        if ty == usize::from(SERVER_NAME) {
            sni = Some(server_name(body)?);
        }
    }
    Ok(sni)
}

/// The one `host_name` of a `server_name` extension body.
fn server_name(body: &[u8]) -> Result<String, ()> {
    let mut ext = Cursor(body);
    let mut list = Cursor(ext.vec16()?);
    ext.end()?;
    if list.u8()? != 0 {
        return Err(()); // name type host_name
    }
    let name = list.vec16()?;
    list.end()?;
    let dns = |b: &u8| b.is_ascii_alphanumeric() || b"-._".contains(b);
    if name.is_empty() || name.len() > 255 || !name.iter().all(dns) {
        return Err(());
    }
    String::from_utf8(name.to_vec()).map_err(|_| ())
}

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes to tell.
    NeedMore,
    /// A TLS record: read the ClientHello with [`HelloReader`].
    Tls,
    /// An SSLv2-style hello: deny.
    SslV2,
    /// A plaintext HTTP/1.x request line (possibly after blank lines or whitespace).
    Http,
    /// Anything else (raw TCP).
    Other,
}

/// Longest method token looked at.
const MAX_METHOD: usize = 32;

/// Whitespace that some HTTP servers skip before or between request-line words (RFC 9112 §2.2
/// blank lines; Python's `str.split()` also splits on these).
fn http_space(b: u8) -> bool {
    matches!(b, b'\t'..=b'\r' | 0x1c..=0x20 | 0x85 | 0xa0)
}

/// RFC 9110 `tchar`.
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the first bytes of a connection; `full` says no more bytes will be looked at
/// (the buffer is full or the wait is over), so an undecided prefix is decided fail-closed: a
/// TLS-like prefix is TLS (its ClientHello then cannot be read), an HTTP-like one HTTP.
pub fn sniff(first: &[u8], full: bool) -> Sniff {
    let need = |tls_like: bool| match (full, tls_like) {
        (false, _) => Sniff::NeedMore,
        (true, true) => Sniff::Tls,
        (true, false) => Sniff::Http,
    };
    let Some(&b0) = first.first() else {
        return if full { Sniff::Other } else { Sniff::NeedMore };
    };
    if (0x14..=0x18).contains(&b0) {
        // A TLS record header. Servers want version major 3 (OpenSSL, rustls); Go accepts any
        // version below 0x1000 in a first handshake or alert record (and skips a warning alert
        // before the ClientHello), so those count as TLS too. Other record types first are TLS
        // but never a ClientHello.
        let lenient = b0 == HANDSHAKE || b0 == 0x15;
        return match first.get(1) {
            None => need(true),
            Some(3) => Sniff::Tls,
            Some(v) if lenient && *v < 0x10 => Sniff::Tls,
            Some(_) => Sniff::Other,
        };
    }
    if b0 & 0x80 != 0 && !http_space(b0) {
        // SSLv2 record: 2-byte length with the high bit set, then msg type 1 (CLIENT-HELLO) and
        // the version (0x0002 or 0x03xx).
        return match (first.get(2), first.get(3)) {
            (None, _) | (Some(1), None) => need(true),
            (Some(1), Some(0 | 3)) => Sniff::SslV2,
            _ => Sniff::Other,
        };
    }
    let lead = first.iter().take_while(|&&b| http_space(b)).count();
    let rest = &first[lead..];
    if rest.is_empty() {
        return need(false);
    }
    let method = rest.iter().take_while(|&&b| tchar(b)).count();
    if method == 0 || method > MAX_METHOD {
        return Sniff::Other;
    }
    let Some(&delim) = rest.get(method) else {
        return need(false);
    };
    if !http_space(delim) {
        return Sniff::Other;
    }
    let canonical = first[..lead].iter().all(|b| matches!(b, b'\r' | b'\n'))
        && rest[..method]
            .iter()
            .all(|b| b.is_ascii_uppercase() || b"-_".contains(b))
        && delim == b' ';
    if canonical {
        return Sniff::Http;
    }
    // An unusual method token or separator: HTTP only if the line says so.
    let Some(eol) = rest.iter().position(|&b| b == b'\n') else {
        return need(false);
    };
    if rest[..eol].windows(5).any(|w| w == b"HTTP/") {
        Sniff::Http
    } else {
        Sniff::Other
    }
}

#[cfg(test)]
#[path = "client_hello_tests.rs"]
mod tests;
