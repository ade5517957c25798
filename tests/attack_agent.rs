//! Attacks on the identity agent by local users, against the real `svidcar agent` binary:
//!
//! - exec after connect: a process connects, then execs a registered binary (or forks a child
//!   that keeps the socket and execs), and calls on the connection it opened before;
//! - a deleted, replaced or renamed executable claiming its old `unix:path:`;
//! - socket and state directories (or key files) pre-created or owned by another user;
//! - socket exhaustion: a flood of idle connections from an unregistered uid.
//!
//! The attackers are real processes: `tests/py/raw_grpc.py` speaks gRPC over HTTP/2 on a raw
//! unix socket (standard library only), so it can call on a socket inherited across exec/fork,
//! run from a copy of the system `python3` (the "registered binary") or as uid 12345
//! (`setpriv`). Needs root (to chown and switch uids) and a python3 ELF binary.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::attacker::{
    agent_refuses, assert_refused, chmod, chown, end_flood, flood, flood_tools, hard_nofile,
    metric, python, python_copy, run, script, LimitedAgent, Registered, OTHER_UID,
};
use common::{Agent, TempDir, BIN};

#[test]
fn exec_after_connect_is_refused_and_the_binary_started_normally_gets_its_svid() {
    let Some(reg) = Registered::start("attack-exec", &[]) else {
        return;
    };
    let (py, registered, agent) = (&reg.py, &reg.registered, &reg.agent);
    let (sock, s, r) = reg.args();

    // The registered binary, started normally, gets its identity.
    assert_eq!(
        run(registered, &[s, "call", sock]),
        "SVID spiffe://svidcar.local/app"
    );
    // Another binary of the same uid does not.
    assert_eq!(run(py, &[s, "call", sock]), "DENIED");
    // The attack: connect as the other binary, wait until the agent accepted, exec the
    // registered binary (same pid) and call on the inherited socket.
    assert_eq!(run(py, &[s, "exec", sock, r, s, "call-fd"]), "DENIED");
    assert!(metric(&agent.health, "reason=\"exe_changed\"") >= 1.0);
    let log = agent.log_text();
    assert!(
        log.contains("may not exec another binary") && log.contains(r),
        "{log}"
    );
}

#[test]
fn a_forked_child_cannot_use_a_connection_its_parent_opened_before_exec() {
    let Some(reg) = Registered::start("attack-fork", &[]) else {
        return;
    };
    let (py, agent) = (&reg.py, &reg.agent);
    let (sock, s, r) = reg.args();
    // Parent: connects, forks, execs the registered binary (which just sleeps). Child: the
    // attacker's program, calls on the socket the parent opened: the kernel still names the
    // parent's pid, which now runs the registered binary.
    let out = run(
        py,
        &[s, "fork-exec", sock, r, "-c", "import time; time.sleep(3)"],
    );
    assert_eq!(out, "DENIED");
    assert!(metric(&agent.health, "reason=\"exe_changed\"") >= 1.0);

    // A child whose parent (the pid the kernel recorded) has exited is refused too.
    let out = run(py, &[s, "fork-exec", sock, "/bin/true"]);
    assert_eq!(out, "DENIED");
}

#[test]
fn deleted_replaced_or_renamed_executable_loses_its_path_selector() {
    let Some(py) = python() else { return };
    let dir = TempDir::new("attack-deleted");
    let script = script(dir.path());
    let s = script.to_str().unwrap();
    let mut args: Vec<String> = Vec::new();
    let mut apps = Vec::new();
    for action in ["none", "delete", "replace", "rename"] {
        let app = python_copy(&py, dir.path(), &format!("app-{action}"));
        args.push("--entry".into());
        // Path-only on purpose: the name is all that identifies the workload.
        args.push(format!(
            "spiffe://svidcar.local/{action}=unix:path:{}",
            app.display()
        ));
        apps.push((action, app));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start_in(dir.path(), &refs);
    let sock = agent.socket.to_str().unwrap();
    for (action, app) in &apps {
        let out = if *action == "none" {
            run(app, &[s, "call", sock])
        } else {
            run(
                app,
                &[s, "mutate-call", sock, action, app.to_str().unwrap()],
            )
        };
        let want = if *action == "none" {
            "SVID spiffe://svidcar.local/none".to_string()
        } else {
            "DENIED".to_string()
        };
        assert_eq!(out, want, "{action}");
    }
    // What the agent saw: no unix:path selector for the deleted one (never the stripped name).
    let log = agent.log_text();
    assert!(log.contains("no unix:path selector"), "{log}");
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no registration entry matches the caller"))
        .collect();
    assert_eq!(refused.len(), 3, "{log}");
    for (_, app) in &apps[1..] {
        let stripped = format!("\"unix:path:{}\"", app.display());
        assert!(refused.iter().all(|l| !l.contains(&stripped)), "{log}");
    }
}

#[test]
fn path_only_entries_are_warned_about_at_start() {
    let dir = TempDir::new("attack-warn");
    let agent = Agent::start_in(
        dir.path(),
        &[
            "--entry",
            "spiffe://svidcar.local/weak=unix:path:/usr/bin/weak",
            "--entry",
            "spiffe://svidcar.local/strong=unix:uid:1000,unix:path:/usr/bin/strong",
        ],
    );
    let log = agent.log_text();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("without unix:uid: or unix:gid:"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("spiffe://svidcar.local/weak"), "{log}");
}

#[test]
fn state_and_socket_dirs_another_user_controls_are_refused() {
    if common::uid() != 0 {
        common::skip("needs root to chown");
        return;
    }
    let dir = TempDir::new("attack-files");
    let d = dir.path();
    // A real CA of "the attacker": generated by an agent in a scratch dir.
    let scratch = TempDir::new("attack-files-ca");
    drop(Agent::start_in(scratch.path(), &[]));
    let planted = d.join("planted-state");
    std::fs::create_dir(&planted).unwrap();
    for f in ["ca-cert.pem", "ca-key.pem"] {
        std::fs::copy(scratch.path().join("state").join(f), planted.join(f)).unwrap();
        chown(&planted.join(f), OTHER_UID);
    }
    chmod(&planted, 0o700);
    chown(&planted, OTHER_UID);
    let sock = d.join("agent.sock");
    let sock_arg = sock.to_str().unwrap();
    let check = |state: &Path, want: &[&str]| {
        let args = ["--socket", sock_arg, "--state-dir", state.to_str().unwrap()];
        assert_refused(&args, want, &sock);
    };
    // 1. A state directory pre-created by another user, with a CA key pair of their own.
    check(
        &planted,
        &[
            planted.to_str().unwrap(),
            &format!("owned by uid {OTHER_UID}"),
        ],
    );
    // 2. Ours, but world-writable.
    chown(&planted, 0);
    chmod(&planted, 0o777);
    check(
        &planted,
        &[planted.to_str().unwrap(), "writable by group or others"],
    );
    // 3. Ours and 0700, but the key file belongs to another user.
    chmod(&planted, 0o700);
    chown(&planted.join("ca-cert.pem"), 0);
    let key = planted.join("ca-key.pem");
    check(
        &planted,
        &[key.to_str().unwrap(), &format!("owned by uid {OTHER_UID}")],
    );
    // 4. Our key, but readable by others.
    chown(&key, 0);
    chmod(&key, 0o644);
    check(&planted, &[key.to_str().unwrap(), "chmod 600"]);
    chmod(&key, 0o600);

    // 5. A socket directory pre-created by another user (it could swap the socket).
    let state = d.join("state");
    let state_arg = state.to_str().unwrap();
    let theirs = d.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, OTHER_UID);
    let their_sock = theirs.join("agent.sock");
    let err = agent_refuses(&[
        "--socket",
        their_sock.to_str().unwrap(),
        "--state-dir",
        state_arg,
    ]);
    assert!(
        err.contains(theirs.to_str().unwrap()) && err.contains("socket directory is owned by uid"),
        "{err}"
    );
    // 6. A world-writable socket directory of ours.
    chown(&theirs, 0);
    chmod(&theirs, 0o777);
    let err = agent_refuses(&[
        "--socket",
        their_sock.to_str().unwrap(),
        "--state-dir",
        state_arg,
    ]);
    assert!(err.contains("writable by group or others"), "{err}");
    // 7. A world-writable, non-sticky directory above the state directory.
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let err = agent_refuses(&[
        "--socket",
        sock_arg,
        "--state-dir",
        open.join("state").to_str().unwrap(),
    ]);
    assert!(
        err.contains(open.to_str().unwrap()) && err.contains("not sticky"),
        "{err}"
    );

    // Repaired: the pair is now the agent's own (root-owned, key 0600) and it starts.
    std::fs::rename(&planted, &state).unwrap();
    let mut agent = Agent::start_in(d, &[]);
    assert!(agent.stop());
}

#[test]
fn upstream_ca_files_another_user_controls_are_refused() {
    if common::uid() != 0 {
        common::skip("needs root to chown");
        return;
    }
    let dir = TempDir::new("attack-upstream");
    let d = dir.path();
    let td = "svidcar.local";
    let svidcar = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().expect("svidcar");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (root, nodes) = (d.join("root"), d.join("nodes"));
    svidcar(&[
        "ca",
        "init",
        "--trust-domain",
        td,
        "--out",
        root.to_str().unwrap(),
    ]);
    let issue = [
        "ca",
        "issue",
        "--root-dir",
        root.to_str().unwrap(),
        "--trust-domain",
        td,
    ];
    svidcar(
        &[
            &issue[..],
            &["--node", "n1", "--out", nodes.to_str().unwrap()],
        ]
        .concat(),
    );
    let (cert, key, bundle) = (
        nodes.join("n1-cert.pem"),
        nodes.join("n1-key.pem"),
        nodes.join("root-cert.pem"),
    );
    let (sock, state) = (d.join("agent.sock"), d.join("state"));
    let args = |key: &Path| {
        [
            "--trust-domain",
            td,
            "--socket",
            sock.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--upstream-cert",
            cert.to_str().unwrap(),
            "--upstream-key",
            key.to_str().unwrap(),
            "--upstream-bundle",
            bundle.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let check = |key: &Path, want: &[&str]| {
        let a = args(key);
        assert_refused(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            want,
            &sock,
        );
    };
    let other = format!("owned by uid {OTHER_UID}");
    // 1. The intermediate key belongs to another user (who could swap it for their own).
    chown(&key, OTHER_UID);
    check(&key, &[key.to_str().unwrap(), &other]);
    chown(&key, 0);
    // 2. Ours, but readable by others.
    chmod(&key, 0o644);
    check(&key, &[key.to_str().unwrap(), "chmod 600"]);
    chmod(&key, 0o600);
    // 3. A symlink to it that another user owns (and can point elsewhere).
    let link = d.join("key-link.pem");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    check(&link, &[link.to_str().unwrap(), &other]);
    // 4. A bundle anyone may write (and add a root the whole trust domain would trust).
    chmod(&bundle, 0o666);
    check(
        &key,
        &[bundle.to_str().unwrap(), "writable by group or others"],
    );
    chmod(&bundle, 0o644);
    // 5. The directory holding them belongs to another user (who can rename the files).
    chown(&nodes, OTHER_UID);
    check(&key, &[nodes.to_str().unwrap(), &other]);
    chown(&nodes, 0);

    // Repaired: it starts. A renewal whose key is readable by others is not adopted.
    let a = args(&key);
    let agent = Agent::start_in(
        d,
        &a[..2]
            .iter()
            .chain(&a[6..])
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let tmp = nodes.join("n1-key.pem.new");
    std::fs::copy(&key, &tmp).unwrap();
    chmod(&tmp, 0o644);
    std::fs::rename(&tmp, &key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent
        .log_text()
        .contains("keeping the current intermediate")
    {
        assert!(
            Instant::now() < deadline,
            "the unsafe key was not refused:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        agent.log_text().contains("chmod 600"),
        "{}",
        agent.log_text()
    );
    assert!(!agent
        .log_text()
        .contains("reloaded the upstream intermediate"));
}

#[test]
fn a_flood_of_idle_connections_from_another_uid_does_not_starve_registered_workloads() {
    let Some(py) = python() else { return };
    if !flood_tools() {
        return;
    }
    let hard = hard_nofile();
    if hard < 4096 {
        common::skip("hard open-files limit below 4096");
        return;
    }
    let dir = TempDir::new("attack-flood");
    let script = script(dir.path());
    let entry = "spiffe://svidcar.local/web=unix:uid:0";
    // The usual soft limit of 1024 (the agent raises it to the hard limit), default caps.
    let agent = LimitedAgent::start(dir.path(), &format!("1024:{hard}"), &["--entry", entry]);
    let flooder = flood(&py, &script, &agent.socket, 1100);
    let s = script.to_str().unwrap();
    let sock = agent.socket.to_str().unwrap();
    assert_eq!(
        run(&py, &[s, "call", sock]),
        "SVID spiffe://svidcar.local/web"
    );
    end_flood(flooder);
    let log = agent.log_text();
    assert!(log.contains("raised the open-files limit"), "{log}");
    // 1100 > the default cap (1024 here): the rest were closed at accept, and said so once.
    assert!(metric(&agent.health, "reason=\"per_uid_limit\"") >= 76.0);
    assert_eq!(
        log.matches("uid holds the maximum number of connections")
            .count(),
        1,
        "{log}"
    );
}

#[test]
fn the_per_uid_cap_protects_an_agent_whose_limit_cannot_be_raised() {
    let Some(py) = python() else { return };
    if !flood_tools() {
        return;
    }
    let dir = TempDir::new("attack-cap");
    let script = script(dir.path());
    let entry = "spiffe://svidcar.local/web=unix:uid:0";
    // 256 descriptors in all: the default cap is a quarter of them.
    let agent = LimitedAgent::start(dir.path(), "256:256", &["--entry", entry]);
    let flooder = flood(&py, &script, &agent.socket, 1100);
    let s = script.to_str().unwrap();
    let sock = agent.socket.to_str().unwrap();
    for _ in 0..3 {
        assert_eq!(
            run(&py, &[s, "call", sock]),
            "SVID spiffe://svidcar.local/web"
        );
    }
    assert!(metric(&agent.health, "reason=\"per_uid_limit\"") >= (1100 - 64) as f64);
    assert!(metric(&agent.health, "svidcar_agent_connections_open") <= 64.0 + 3.0);
    end_flood(flooder);
}

#[test]
fn an_idle_connection_is_closed_but_an_open_stream_is_not() {
    let Some(py) = python() else { return };
    let dir = TempDir::new("attack-idle");
    let script = script(dir.path());
    let agent = Agent::start_in(
        dir.path(),
        &[
            "--entry",
            &Agent::self_entry("web"),
            "--first-request-timeout",
            "1s",
        ],
    );
    let (s, sock) = (script.to_str().unwrap(), agent.socket.to_str().unwrap());
    let idle = run(&py, &[s, "idle", sock]);
    assert!(idle.starts_with("CLOSED"), "{idle}");
    assert!(metric(&agent.health, "reason=\"no_request\"") >= 1.0);
    // A stream that got its SVID stays open well past the first-request timeout.
    assert_eq!(run(&py, &[s, "stream-idle", sock, "3"]), "STREAM-OPEN");
}

#[test]
fn an_open_stream_ends_when_its_process_execs_another_binary() {
    // SVIDs re-issued every second: the stream pushes updates.
    let Some(reg) = Registered::start("attack-stream", &["--svid-ttl", "2s"]) else {
        return;
    };
    let (registered, agent) = (&reg.registered, &reg.agent);
    let (sock, s, r) = reg.args();
    let p = reg.py.to_str().unwrap();
    // Exec'ing the same binary again keeps the stream (same executable).
    let same = run(
        registered,
        &[s, "stream-then-exec", sock, r, s, "stream-continue", "10"],
    );
    assert_eq!(same, "UPDATE");
    // Exec'ing another binary: the next update is PERMISSION_DENIED instead of a new SVID.
    let other = run(
        registered,
        &[s, "stream-then-exec", sock, p, s, "stream-continue", "10"],
    );
    assert_eq!(other, "ENDED");
    assert!(agent.log_text().contains("stream ended: caller changed"));
}
