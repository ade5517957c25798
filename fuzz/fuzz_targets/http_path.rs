//! What the proxy does to a hostile HTTP request target and Host/SNI name before policy sees it:
//! `normalize_path` in every `pathNormalization` mode and `normalize_name`.
//! Invariants (a policy bypass if broken): normalization is idempotent (what is evaluated is
//! what is forwarded, and the app normalizing again sees the same path), the result is an
//! absolute path without dot segments (and without `//` in the merging modes) whose escapes are
//! all upper-case and neither unreserved characters nor slashes, only a path holding `%` or a
//! control character is refused (malformed escape, escaped slash), and a plausible
//! host name is normalized to its lowercase form without port or trailing dot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svidcar_proxy::policy::{
    normalize_name, normalize_path, query_part, PathError, PathNormalization,
};

const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let q = query_part(raw);
    assert!(raw.ends_with(q));
    let path = &raw[..raw.len() - q.len()];
    let odd = path.contains('%') || path.bytes().any(|b| b < 0x20 || b == 0x7f);
    for mode in MODES {
        let p = match normalize_path(mode, raw) {
            Ok(p) => p,
            Err(PathError::NotAbsolute(_)) => {
                assert!(!raw.starts_with('/'), "{mode:?} refused an absolute path");
                continue;
            }
            // Malformed escapes, control characters and escaped slashes: only with a `%` or a
            // control character in the path, and never in `none` (as received).
            Err(e) => {
                assert!(mode != PathNormalization::None && odd, "{mode:?}: {e} on {raw:?}");
                continue;
            }
        };
        assert!(p.starts_with('/'), "{mode:?}: {p:?} is not absolute");
        assert!(!p.contains(['?', '#']), "{mode:?}: query left in {p:?}");
        if mode == PathNormalization::None {
            continue;
        }
        assert!(!p.contains('\\'), "{mode:?}: backslash left in {p:?}");
        for seg in p.split('/') {
            assert!(
                seg != "." && seg != "..",
                "{mode:?}: dot segment left in {p:?}"
            );
        }
        if mode != PathNormalization::Base {
            assert!(!p.contains("//"), "{mode:?}: double slash left in {p:?}");
        }
        // Decoded once, to one form: every escape left is upper-case hex, not an unreserved
        // character (those are decoded), not a slash (refused or decoded), not a control.
        let b = p.as_bytes();
        for (i, _) in p.match_indices('%') {
            let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
            assert!(
                b.len() > i + 2 && hex(b[i + 1]) && hex(b[i + 2]),
                "{mode:?}: escape not in upper-case hex in {p:?}"
            );
            let v = u8::from_str_radix(&p[i + 1..i + 3], 16).unwrap_or(0);
            assert!(
                !(v.is_ascii_alphanumeric() || b"-._~/\\".contains(&v) || v < 0x20 || v == 0x7f),
                "{mode:?}: escape %{:02X} left in {p:?}",
                v
            );
        }
        let again = normalize_path(mode, &p).expect("a normalized path is absolute");
        assert_eq!(again, p, "{mode:?} is not idempotent on {raw:?}");
    }
    // Names: a plausible `host[.][:port]` normalizes to the lowercase host, and normalizing
    // that again changes nothing. (Odd inputs like `[:]:1:80` or `a..` are not fixed points;
    // they match no sane host pattern either way, and names are not re-normalized downstream.)
    let host = raw.split_once(':').map_or(raw, |(h, _)| h);
    let port_ok = raw
        .split_once(':')
        .is_none_or(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let bare = host.strip_suffix('.').unwrap_or(host);
    let plausible = !bare.is_empty()
        && port_ok
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !bare.contains("..")
        && !bare.starts_with('.')
        && !bare.ends_with('.');
    if plausible {
        let name = normalize_name(raw);
        assert_eq!(name, bare.to_ascii_lowercase(), "name of {raw:?}");
        assert_eq!(
            normalize_name(&name),
            name,
            "name of {raw:?} is not a fixed point"
        );
    } else {
        let _ = normalize_name(raw);
    }
});
