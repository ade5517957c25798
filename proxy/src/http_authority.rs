//! The authority of an inbound HTTP request and the client-certificate header (POLICY.md §4
//! "Authority"): what is evaluated as the request's host is what the app receives, and the
//! app can trust `x-forwarded-client-cert` because only the sidecar sets it.
//!
//! One authority per request: the absolute-form target's (HTTP/1.1) or `:authority` (HTTP/2),
//! else the single `Host` header. A `Host` that differs from it, two `Host` headers, no
//! authority at all, userinfo (`user@host`), or a name that is not a plain host (`a,b`,
//! `a/b`, `a%2eb`) is refused with `400` (RFC 9112 §3.2, RFC 9113 §8.3.1). The accepted
//! authority is put in one canonical form (host lowercased, a trailing dot removed, port
//! kept) and forwarded as the only `Host` (HTTP/1.1) or as `:authority` (HTTP/2).

use http::header::{HeaderMap, HeaderValue, HOST};
use svidcar_agent::SpiffeId;

/// The header the sidecar owns on inbound HTTP ports.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Reason labels of refused authorities (logs and `svidcar_proxy_http_refused_total`).
pub mod reason {
    /// Neither an absolute-form / `:authority` nor a `Host` header.
    pub const MISSING: &str = "authority:missing";
    /// More than one `Host` header.
    pub const DUPLICATE_HOST: &str = "authority:duplicate-host";
    /// `Host` differs from the absolute-form target's authority or from `:authority`.
    pub const MISMATCH: &str = "authority:host-mismatch";
    /// `user@host`.
    pub const USERINFO: &str = "authority:userinfo";
    /// Not `host[:port]` with a plain DNS name or IP literal.
    pub const INVALID: &str = "authority:invalid";
}

/// The request's authority in canonical form (`host[:port]`), or the reason it is refused.
/// `uri` is the request target as parsed (absolute-form / `:authority` give it an authority).
pub fn request_authority(uri: &http::Uri, headers: &HeaderMap) -> Result<String, &'static str> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(reason::DUPLICATE_HOST);
    }
    let host = host
        .map(|h| h.to_str().map_err(|_| reason::INVALID).and_then(canonical))
        .transpose()?;
    match uri.authority() {
        Some(a) => {
            let target = canonical(a.as_str())?;
            match host {
                Some(h) if h != target => Err(reason::MISMATCH),
                _ => Ok(target),
            }
        }
        None => host.ok_or(reason::MISSING),
    }
}

/// One `Host` value in canonical form: `host[:port]` with the host lowercased and one trailing
/// dot removed; or why the proxy refuses it (`authority:userinfo`, `authority:invalid`). Used by
/// inbound and egress HTTP and by `svidcar policy check --host`.
pub fn canonical(raw: &str) -> Result<String, &'static str> {
    if raw.contains('@') {
        return Err(reason::USERINFO);
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(reason::INVALID)?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(reason::INVALID);
        }
        (format!("[{}]", v6.to_ascii_lowercase()), after)
    } else {
        let (host, after) = match raw.find(':') {
            Some(i) => (&raw[..i], &raw[i..]),
            None => (raw, ""),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if host.is_empty() || host.starts_with('.') || !host.bytes().all(plain) {
            return Err(reason::INVALID);
        }
        (host.to_ascii_lowercase(), after)
    };
    match port {
        "" => Ok(host),
        p => match p.strip_prefix(':').map(str::parse::<u16>) {
            Some(Ok(n)) => Ok(format!("{host}:{n}")),
            _ => Err(reason::INVALID),
        },
    }
}

/// Removes every `x-forwarded-client-cert` the client sent and, for an mTLS peer, sets the
/// sidecar's own, Envoy format `By=<own SPIFFE ID>;URI=<peer SPIFFE ID>`. A plaintext peer
/// (permissive port) gets none: no header means no verified client certificate.
pub fn set_xfcc(headers: &mut HeaderMap, own: &SpiffeId, peer: Option<&SpiffeId>) {
    headers.remove(XFCC);
    if let Some(peer) = peer {
        let value = format!("By={};URI={}", own.as_str(), peer.as_str());
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(XFCC, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(target: &str, hosts: &[&str]) -> Result<String, &'static str> {
        let uri: http::Uri = target.parse().unwrap();
        let mut h = HeaderMap::new();
        for v in hosts {
            h.append(HOST, HeaderValue::from_str(v).unwrap());
        }
        request_authority(&uri, &h)
    }

    #[test]
    fn one_authority_per_request() {
        assert_eq!(auth("/x", &["Example.COM"]), Ok("example.com".into()));
        assert_eq!(
            auth("/x", &["example.com.:8080"]),
            Ok("example.com:8080".into())
        );
        assert_eq!(auth("/x", &["[::1]:80"]), Ok("[::1]:80".into()));
        assert_eq!(auth("/x", &["10.0.0.1"]), Ok("10.0.0.1".into()));
        assert_eq!(auth("http://a.example/x", &[]), Ok("a.example".into()));
        assert_eq!(
            auth("http://A.example/x", &["a.example"]),
            Ok("a.example".into())
        );
        assert_eq!(auth("http://a/x", &["b"]), Err(reason::MISMATCH));
        assert_eq!(auth("http://a/x", &["a:80"]), Err(reason::MISMATCH));
        assert_eq!(auth("/x", &["a", "a"]), Err(reason::DUPLICATE_HOST));
        assert_eq!(auth("/x", &[]), Err(reason::MISSING));
        assert_eq!(auth("http://u:p@a/x", &[]), Err(reason::USERINFO));
        assert_eq!(auth("/x", &["u@a"]), Err(reason::USERINFO));
        for bad in [
            "", "a,b", "a b", "a/b", "a%2eb", "a:", "a:x", "a:99999", ".", "[zz]", "[::1",
        ] {
            assert_eq!(auth("/x", &[bad]), Err(reason::INVALID), "{bad:?}");
        }
    }

    #[test]
    fn xfcc_is_replaced_or_removed() {
        let own = SpiffeId::parse("spiffe://td/backend").unwrap();
        let peer = SpiffeId::parse("spiffe://td/frontend").unwrap();
        let mut h = HeaderMap::new();
        h.append(XFCC, HeaderValue::from_static("By=x;URI=spiffe://td/admin"));
        h.append(XFCC, HeaderValue::from_static("URI=spiffe://td/root"));
        set_xfcc(&mut h, &own, Some(&peer));
        let all: Vec<_> = h.get_all(XFCC).iter().collect();
        assert_eq!(all, ["By=spiffe://td/backend;URI=spiffe://td/frontend"]);
        set_xfcc(&mut h, &own, None);
        assert!(h.get(XFCC).is_none());
    }
}
