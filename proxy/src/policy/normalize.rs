//! HTTP path normalization (POLICY.md §4, `settings.pathNormalization` and
//! `settings.escapedSlashes`). The normalized path is what is evaluated **and** forwarded; the
//! query and fragment are never part of it.

use std::borrow::Cow;

pub use super::model::{EscapedSlashes, PathNormalization};

/// A request path the proxy refuses to evaluate: answered `400`, and `policy check` reports it
/// as `DENY by` [`PathError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path (`*`, an authority-form `CONNECT` target, `x/y`).
    #[error("request path {0:?} does not start with \"/\"")]
    NotAbsolute(String),
    /// A malformed escape (`%zz`, `%4`) or an encoded (or raw) NUL / control character.
    #[error("request path {0:?} holds a malformed escape or a control character")]
    BadEscape(String),
    /// `%2F`/`%5C` left in the path with `escapedSlashes: reject` (the default).
    #[error("request path {0:?} holds an escaped slash (%2F or %5C) and escapedSlashes is reject")]
    EscapedSlash(String),
}

impl PathError {
    /// The stable reason for logs, metrics and `policy check`: `normalize:not-absolute`,
    /// `normalize:bad-escape` or `normalize:escaped-slash`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAbsolute(_) => "normalize:not-absolute",
            Self::BadEscape(_) => "normalize:bad-escape",
            Self::EscapedSlash(_) => "normalize:escaped-slash",
        }
    }
}

/// [`normalize_path_with`] with `escapedSlashes: reject` (the default).
pub fn normalize_path(mode: PathNormalization, raw: &str) -> Result<String, PathError> {
    normalize_path_with(mode, EscapedSlashes::Reject, raw)
}

/// Splits `raw` (a request target in origin form) into path and the rest (`?query#fragment`,
/// empty if none), normalizes the path with `mode` and `slashes`, and returns the normalized
/// path. The proxy forwards `normalized + rest`.
///
/// Every mode but `none` does, in this order: decode the percent-encoded unreserved characters
/// and upper-case the hex digits of the escapes that stay (a malformed escape or an encoded
/// control character is refused); decode `%2F %5C` (`decode-and-merge-slashes`) or refuse
/// them (`escapedSlashes: reject`) or keep them; `\` → `/`; `//` → `/` (`merge-slashes` and
/// up); RFC 3986 dot-segment removal. Decoding happens once: `%252e` stays `%252e` (`%25` is
/// not unreserved), never `.`.
pub fn normalize_path_with(
    mode: PathNormalization,
    slashes: EscapedSlashes,
    raw: &str,
) -> Result<String, PathError> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let path = &raw[..end];
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    if mode == PathNormalization::None {
        return Ok(path.to_string());
    }
    let mut p = canonical_escapes(path).map_err(|()| PathError::BadEscape(raw.to_string()))?;
    if has_escaped_slash(&p) {
        if mode == PathNormalization::DecodeAndMergeSlashes {
            p = Cow::Owned(decode_slashes(&p));
        } else if slashes == EscapedSlashes::Reject {
            return Err(PathError::EscapedSlash(raw.to_string()));
        }
    }
    if p.contains('\\') {
        p = Cow::Owned(p.replace('\\', "/"));
    }
    if mode != PathNormalization::Base && p.contains("//") {
        let mut s = String::with_capacity(p.len());
        let mut prev_slash = false;
        for ch in p.chars() {
            if !(ch == '/' && prev_slash) {
                s.push(ch);
            }
            prev_slash = ch == '/';
        }
        p = Cow::Owned(s);
    }
    Ok(remove_dot_segments(&p))
}

impl super::load::EffectiveSettings {
    /// [`normalize_path_with`] with this set's `pathNormalization` and `escapedSlashes`.
    pub fn normalize_path(&self, raw: &str) -> Result<String, PathError> {
        normalize_path_with(self.path_normalization, self.escaped_slashes, raw)
    }
}

/// The query-and-fragment part of a request target (`""` when absent), to re-append when
/// forwarding the normalized path.
pub fn query_part(raw: &str) -> &str {
    raw.find(['?', '#']).map_or("", |i| &raw[i..])
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// RFC 3986 §2.3 unreserved characters.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Step (1) of `base`: decodes every escaped unreserved character and upper-cases the hex
/// digits of the escapes that stay. `Err` for a malformed escape or a control character
/// (encoded or raw). Also used on path patterns at load, so a pattern and a request path
/// compare in the same form.
pub(crate) fn canonical_escapes(p: &str) -> Result<Cow<'_, str>, ()> {
    let b = p.as_bytes();
    if !b.iter().any(|&c| c == b'%' || is_control(c)) {
        return Ok(Cow::Borrowed(p));
    }
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(());
                };
                let v = hi << 4 | lo;
                if is_control(v) {
                    return Err(());
                }
                if is_unreserved(v) {
                    out.push(char::from(v));
                } else {
                    out.push('%');
                    out.push(char::from(b[i + 1].to_ascii_uppercase()));
                    out.push(char::from(b[i + 2].to_ascii_uppercase()));
                }
                i += 3;
            }
            c if is_control(c) => return Err(()),
            _ => {
                // Copy up to the next byte of interest (keeps multi-byte UTF-8 whole).
                let next = b[i..]
                    .iter()
                    .position(|&c| c == b'%' || is_control(c))
                    .map_or(b.len(), |n| i + n);
                out.push_str(&p[i..next]);
                i = next;
            }
        }
    }
    Ok(Cow::Owned(out))
}

/// After [`canonical_escapes`] every escape is upper-case.
fn has_escaped_slash(p: &str) -> bool {
    p.contains("%2F") || p.contains("%5C")
}

fn decode_slashes(p: &str) -> String {
    p.replace("%2F", "/").replace("%5C", "\\")
}

/// RFC 3986 §5.2.4 on an absolute path; the result always starts with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    #[test]
    fn unreserved_escapes_are_decoded_once_before_dot_segments() {
        let ok = |raw: &str| normalize_path(MergeSlashes, raw).unwrap();
        assert_eq!(ok("/public/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/public/%2E%2E/admin"), "/admin");
        assert_eq!(ok("/public/.%2e/admin"), "/admin");
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/adm%69n"), "/admin");
        // Not decoded twice: `%25` stays an escape.
        assert_eq!(ok("/public/%252e%252e/admin"), "/public/%252e%252e/admin");
        // Reserved and non-ASCII escapes stay, hex upper-cased.
        assert_eq!(ok("/a%3fb%c3%bc"), "/a%3Fb%C3%BC");
        assert_eq!(ok("/ü/%7e"), "/ü/~");
    }

    /// The fuzz target's invariants (fuzz/fuzz_targets/http_path.rs) on many short paths
    /// over an alphabet of the interesting characters: idempotent (what is evaluated is what
    /// is forwarded, and an app normalizing again sees the same), one escape form.
    #[test]
    fn idempotent_with_one_escape_form() {
        const ALPHABET: &[u8] = b"/.%2eE5cCfF0aA1\\?;zg7~";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let modes = [Base, MergeSlashes, DecodeAndMergeSlashes];
        for _ in 0..60_000 {
            let mut raw = String::from("/");
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 14) as usize;
            for k in 0..len {
                let idx = (seed >> (k * 4 % 60)) as usize % ALPHABET.len();
                raw.push(char::from(ALPHABET[idx]));
            }
            for mode in modes {
                for slashes in [EscapedSlashes::Reject, EscapedSlashes::Keep] {
                    let Ok(p) = normalize_path_with(mode, slashes, &raw) else {
                        continue;
                    };
                    let again = normalize_path_with(mode, slashes, &p);
                    assert_eq!(
                        again.as_deref(),
                        Ok(p.as_str()),
                        "{mode:?} {slashes:?} {raw:?}"
                    );
                    for seg in p.split('/') {
                        assert!(seg != "." && seg != "..", "{raw:?} -> {p:?}");
                    }
                    for (i, _) in p.match_indices('%') {
                        let v = u8::from_str_radix(&p[i + 1..i + 3], 16).unwrap();
                        assert!(!is_unreserved(v), "{raw:?} -> {p:?}");
                        assert_eq!(&p[i + 1..i + 3], p[i + 1..i + 3].to_ascii_uppercase());
                    }
                }
            }
        }
    }

    #[test]
    fn refusals_name_their_reason() {
        let reason = |mode, slashes, raw: &str| {
            normalize_path_with(mode, slashes, raw)
                .unwrap_err()
                .reason()
        };
        use EscapedSlashes::*;
        for raw in [
            "/a%zz", "/a%4", "/a%", "/a%00b", "/a%0a", "/a%7F", "/a\u{1}b",
        ] {
            assert_eq!(
                reason(MergeSlashes, Reject, raw),
                "normalize:bad-escape",
                "{raw}"
            );
        }
        for raw in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5c..%5cb"] {
            assert_eq!(reason(MergeSlashes, Reject, raw), "normalize:escaped-slash");
            assert_eq!(reason(Base, Reject, raw), "normalize:escaped-slash");
        }
        assert_eq!(reason(Base, Keep, "*"), "normalize:not-absolute");
        assert_eq!(reason(Base, Keep, ""), "normalize:not-absolute");
        // `keep`: matched literally, hex upper-cased; `decode-…` decodes.
        assert_eq!(
            normalize_path_with(MergeSlashes, Keep, "/a%2fb/../c").unwrap(),
            "/c"
        );
        assert_eq!(
            normalize_path_with(MergeSlashes, Keep, "/a%2f..%2fb").unwrap(),
            "/a%2F..%2Fb"
        );
        assert_eq!(
            normalize_path_with(DecodeAndMergeSlashes, Reject, "/a%2f..%2fadmin").unwrap(),
            "/admin"
        );
        // The query is never part of the path (nor checked).
        assert_eq!(normalize_path(MergeSlashes, "/a?x=%zz%2F").unwrap(), "/a");
        // `none` is as received.
        assert_eq!(normalize_path(None, "/a%2F%zz").unwrap(), "/a%2F%zz");
    }
}
