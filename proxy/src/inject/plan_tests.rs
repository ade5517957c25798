//! Edge cases of [`super::plan`] (the common paths are covered by the golden files in tests/).

use serde_json::json;

use super::{plan, Plan};
use crate::inject::{InjectConfig, InjectError};

fn pod(spec: serde_json::Value, annotations: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "annotations": annotations}, "spec": spec})
}

#[test]
fn other_kinds_are_skipped() {
    let svc = json!({"kind": "Service", "metadata": {"name": "s"}, "spec": {}});
    assert!(matches!(
        plan(&svc, "Service", &InjectConfig::default()),
        Ok(Plan::Skip(_))
    ));
}

#[test]
fn null_lists_are_created_whole() {
    let p = pod(
        json!({"containers": [{"name": "a", "image": "a"}], "initContainers": null, "volumes": null}),
        json!({}),
    );
    let Ok(Plan::Patch(ops)) = plan(&p, "Pod", &InjectConfig::default()) else {
        panic!("expected a patch")
    };
    let paths: Vec<&str> = ops.iter().map(|o| o.path.as_str()).collect();
    assert_eq!(paths, ["/spec/initContainers", "/spec/volumes"]);
}

#[test]
fn pod_template_annotation_wins_over_the_workload() {
    let d = json!({"kind": "Deployment", "metadata": {"name": "d",
        "annotations": {"svidcar.io/inject": "false"}},
        "spec": {"template": {"metadata": {"annotations": {"svidcar.io/inject": "true"}},
                              "spec": {"containers": [{"name": "a", "image": "a"}]}}}});
    assert!(matches!(
        plan(&d, "Deployment", &InjectConfig::default()),
        Ok(Plan::Patch(_))
    ));
}

#[test]
fn conflicting_volume_and_missing_spec_are_errors() {
    let p = pod(
        json!({"containers": [{"name": "a", "image": "a"}],
               "volumes": [{"name": "svidcar-agent-socket", "emptyDir": {}}]}),
        json!({}),
    );
    let err = plan(&p, "Pod", &InjectConfig::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("svidcar-agent-socket already exists"),
        "{err}"
    );
    let empty = json!({"kind": "Job", "metadata": {"name": "j"}, "spec": {}});
    assert!(matches!(
        plan(&empty, "Job", &InjectConfig::default()),
        Err(InjectError::Malformed { .. })
    ));
}

#[test]
fn bad_image_annotation_is_refused() {
    let p = pod(
        json!({"containers": [{"name": "a", "image": "a"}]}),
        json!({"svidcar.io/proxy-image": "two words"}),
    );
    let err = plan(&p, "Pod", &InjectConfig::default()).unwrap_err();
    assert!(err.to_string().contains("svidcar.io/proxy-image"), "{err}");
}

#[test]
fn a_policy_configmap_is_mounted_read_only_and_passed_as_policy() {
    let p = pod(
        json!({"containers": [{"name": "a", "image": "a"}], "volumes": [{"name": "data", "emptyDir": {}}]}),
        json!({"svidcar.io/policy-configmap": "shop-policy"}),
    );
    let Ok(Plan::Patch(ops)) = plan(&p, "Pod", &InjectConfig::default()) else {
        panic!("expected a patch")
    };
    let proxy = &ops[0].value[1];
    assert_eq!(proxy["name"], "svidcar-proxy");
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args[args.len() - 2..], ["--policy", "/etc/svidcar/policy"]);
    let mount = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "svidcar-policy")
        .expect("policy mount");
    assert_eq!(mount["mountPath"], "/etc/svidcar/policy");
    assert_eq!(mount["readOnly"], true);
    let volume = ops
        .iter()
        .map(|o| &o.value)
        .find(|v| v["name"] == "svidcar-policy")
        .expect("policy volume appended");
    assert_eq!(volume["configMap"]["name"], "shop-policy");
    assert_eq!(volume["configMap"]["optional"], false);

    // Without the annotation: no policy flag, no policy volume.
    let plain = pod(
        json!({"containers": [{"name": "a", "image": "a"}]}),
        json!({}),
    );
    let Ok(Plan::Patch(ops)) = plan(&plain, "Pod", &InjectConfig::default()) else {
        panic!("expected a patch")
    };
    let text = serde_json::to_string(&ops).unwrap();
    assert!(
        !text.contains("svidcar-policy") && !text.contains("--policy"),
        "{text}"
    );
}

#[test]
fn a_bad_policy_configmap_name_is_refused() {
    for bad in ["Shop", "-x", "x-", "a b", "a/b", ""] {
        let p = pod(
            json!({"containers": [{"name": "a", "image": "a"}]}),
            json!({"svidcar.io/policy-configmap": bad}),
        );
        let err = plan(&p, "Pod", &InjectConfig::default()).unwrap_err();
        assert!(
            matches!(err, InjectError::BadAnnotation { .. })
                && err.to_string().contains("svidcar.io/policy-configmap"),
            "{bad:?}: {err}"
        );
    }
}
