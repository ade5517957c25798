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
