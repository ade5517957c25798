//! Generalizing what an access log recorded, for `svidcar policy suggest`: path templates
//! (variable segments become `{*}`), a cap on paths per caller (then prefixes `/a/{**}`), and
//! host wildcards when enough sibling subdomains were seen.

use std::collections::{BTreeMap, BTreeSet};

/// Whether a path segment looks like a variable: a number, a UUID, a long hex string (≥ 16) or
/// a long base64-like token (≥ 20 characters, mixed case, with a digit). A segment holding a
/// character the path grammar reserves (`*`, `{`, `}`) is also one (it cannot be written as a
/// literal).
pub fn is_variable(seg: &str) -> bool {
    let b = seg.as_bytes();
    if b.is_empty() {
        return false;
    }
    if seg.contains(['*', '{', '}']) || b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    let hex = |s: &[u8]| s.iter().all(u8::is_ascii_hexdigit);
    let uuid = b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b.split(|&c| c == b'-').all(hex);
    if uuid || (b.len() >= 16 && hex(b)) {
        return true;
    }
    b.len() >= 20
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_=+".contains(c))
        && b.iter().any(u8::is_ascii_digit)
        && b.iter().any(u8::is_ascii_uppercase)
        && b.iter().any(u8::is_ascii_lowercase)
}

/// The path template of a (normalized) request path: variable segments become `{*}`, the
/// others are kept as written. `/users/123/orders` → `/users/{*}/orders`.
pub fn template_path(path: &str) -> String {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let segs: Vec<&str> = rest
        .split('/')
        .map(|s| if is_variable(s) { "{*}" } else { s })
        .collect();
    format!("/{}", segs.join("/"))
}

fn segments(t: &str) -> Vec<&str> {
    t.strip_prefix('/').unwrap_or(t).split('/').collect()
}

/// Caps `templates` at `max` patterns: when there are more, templates are cut to their first
/// `d` segments followed by `{**}` (zero or more segments), for the deepest `d` that fits (at
/// worst `/{**}`). Returns each template's pattern; every pattern matches what its templates
/// matched.
pub fn cap_paths(templates: &BTreeSet<String>, max: usize) -> BTreeMap<String, String> {
    let identity = || templates.iter().map(|t| (t.clone(), t.clone())).collect();
    if templates.len() <= max.max(1) {
        return identity();
    }
    let deepest = templates
        .iter()
        .map(|t| segments(t).len())
        .max()
        .unwrap_or(0);
    for d in (0..deepest).rev() {
        let prefixes: BTreeSet<Vec<&str>> = templates
            .iter()
            .map(|t| segments(t))
            .filter(|s| s.len() > d)
            .map(|s| s[..d].to_vec())
            .collect();
        let map: BTreeMap<String, String> = templates
            .iter()
            .map(|t| {
                let s = segments(t);
                // A template cut at depth d, or one that a cut prefix already covers.
                let covered = s.len() >= d && prefixes.contains(&s[..d]);
                let pattern = if covered {
                    let head = s[..d].join("/");
                    if d == 0 {
                        "/{**}".to_string()
                    } else {
                        format!("/{head}/{{**}}")
                    }
                } else {
                    t.clone()
                };
                (t.clone(), pattern)
            })
            .collect();
        let distinct: BTreeSet<&String> = map.values().collect();
        if distinct.len() <= max.max(1) {
            return map;
        }
    }
    templates
        .iter()
        .map(|t| (t.clone(), "/{**}".to_string()))
        .collect()
}

/// Host wildcards: names that share a parent domain of at least two labels, with at least `n`
/// (≥ 2) distinct names under it, become `*.<parent>`; others stay exact. `n = 0`: none.
pub fn collapse_hosts(hosts: &BTreeSet<String>, n: usize) -> BTreeMap<String, String> {
    let parent = |h: &str| -> Option<String> {
        let (_, p) = h.split_once('.')?;
        (p.contains('.') && h.parse::<std::net::IpAddr>().is_err()).then(|| p.to_string())
    };
    let mut under: BTreeMap<String, usize> = BTreeMap::new();
    for h in hosts {
        if let Some(p) = parent(h) {
            *under.entry(p).or_default() += 1;
        }
    }
    hosts
        .iter()
        .map(|h| {
            let pattern = match parent(h) {
                Some(p) if n >= 2 && under[&p] >= n => format!("*.{p}"),
                _ => h.clone(),
            };
            (h.clone(), pattern)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::pattern::PathPattern;

    #[test]
    fn variable_segments_become_templates() {
        for (path, want) in [
            ("/users/123", "/users/{*}"),
            ("/users/123/orders/9", "/users/{*}/orders/{*}"),
            (
                "/o/7f3e2a1c-9b4d-4e8f-a1b2-c3d4e5f60718/items",
                "/o/{*}/items",
            ),
            ("/blobs/deadbeefcafebabe0011", "/blobs/{*}"),
            ("/t/eyJhbGciOiJIUzI1NiJ9x", "/t/{*}"),
            ("/healthz", "/healthz"),
            ("/", "/"),
            ("/a/", "/a/"),
            ("/v2/api", "/v2/api"),
            (
                "/releases/very-long-segment-name-2024",
                "/releases/very-long-segment-name-2024",
            ),
            ("/beef", "/beef"),
            ("/a*b/c", "/{*}/c"),
        ] {
            let t = template_path(path);
            assert_eq!(t, want, "{path}");
            let p = PathPattern::parse(&t).unwrap();
            assert!(p.matches(path), "{t} must match {path}");
        }
        assert!(!PathPattern::parse("/users/{*}")
            .unwrap()
            .matches("/users/1/x"));
    }

    #[test]
    fn too_many_paths_become_prefixes() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let few = set(&["/a", "/b/{*}"]);
        assert_eq!(cap_paths(&few, 5)["/b/{*}"], "/b/{*}");
        let many = set(&["/api/x/1", "/api/x/2", "/api/y", "/health"]);
        let capped = cap_paths(&many, 3);
        assert_eq!(capped["/api/x/1"], "/api/x/{**}");
        assert_eq!(capped["/api/y"], "/api/y");
        assert_eq!(capped["/health"], "/health");
        let capped = cap_paths(&many, 2);
        assert_eq!(capped["/api/x/1"], "/api/{**}");
        assert_eq!(capped["/api/y"], "/api/{**}");
        assert_eq!(cap_paths(&many, 1)["/health"], "/{**}");
        for (t, p) in cap_paths(&many, 2) {
            let concrete = t.replace("{*}", "1");
            assert!(
                PathPattern::parse(&p).unwrap().matches(&concrete),
                "{p} {t}"
            );
        }
    }

    #[test]
    fn hosts_collapse_only_past_the_threshold() {
        let hosts: BTreeSet<String> = [
            "a.cdn.example.com",
            "b.cdn.example.com",
            "c.cdn.example.com",
            "api.example.com",
            "example.com",
            "x.com",
            "y.com",
            "10.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let off = collapse_hosts(&hosts, 0);
        assert!(off.iter().all(|(h, p)| h == p), "{off:?}");
        let on = collapse_hosts(&hosts, 3);
        assert_eq!(on["a.cdn.example.com"], "*.cdn.example.com");
        assert_eq!(on["c.cdn.example.com"], "*.cdn.example.com");
        // Only one name under example.com, and never `*.com`.
        assert_eq!(on["api.example.com"], "api.example.com");
        assert_eq!(on["x.com"], "x.com");
        assert_eq!(on["10.0.0.1"], "10.0.0.1");
        assert_eq!(
            collapse_hosts(&hosts, 4)["a.cdn.example.com"],
            "a.cdn.example.com"
        );
        assert_eq!(
            collapse_hosts(&hosts, 2)["a.cdn.example.com"],
            "*.cdn.example.com"
        );
    }
}
