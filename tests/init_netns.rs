//! `svidcar init` in a real network namespace: the rules are installed, idempotent, really
//! redirect inbound and outbound TCP (with the documented exemptions), and `--cleanup` restores
//! the pristine ruleset. Needs root, `ip`, `python3` and iptables or nft.
#[path = "common/netns.rs"]
mod netns;

use netns::{connect, is_root, skip_or_fail, which, PodPair, Servers};

const SVIDCAR: &str = env!("CARGO_BIN_EXE_svidcar");

/// Drops comments and zeroes packet counters, so two dumps of the same rules compare equal.
fn normalize(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Iptables,
    Nft,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nft => "nft",
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            Backend::Iptables => &[
                "iptables-save",
                "iptables-restore",
                "ip6tables-save",
                "ip6tables-restore",
            ],
            Backend::Nft => &["nft"],
        }
    }

    fn dump(self, pair: &PodPair) -> String {
        match self {
            Backend::Iptables => normalize(&format!(
                "{}{}",
                pair.exec_ok(&pair.pod, &["iptables-save", "-t", "nat"]),
                pair.exec_ok(&pair.pod, &["ip6tables-save", "-t", "nat"])
            )),
            Backend::Nft => normalize(&pair.exec_ok(&pair.pod, &["nft", "list", "ruleset"])),
        }
    }
}

fn prerequisites(backend: Backend) -> bool {
    if !is_root() {
        return skip_or_fail("needs root to create network namespaces");
    }
    for tool in ["ip", "python3", "timeout"].iter().chain(backend.tools()) {
        if which(tool).is_none() {
            return skip_or_fail(&format!(
                "`{tool}` is not installed (apt-get install iproute2 iptables nftables python3)"
            ));
        }
    }
    false
}

fn svidcar_init(pair: &PodPair, args: &[&str]) {
    let mut argv = vec![SVIDCAR, "init"];
    argv.extend_from_slice(args);
    pair.exec_ok(&pair.pod, &argv);
}

fn intercepts_for_real(backend: Backend) {
    if prerequisites(backend) {
        return;
    }
    let pair = PodPair::new(&backend.name()[..3]);
    let pristine = backend.dump(&pair);
    let excluded_cidr = format!("{}/25", pair.peer_ip_excluded);
    let init_args = [
        "--backend",
        backend.name(),
        "--ipv6",
        "on",
        "--exclude-inbound-ports",
        "7000",
        "--exclude-outbound-ports",
        "9091",
        "--exclude-outbound-cidrs",
        &excluded_cidr,
    ];

    let pod_servers: Vec<String> = [
        "in/0.0.0.0/15006",
        "in6/::/15006",
        "out/127.0.0.1/15001",
        "out6/::1/15001",
        "admin/0.0.0.0/15000",
        "direct/0.0.0.0/7000",
        "local/127.0.0.1/7070",
        "self/0.0.0.0/7071",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let peer_servers: Vec<String> = [
        "remote/0.0.0.0/9090",
        "remote/0.0.0.0/9091",
        "remote/0.0.0.0/9092",
        "remote/0.0.0.0/9093",
        "remote6/::/9090",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _pod = Servers::start(&pair, &pair.pod, &pod_servers);
    let _peer = Servers::start(&pair, &pair.peer, &peer_servers);
    let (pod_ip, peer_ip) = (pair.pod_ip.clone(), pair.peer_ip.clone());

    // Before: nothing listens on 8080, and the app reaches the peer directly.
    let before = connect(&pair, &pair.peer, "-", "-", &pod_ip, 8080);
    assert!(
        before.starts_with("ERR"),
        "no listener on 8080 yet: {before}"
    );
    assert_eq!(
        connect(&pair, &pair.pod, "-", "-", &peer_ip, 9092),
        format!("remote {peer_ip}:9092")
    );

    svidcar_init(&pair, &init_args);
    let installed = backend.dump(&pair);
    match backend {
        Backend::Iptables => {
            for needle in [
                ":SVIDCAR_INBOUND",
                ":SVIDCAR_OUTPUT",
                ":SVIDCAR_REDIRECT",
                ":SVIDCAR_IN_REDIRECT",
                "-j REDIRECT --to-ports 15006",
                "-j REDIRECT --to-ports 15001",
                "--uid-owner 1337",
            ] {
                assert!(installed.contains(needle), "missing {needle}:\n{installed}");
            }
        }
        Backend::Nft => {
            for needle in [
                "table inet svidcar",
                "redirect to :15006",
                "redirect to :15001",
                "skuid 1337",
            ] {
                assert!(installed.contains(needle), "missing {needle}:\n{installed}");
            }
        }
    }

    // Idempotent: a second run leaves exactly the same ruleset, no duplicated jump.
    svidcar_init(&pair, &init_args);
    let again = backend.dump(&pair);
    assert_eq!(
        installed, again,
        "second `svidcar init` changed the ruleset"
    );
    if backend == Backend::Iptables {
        // A duplicated and a stale jump (say, left by an older version) are repaired too.
        pair.exec_ok(
            &pair.pod,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "-j",
                "SVIDCAR_INBOUND",
            ],
        );
        pair.exec_ok(
            &pair.pod,
            &[
                "iptables",
                "-t",
                "nat",
                "-I",
                "OUTPUT",
                "-j",
                "SVIDCAR_OUTPUT",
            ],
        );
        assert_ne!(backend.dump(&pair), installed);
        svidcar_init(&pair, &init_args);
        let again = backend.dump(&pair);
        assert_eq!(
            installed, again,
            "stale or duplicated jumps were not repaired"
        );
        assert_eq!(
            again
                .matches("-A PREROUTING -p tcp -j SVIDCAR_INBOUND")
                .count(),
            2,
            "one per family"
        );
        assert_eq!(
            again.matches("-A OUTPUT -p tcp -j SVIDCAR_OUTPUT").count(),
            2,
            "one per family"
        );
    }

    let peer = pair.peer.clone();
    let pod = pair.pod.clone();
    // Inbound: redirected to 15006 with the original destination kept.
    assert_eq!(
        connect(&pair, &peer, "-", "-", &pod_ip, 8080),
        format!("in {pod_ip}:8080")
    );
    assert_eq!(
        connect(&pair, &peer, "-", "-", &pair.pod_ip6, 8080),
        format!("in6 [{}]:8080", pair.pod_ip6)
    );
    // Excluded inbound port and the admin port reach their listener directly.
    assert_eq!(
        connect(&pair, &peer, "-", "-", &pod_ip, 7000),
        format!("direct {pod_ip}:7000")
    );
    assert_eq!(
        connect(&pair, &peer, "-", "-", &pod_ip, 15000),
        format!("admin {pod_ip}:15000")
    );
    // Outbound of the app: redirected to 15001, original destination kept.
    assert_eq!(
        connect(&pair, &pod, "-", "-", &peer_ip, 9090),
        format!("out {peer_ip}:9090")
    );
    assert_eq!(
        connect(&pair, &pod, "-", "-", &pair.peer_ip6, 9090),
        format!("out6 [{}]:9090", pair.peer_ip6)
    );
    // The proxy's UID is exempt.
    assert_eq!(
        connect(&pair, &pod, "1337", "-", &peer_ip, 9090),
        format!("remote {peer_ip}:9090")
    );
    assert_eq!(
        connect(&pair, &pod, "1337", "-", &pair.peer_ip6, 9090),
        format!("remote6 [{}]:9090", pair.peer_ip6)
    );
    // Excluded outbound port and CIDR.
    assert_eq!(
        connect(&pair, &pod, "-", "-", &peer_ip, 9091),
        format!("remote {peer_ip}:9091")
    );
    let excl = pair.peer_ip_excluded.clone();
    assert_eq!(
        connect(&pair, &pod, "-", "-", &excl, 9090),
        format!("remote {excl}:9090")
    );
    // Loopback: the app's traffic to 127.0.0.1 and to its own pod IP is not captured.
    assert_eq!(
        connect(&pair, &pod, "-", "-", "127.0.0.1", 7070),
        "local 127.0.0.1:7070"
    );
    assert_eq!(
        connect(&pair, &pod, "-", "-", &pod_ip, 7071),
        format!("self {pod_ip}:7071")
    );
    // The proxy calling its own pod IP goes through the inbound listener…
    assert_eq!(
        connect(&pair, &pod, "1337", "-", &pod_ip, 7071),
        format!("in {pod_ip}:7071")
    );
    // …and its forwarding to the app from 127.0.0.6 is never re-captured.
    assert_eq!(
        connect(&pair, &pod, "1337", "127.0.0.6", "127.0.0.1", 7070),
        "local 127.0.0.1:7070"
    );

    // Cleanup (twice: idempotent) restores the pristine ruleset and the direct paths (checked
    // on ports not used before, so no conntrack entry of a redirected connection is reused).
    svidcar_init(&pair, &["--backend", backend.name(), "--cleanup"]);
    svidcar_init(&pair, &["--backend", backend.name(), "--cleanup"]);
    assert_eq!(backend.dump(&pair), pristine, "--cleanup left rules behind");
    let after = connect(&pair, &peer, "-", "-", &pod_ip, 8080);
    assert!(
        after.starts_with("ERR"),
        "still redirected after cleanup: {after}"
    );
    assert_eq!(
        connect(&pair, &pod, "-", "-", &peer_ip, 9093),
        format!("remote {peer_ip}:9093")
    );
}

#[test]
fn iptables_backend_intercepts_and_cleans_up() {
    intercepts_for_real(Backend::Iptables);
}

#[test]
fn nft_backend_intercepts_and_cleans_up() {
    intercepts_for_real(Backend::Nft);
}
