//! Offline validation of `deploy/`: every YAML parses, kustomizations reference existing files
//! and nothing is orphaned, required fields are present, workloads meet the Pod Security
//! "restricted" profile (with the agent's documented exceptions), RBAC is read-only and minimal,
//! the webhook wiring is consistent, the sample policy lints clean, and — with
//! `.venv/bin/kubernetes-validate` — every object passes the strict Kubernetes schema.
#[path = "common/pss.rs"]
mod pss;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

fn parse_all(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml")
}

/// Every Kubernetes object under deploy/, with the file it comes from.
fn objects() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files
        .into_iter()
        .filter(|f| !is_kustomization(f))
        .flat_map(|f| parse_all(&f).into_iter().map(move |o| (f.clone(), o)))
        .collect()
}

fn find<'a>(objects: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in deploy/"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn kustomizations_reference_every_manifest_exactly_once() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let mut referenced = BTreeSet::new();
    for k in files.iter().filter(|f| is_kustomization(f)) {
        let doc = &parse_all(k)[0];
        assert_eq!(
            doc["apiVersion"],
            "kustomize.config.k8s.io/v1beta1",
            "{}",
            k.display()
        );
        assert_eq!(doc["kind"], "Kustomization", "{}", k.display());
        let dir = k.parent().unwrap();
        for r in strings(&doc["resources"]) {
            let target = dir.join(r);
            if target.is_dir() {
                assert!(
                    target.join("kustomization.yaml").is_file(),
                    "{}: {r} has no kustomization.yaml",
                    k.display()
                );
            } else {
                assert!(
                    target.is_file(),
                    "{}: resource {r} does not exist",
                    k.display()
                );
                assert!(
                    referenced.insert(target.clone()),
                    "{} referenced twice",
                    target.display()
                );
            }
        }
    }
    let root = deploy_dir().join("kustomization.yaml");
    assert!(root.is_file(), "deploy/kustomization.yaml is missing");
    for f in files.iter().filter(|f| !is_kustomization(f)) {
        assert!(
            referenced.contains(f),
            "{} is not referenced by any kustomization",
            f.display()
        );
    }
    for sub in ["agent", "webhook", "bundle", "policy"] {
        assert!(
            deploy_dir().join(sub).join("kustomization.yaml").is_file(),
            "deploy/{sub} base missing"
        );
    }
}

#[test]
fn objects_have_required_fields_and_live_in_svidcar_system() {
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    ];
    let objects = objects();
    assert!(
        objects.len() >= 10,
        "expected the agent, webhook, bundle and policy objects"
    );
    for (file, o) in &objects {
        let at = file.display();
        assert!(
            o["apiVersion"].as_str().is_some_and(|s| !s.is_empty()),
            "{at}: apiVersion"
        );
        let kind = o["kind"].as_str().unwrap_or_else(|| panic!("{at}: kind"));
        assert!(
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{at}: metadata.name"
        );
        if !cluster_scoped.contains(&kind) {
            assert_eq!(
                o["metadata"]["namespace"], "svidcar-system",
                "{at}: {kind} namespace"
            );
        }
        if kind != "Namespace" {
            assert_eq!(
                o["metadata"]["labels"]["app.kubernetes.io/part-of"], "svidcar",
                "{at}: labels"
            );
        }
        if let Some(spec) = pss::pod_spec(o) {
            let selector = &o["spec"]["selector"]["matchLabels"];
            let labels = &o["spec"]["template"]["metadata"]["labels"];
            for (k, v) in selector
                .as_object()
                .unwrap_or_else(|| panic!("{at}: selector"))
            {
                assert_eq!(
                    &labels[k], v,
                    "{at}: selector must match the template labels"
                );
            }
            assert_eq!(
                o["spec"]["template"]["metadata"]["annotations"]["svidcar.io/inject"], "false",
                "{at}: svidcar's own pods are never injected"
            );
            for c in spec["containers"].as_array().unwrap() {
                let name = c["name"].as_str().unwrap();
                assert!(
                    c["image"].as_str().is_some_and(|s| !s.is_empty()),
                    "{at}: {name} image"
                );
                assert!(
                    c["resources"]["limits"]["memory"].is_string(),
                    "{at}: {name} memory limit"
                );
                assert!(
                    c["resources"]["requests"]["cpu"].is_string(),
                    "{at}: {name} cpu request"
                );
                assert_eq!(
                    c["securityContext"]["readOnlyRootFilesystem"], true,
                    "{at}: {name}"
                );
                assert!(
                    c["readinessProbe"].is_object() && c["livenessProbe"].is_object(),
                    "{at}: {name} probes"
                );
            }
        }
    }
}

#[test]
fn workloads_meet_the_restricted_profile_with_documented_exceptions() {
    let objects = objects();
    let webhook = find(&objects, "Deployment", "svidcar-webhook");
    let v = pss::violations(pss::pod_spec(webhook).unwrap(), &pss::Exceptions::default());
    assert!(v.is_empty(), "webhook: {v:?}");
    assert_eq!(
        webhook["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );

    let agent = find(&objects, "DaemonSet", "svidcar-agent");
    let spec = pss::pod_spec(agent).unwrap();
    // Without exceptions, exactly the documented ones show up…
    let v = pss::violations(spec, &pss::Exceptions::default());
    let expected = [
        "hostPID: true",
        "volume sockets: hostPath /run/svidcar/sockets not allowed",
        "volume state: hostPath /var/lib/svidcar/agent not allowed",
        "agent: runAsNonRoot must be true",
        "agent: runAsUser 0",
    ];
    assert_eq!(
        v, expected,
        "the agent's privileges changed: update the docs and this list"
    );
    // …and nothing else.
    let documented = pss::Exceptions {
        net_admin_containers: &[],
        root_containers: &["agent"],
        host_paths: &["/run/svidcar/sockets", "/var/lib/svidcar/agent"],
        host_pid: true,
    };
    assert!(pss::violations(spec, &documented).is_empty());
    let text = std::fs::read_to_string(deploy_dir().join("agent/daemonset.yaml")).unwrap();
    for why in [
        "# - hostPID:",
        "# - root (uid 0)",
        "# - hostPath /run/svidcar/sockets",
        "# - hostPath /var/lib/svidcar/agent",
    ] {
        assert!(
            text.contains(why),
            "agent/daemonset.yaml must document {why:?}"
        );
    }
    assert_eq!(
        spec["containers"][0]["securityContext"]["capabilities"]["add"],
        Value::Null
    );
    assert_eq!(
        spec["hostNetwork"],
        Value::Null,
        "the agent needs no host network"
    );
}

#[test]
fn agent_socket_matches_what_inject_mounts() {
    let objects = objects();
    let agent = find(&objects, "DaemonSet", "svidcar-agent");
    let spec = pss::pod_spec(agent).unwrap();
    let args = strings(&spec["containers"][0]["args"]);
    let socket = format!(
        "--socket={}/{}",
        svidcar_proxy::inject::DEFAULT_AGENT_SOCKET_DIR,
        svidcar_proxy::inject::SOCKET_FILE
    );
    assert!(
        args.contains(&socket.as_str()),
        "agent args {args:?} lack {socket}"
    );
    let vol = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "sockets")
        .unwrap();
    assert_eq!(
        vol["hostPath"]["path"],
        svidcar_proxy::inject::DEFAULT_AGENT_SOCKET_DIR
    );
    let sa = find(&objects, "ServiceAccount", "svidcar-agent");
    assert_eq!(
        sa["automountServiceAccountToken"], false,
        "token only where the DaemonSet opts in"
    );
    assert_eq!(
        spec["automountServiceAccountToken"], true,
        "the kubelet read needs the token"
    );
    assert_eq!(spec["serviceAccountName"], "svidcar-agent");
}

#[test]
fn rbac_is_read_only_and_limited_to_attestation() {
    let objects = objects();
    let role = find(&objects, "ClusterRole", "svidcar-agent");
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(strings(&rule["apiGroups"]), [""], "core API only");
        for verb in strings(&rule["verbs"]) {
            assert!(
                ["get", "list", "watch"].contains(&verb),
                "write verb {verb}"
            );
        }
        for res in strings(&rule["resources"]) {
            assert!(
                ["pods", "nodes", "nodes/proxy"].contains(&res),
                "unexpected resource {res}"
            );
        }
    }
    let binding = find(&objects, "ClusterRoleBinding", "svidcar-agent");
    assert_eq!(binding["roleRef"]["name"], "svidcar-agent");
    assert_eq!(binding["subjects"][0]["name"], "svidcar-agent");
    assert_eq!(binding["subjects"][0]["namespace"], "svidcar-system");
    assert_eq!(
        objects
            .iter()
            .filter(|(_, o)| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .count(),
        1
    );
}

#[test]
fn webhook_configuration_is_opt_in_fail_closed_and_wired_to_the_service() {
    let objects = objects();
    let config = find(&objects, "MutatingWebhookConfiguration", "svidcar-injector");
    let hooks = config["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(strings(&hook["admissionReviewVersions"]), ["v1"]);
    assert_eq!(
        hook["namespaceSelector"]["matchLabels"]["svidcar.io/injection"],
        "enabled"
    );
    assert_eq!(strings(&hook["rules"][0]["operations"]), ["CREATE"]);
    assert_eq!(strings(&hook["rules"][0]["resources"]), ["pods"]);
    let svc_ref = &hook["clientConfig"]["service"];
    let service = find(&objects, "Service", svc_ref["name"].as_str().unwrap());
    assert_eq!(svc_ref["namespace"], service["metadata"]["namespace"]);
    assert_eq!(svc_ref["path"], "/mutate");
    let port = &service["spec"]["ports"][0];
    assert_eq!(svc_ref["port"], port["port"]);
    let deploy = find(&objects, "Deployment", "svidcar-webhook");
    let spec = pss::pod_spec(deploy).unwrap();
    let container = &spec["containers"][0];
    assert_eq!(container["ports"][0]["name"], port["targetPort"]);
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&deploy["spec"]["template"]["metadata"]["labels"][k], v);
    }
    let args = strings(&container["args"]);
    assert_eq!(&args[..2], ["inject", "--webhook"]);
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    for flag in ["--tls-cert=", "--tls-key="] {
        let arg = args.iter().find(|a| a.starts_with(flag)).unwrap();
        assert!(
            arg[flag.len()..].starts_with(mount),
            "{arg} outside the TLS secret mount {mount}"
        );
    }
    assert!(args.contains(&"--listen=0.0.0.0:9443"));
    assert_eq!(container["ports"][0]["containerPort"], 9443);
}

#[test]
fn sample_policy_lints_clean() {
    let objects = objects();
    let cm = find(&objects, "ConfigMap", "svidcar-policy-sample");
    let policy = cm["data"]["policy.yaml"].as_str().unwrap();
    let dir = std::env::temp_dir().join(format!("svidcar-deploy-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_svidcar"))
        .args(["policy", "lint", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "sample policy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = find(&objects, "ConfigMap", "svidcar-trust-bundle");
    assert!(bundle["data"]["bundle.pem"].is_string());
}

#[test]
fn manifests_pass_strict_schema_validation() {
    let Some(tool) = pss::kubernetes_validate() else {
        return;
    };
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.retain(|f| !is_kustomization(f));
    pss::validate_schemas(&tool, &files);
    // The validator really rejects what is wrong (an unknown field), so a pass means something.
    let dir = std::env::temp_dir().join(format!("svidcar-deploy-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz: []\n",
    )
    .unwrap();
    let out = Command::new(&tool)
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted an unknown field"
    );
}

/// Every `--flag` in `args` is one that `svidcar <subcommand> --help` documents.
fn assert_flags_exist(args: &[&str], what: &str) {
    let sub = args[0];
    let out = Command::new(env!("CARGO_BIN_EXE_svidcar"))
        .args([sub, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "svidcar {sub} --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    for arg in &args[1..] {
        if let Some(flag) = arg.strip_prefix("--") {
            let flag = format!("--{}", flag.split('=').next().unwrap());
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{what}: `svidcar {sub}` has no {flag}"
            );
        }
    }
}

/// The manifests and the injected containers only use flags the binary has.
#[test]
fn container_arguments_match_the_cli() {
    let objects = objects();
    let agent = find(&objects, "DaemonSet", "svidcar-agent");
    let args = strings(&pss::pod_spec(agent).unwrap()["containers"][0]["args"]);
    assert_eq!(args[0], "agent");
    assert_flags_exist(&args, "agent DaemonSet");
    let webhook = find(&objects, "Deployment", "svidcar-webhook");
    let args = strings(&pss::pod_spec(webhook).unwrap()["containers"][0]["args"]);
    assert_flags_exist(&args, "webhook Deployment");

    let injected =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject-deployment.out.yaml");
    let docs = parse_all(&injected);
    let spec = pss::pod_spec(&docs[1]).unwrap();
    for c in spec["initContainers"].as_array().unwrap().iter().take(2) {
        let args = strings(&c["args"]);
        assert_flags_exist(&args, c["name"].as_str().unwrap());
    }
}
