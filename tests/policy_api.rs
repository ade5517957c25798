//! The engine API the proxy calls: built-in policy with permissive ports, HTTP-field detection,
//! `describe()` for admin `/policy`, header joining from `http::HeaderMap`, decision logging.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use svidcar_agent::{SpiffeId, TrustDomain};
use svidcar_proxy::policy::{log_decision, Direction, HeaderSource, PolicySet, Protocol, Request};

#[test]
fn builtin_admits_plaintext_only_on_permissive_ports() {
    let td = TrustDomain::parse("td").unwrap();
    let set = PolicySet::builtin_with_permissive_ports(&td, &[8081]);
    assert!(set.is_builtin());
    let p = set.compile(&SpiffeId::parse("spiffe://td/app").unwrap());
    let mut req = Request::new(Direction::Inbound, Protocol::Tcp);
    req.destination_port = Some(8081);
    let d = p.decide(&req);
    assert!(d.allow);
    assert_eq!(d.reason.to_string(), "builtin-same-trust-domain/rules[1]");
    req.destination_port = Some(8080);
    let d = p.decide(&req);
    assert!(!d.allow);
    assert_eq!(d.reason.to_string(), "default:deny");
    assert_eq!(p.effective_default(Direction::Inbound), "deny");
    assert_eq!(p.effective_default(Direction::Egress), "allow");
}

#[test]
fn describe_and_http_field_detection() {
    let yaml = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
settings: {pathNormalization: base, onPolicyChange: keep}
policies:
- {name: l7, direction: inbound, action: allow, rules: [{to: [{methods: ["GET"]}]}]}
- {name: other, direction: inbound, action: allow, selector: {spiffeIds: ["spiffe://td/other"]}, rules: [{}, {}]}
- {name: eg, direction: egress, action: allow, rules: [{to: [{hosts: ["x.example"]}]}]}
"#;
    let set = PolicySet::from_yaml("p.yaml", yaml).unwrap();
    let p = set.compile(&SpiffeId::parse("spiffe://td/app").unwrap());
    assert!(p.uses_http_fields(Direction::Inbound));
    assert!(!p.uses_http_fields(Direction::Egress));
    let v = p.describe();
    assert_eq!(v["localId"], "spiffe://td/app");
    assert_eq!(v["defaults"]["inbound"], "deny(implicit)");
    assert_eq!(v["defaults"]["egress"], "deny(implicit)");
    assert_eq!(v["settings"]["pathNormalization"], "base");
    assert_eq!(v["settings"]["onPolicyChange"], "keep");
    assert_eq!(v["policies"][1]["selected"], false);
    assert_eq!(v["policies"][1]["rules"][1], "other/rules[1]");
}

#[test]
fn header_map_joins_repeated_values() {
    let mut h = http::HeaderMap::new();
    h.append("x-tenant", "acme".parse().unwrap());
    h.append("x-tenant", "globex".parse().unwrap());
    h.insert("x-one", "1".parse().unwrap());
    assert_eq!(h.header("x-tenant").as_deref(), Some("acme,globex"));
    assert_eq!(h.header("x-one").as_deref(), Some("1"));
    assert_eq!(h.header("x-none"), None);
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn decision_log_names_reason_dry_run_and_attributes() {
    let yaml = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
policies:
- {name: try, direction: inbound, action: deny, dryRun: true, rules: [{}]}
- {name: au, direction: inbound, action: audit, rules: [{}]}
"#;
    let p = PolicySet::from_yaml("p.yaml", yaml)
        .unwrap()
        .compile(&SpiffeId::parse("spiffe://td/app").unwrap());
    let peer = SpiffeId::parse("spiffe://td/web").unwrap();
    let mut req = Request::new(Direction::Inbound, Protocol::Http);
    req.peer = Some(&peer);
    req.destination_port = Some(8080);
    req.method = Some("GET");
    req.path = Some("/x");
    let d = p.decide(&req);
    let buf = Buf::default();
    let writer = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(sub, || log_decision(&req, &d));
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    for want in [
        "decision=\"ALLOW\"",
        "reason=default:allow(implicit)",
        "dry_run_decision=\"DENY\"",
        "dry_run_rule=try/rules[0]",
        "audit=au/rules[0]",
        "peer=spiffe://td/web",
        "dst_port=8080",
        "method=\"GET\"",
        "path=\"/x\"",
    ] {
        assert!(out.contains(want), "{want} not in {out}");
    }
}

#[test]
fn missing_path_is_a_load_error_naming_the_path() {
    let path = std::env::temp_dir().join(format!("svidcar-no-such-policy-{}", std::process::id()));
    let err = PolicySet::load(&path).unwrap_err();
    assert_eq!(err.issues.len(), 1);
    assert_eq!(err.issues[0].file, path);
    assert!(err.to_string().contains("cannot read"), "{err}");
}

#[test]
fn empty_directory_is_an_error_and_only_an_explicit_empty_list_is_an_empty_set() {
    let dir = std::env::temp_dir().join(format!("svidcar-empty-policy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README.txt"), "not a policy").unwrap();
    let err = PolicySet::load(&dir).unwrap_err();
    assert!(err.to_string().contains("no policy file"), "{err}");
    std::fs::write(dir.join("empty.yaml"), "# nothing yet\n").unwrap();
    let err = PolicySet::load(&dir).unwrap_err();
    assert!(err.to_string().contains("no PolicySet document"), "{err}");
    std::fs::write(
        dir.join("empty.yaml"),
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies: []\n",
    )
    .unwrap();
    let set = PolicySet::load(&dir).unwrap();
    assert!(set.policies().is_empty());
    let p = set.compile(&SpiffeId::parse("spiffe://td/app").unwrap());
    let d = p.decide(&Request::new(Direction::Inbound, Protocol::Tcp));
    assert!(d.allow);
    assert_eq!(d.reason.to_string(), "default:allow(implicit)");
    assert_eq!(set.lint(&[]).first().map(|w| w.code), Some("L008"));
    let _ = std::fs::remove_dir_all(&dir);
}
