//! What the proxy does to a hostile HTTP request target and Host/SNI name before policy sees it:
//! `normalize_path` in every `pathNormalization` mode and `normalize_name`.
//! Invariants (a policy bypass if broken): normalization is idempotent (what is evaluated is
//! what is forwarded, and the app normalizing again sees the same path), the result is an
//! absolute path without dot segments (and without `//` in the merging modes), and a name is
//! normalized to a fixed point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svidcar_proxy::policy::{normalize_name, normalize_path, query_part, PathNormalization};

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
    for mode in MODES {
        let Ok(p) = normalize_path(mode, raw) else {
            assert!(!raw.starts_with('/'), "{mode:?} refused an absolute path");
            continue;
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
        let again = normalize_path(mode, &p).expect("a normalized path is absolute");
        assert_eq!(again, p, "{mode:?} is not idempotent on {raw:?}");
    }
    let name = normalize_name(raw);
    assert_eq!(
        normalize_name(&name),
        name,
        "name normalization is not idempotent on {raw:?}"
    );
});
