//! HTTP path normalization (POLICY.md §4, `settings.pathNormalization`). The normalized path is
//! what is evaluated **and** forwarded; the query and fragment are never part of it.

use std::borrow::Cow;

pub use super::model::PathNormalization;

/// A request path the proxy refuses to evaluate (answer `400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path.
    #[error("request path {0:?} does not start with \"/\"")]
    NotAbsolute(String),
}

/// Splits `raw` (a request target in origin form) into path and the rest (`?query#fragment`,
/// empty if none), normalizes the path with `mode`, and returns the normalized path. The proxy
/// forwards `normalized + rest`.
pub fn normalize_path(mode: PathNormalization, raw: &str) -> Result<String, PathError> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let path = &raw[..end];
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    if mode == PathNormalization::None {
        return Ok(path.to_string());
    }
    let mut p: Cow<str> = Cow::Borrowed(path);
    if mode == PathNormalization::DecodeAndMergeSlashes {
        p = Cow::Owned(decode_slashes(&p));
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

/// The query-and-fragment part of a request target (`""` when absent), to re-append when
/// forwarding the normalized path.
pub fn query_part(raw: &str) -> &str {
    raw.find(['?', '#']).map_or("", |i| &raw[i..])
}

fn decode_slashes(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && p.is_char_boundary(i + 3) {
            match &p[i + 1..i + 3] {
                "2F" | "2f" => {
                    out.push('/');
                    i += 3;
                    continue;
                }
                "5C" | "5c" => {
                    out.push('\\');
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        let ch_len = p[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&p[i..i + ch_len]);
        i += ch_len;
    }
    out
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
