use super::*;

/// The first flight of a rustls client for `name` (one TLS record).
fn rustls_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(svidcar_agent::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    wire
}

/// The handshake message (4-byte header + body) of a one-record ClientHello.
fn message(record: &[u8]) -> Vec<u8> {
    record[5..].to_vec()
}

/// `message` cut into records of the given payload sizes (the last one takes the rest).
fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = message;
    let mut sizes = sizes.iter();
    while !rest.is_empty() {
        let n = sizes.next().copied().unwrap_or(rest.len()).min(rest.len());
        out.extend_from_slice(&[HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// Offset of the extensions length in a ClientHello message (after the 4-byte header).
fn extensions_at(msg: &[u8]) -> usize {
    let mut at = 4 + 2 + 32;
    at += 1 + usize::from(msg[at]);
    at += 2 + usize::from(u16::from_be_bytes([msg[at], msg[at + 1]]));
    at += 1 + usize::from(msg[at]);
    at
}

/// `msg` with `ext` (type, body) appended to its extensions, lengths fixed up.
fn with_extension(msg: &[u8], ty: u16, body: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    let at = extensions_at(&m);
    m.extend_from_slice(&ty.to_be_bytes());
    m.extend_from_slice(&(body.len() as u16).to_be_bytes());
    m.extend_from_slice(body);
    let ext_len = (m.len() - at - 2) as u16;
    m[at..at + 2].copy_from_slice(&ext_len.to_be_bytes());
    let body_len = (m.len() - 4) as u32;
    m[1..4].copy_from_slice(&body_len.to_be_bytes()[1..]);
    m
}

/// A `server_name` extension body listing `names` as host names.
fn sni_body(names: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for n in names {
        list.push(0);
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut body = (list.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(&list);
    body
}

fn done(name: &str) -> Progress {
    Progress::Done(Some(name.to_string()))
}

#[test]
fn a_rustls_hello_in_one_record() {
    let wire = rustls_hello("api.example.com");
    assert_eq!(read_all(&wire), done("api.example.com"));
    assert_eq!(read_all(&wire[..40]), Progress::NeedMore);
    assert_eq!(sniff(&wire, false), Sniff::Tls);
}

#[test]
fn split_across_records_at_every_boundary() {
    let msg = message(&rustls_hello("api.example.com"));
    for cut in 1..msg.len() {
        let wire = records(&msg, &[cut]);
        assert_eq!(read_all(&wire), done("api.example.com"), "cut at {cut}");
    }
}

#[test]
fn one_byte_records_and_one_byte_reads() {
    let msg = message(&rustls_hello("api.example.com"));
    let wire = records(&msg, &vec![1; msg.len()]);
    let mut r = HelloReader::new();
    for (i, b) in wire.iter().enumerate() {
        let p = r.feed(&[*b]);
        if i + 1 < wire.len() {
            assert_eq!(p, Progress::NeedMore, "byte {i}");
            assert!(r.wanted() >= 1);
        } else {
            assert_eq!(p, done("api.example.com"));
            assert_eq!(r.wanted(), 0);
        }
    }
    assert_eq!(r.bytes(), &wire[..], "every byte is kept for the replay");
}

#[test]
fn padded_past_one_record() {
    let msg = message(&rustls_hello("api.example.com"));
    // Padding extension (21) before SNI would be nicer, but position does not matter here.
    let big = with_extension(&msg, 21, &vec![0; 20 * 1024]);
    let wire = records(&big, &[MAX_RECORD]);
    assert_eq!(read_all(&wire), done("api.example.com"));
    assert_eq!(read_all(&wire[..MAX_RECORD + 5]), Progress::NeedMore);
}

#[test]
fn larger_than_the_limits_is_unreadable() {
    let msg = message(&rustls_hello("api.example.com"));
    let huge = with_extension(
        &with_extension(&msg, 21, &vec![0; 40_000]),
        22,
        &[0; 30_000],
    );
    let wire = records(&huge, &[MAX_RECORD]);
    // Decided on the header: no need to wait for 70 KB.
    assert_eq!(
        read_all(&wire[..MAX_RECORD + 5]),
        Progress::Bad(Unreadable::TooLarge)
    );
    // A small declared length but too many tiny records.
    let padded = with_extension(&msg, 21, &vec![0; 30_000]);
    let wire = records(&padded, &vec![1; padded.len()]);
    assert_eq!(read_all(&wire), Progress::Bad(Unreadable::TooLarge));
}

#[test]
fn no_sni_only_when_complete() {
    // rustls sends no server_name for an IP address.
    let wire = rustls_hello("192.0.2.1");
    assert_eq!(read_all(&wire), Progress::Done(None));
    assert_eq!(read_all(&wire[..wire.len() - 1]), Progress::NeedMore);
}

#[test]
fn records_that_are_not_a_client_hello() {
    let msg = message(&rustls_hello("api.example.com"));
    let alert = [0x15, 3, 3, 0, 2, 1, 0];
    let mut wire = alert.to_vec();
    wire.extend_from_slice(&records(&msg, &[]));
    assert_eq!(read_all(&wire), Progress::Bad(Unreadable::NotHandshake));
    assert_eq!(sniff(&wire, false), Sniff::Tls);
    // change_cipher_spec between two fragments.
    let mut wire = records(&msg[..10], &[]);
    wire.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]);
    wire.extend_from_slice(&records(&msg[10..], &[]));
    assert_eq!(read_all(&wire), Progress::Bad(Unreadable::NotHandshake));
    // Another handshake message first (ServerHello).
    let mut server = msg.clone();
    server[0] = 2;
    assert_eq!(
        read_all(&records(&server, &[])),
        Progress::Bad(Unreadable::NotClientHello)
    );
    // Bad record headers.
    assert_eq!(
        read_all(&[0x16, 2, 0, 0, 4]),
        Progress::Bad(Unreadable::BadRecord)
    );
    assert_eq!(
        read_all(&[0x16, 3, 1, 0, 0]),
        Progress::Bad(Unreadable::BadRecord)
    );
    assert_eq!(
        read_all(&[0x16, 3, 1, 0x40, 1]),
        Progress::Bad(Unreadable::BadRecord)
    );
    // Garbage after a 0x16 first byte.
    let mut garbage = vec![0x16, 3, 1, 0, 8];
    garbage.extend_from_slice(b"GET / HT");
    assert_eq!(
        read_all(&garbage),
        Progress::Bad(Unreadable::NotClientHello)
    );
}

#[test]
fn malformed_client_hellos() {
    let msg = message(&rustls_hello("api.example.com"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "duplicate server_name",
            with_extension(&msg, 0, &sni_body(&[b"evil.test"])),
        ),
        ("duplicate other extension", {
            let m = with_extension(&msg, 0xfafa, &[]);
            with_extension(&m, 0xfafa, &[])
        }),
    ];
    for (what, m) in cases {
        assert_eq!(
            read_all(&records(&m, &[])),
            Progress::Bad(Unreadable::Malformed),
            "{what}"
        );
    }
    // Built from a hello without SNI, so that the one server_name is ours.
    let bare = message(&rustls_hello("192.0.2.1"));
    let sni = |body: Vec<u8>| read_all(&records(&with_extension(&bare, 0, &body), &[]));
    assert_eq!(sni(sni_body(&[b"ok.test"])), done("ok.test"));
    let bad = Progress::Bad(Unreadable::Malformed);
    assert_eq!(sni(sni_body(&[b"a.test", b"b.test"])), bad, "two names");
    assert_eq!(sni(sni_body(&[b"evil.test\0ok.test"])), bad, "NUL");
    assert_eq!(sni(sni_body(&[b"a b"])), bad, "space");
    assert_eq!(sni(sni_body(&[b""])), bad, "empty name");
    assert_eq!(sni(Vec::new()), bad, "empty extension");
    let mut trailing = sni_body(&[b"ok.test"]);
    trailing.push(0);
    assert_eq!(sni(trailing), bad, "trailing byte in the extension");
    let mut other_type = sni_body(&[b"ok.test"]);
    other_type[2] = 1;
    assert_eq!(sni(other_type), bad, "unknown name type");
    // Trailing bytes after the extensions block.
    let mut m = msg.clone();
    m.push(0);
    let body_len = (m.len() - 4) as u32;
    m[1..4].copy_from_slice(&body_len.to_be_bytes()[1..]);
    assert_eq!(read_all(&records(&m, &[])), bad, "trailing bytes");
}

#[test]
fn sniffing_the_first_bytes() {
    let cases: &[(&[u8], bool, Sniff)] = &[
        (b"GET / HTTP/1.1\r\n", false, Sniff::Http),
        (b"POST /x HTTP/1.1", false, Sniff::Http),
        (b"\r\n\r\nGET / HTTP/1.1\r\n", false, Sniff::Http),
        (b" GET / HTTP/1.1\r\n", false, Sniff::Http),
        (b"get / HTTP/1.1\r\n", false, Sniff::Http),
        (b"GET\t/\tHTTP/1.1\r\n", false, Sniff::Http),
        (b"get / HT", false, Sniff::NeedMore),
        (b"get / HT", true, Sniff::Http),
        (b"GE", false, Sniff::NeedMore),
        (b"GE", true, Sniff::Http),
        (b"\r\n", false, Sniff::NeedMore),
        (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n", false, Sniff::Other),
        (b"PING\r\n", false, Sniff::Other),
        (b"*1\r\n$4\r\nPING\r\n", false, Sniff::Other),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", false, Sniff::Other),
        (b"\x16", false, Sniff::NeedMore),
        (b"\x16", true, Sniff::Tls),
        (b"\x16\x03", false, Sniff::Tls),
        (b"\x16\x00\x16", false, Sniff::Tls),
        (b"\x16\x41\x00\x00", false, Sniff::Other),
        (b"\x15\x00", false, Sniff::Tls),
        (b"\x17\x00", false, Sniff::Other),
        (b"\x15", false, Sniff::NeedMore),
        (b"\x15", true, Sniff::Tls),
        (b"\x15\x03", false, Sniff::Tls),
        (b"\x17\x03\x03", false, Sniff::Tls),
        (b"\x15\x41", false, Sniff::Other),
        (b"\x80\x2e\x01\x03\x01", false, Sniff::SslV2),
        (b"\x80\x2e\x01\x00\x02", false, Sniff::SslV2),
        (b"\x80\x2e", false, Sniff::NeedMore),
        (b"\x80\x2e\x05", false, Sniff::Other),
        (b"", false, Sniff::NeedMore),
        (b"", true, Sniff::Other),
    ];
    for (bytes, full, want) in cases {
        assert_eq!(
            sniff(bytes, *full),
            *want,
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}
