//! Rewriting multi-document Kubernetes YAML: every document is planned with [`super::plan`];
//! injected documents are re-serialized with the patch applied, all others are copied through
//! byte for byte (comments and formatting kept). `kind: List` items are injected one by one.

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use super::{plan, InjectConfig, InjectError, PatchOp, Plan};

/// What happened to one document (for the operator's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentOutcome {
    /// 1-based document number in the input.
    pub index: usize,
    /// `Kind/name` of the object (or `-` for an empty document).
    pub object: String,
    /// `None` when injected, else why it was left unchanged.
    pub skipped: Option<String>,
}

/// Splits a YAML stream into documents at `---` lines; `...` end markers are dropped.
fn split_documents(input: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            docs.push(String::new());
            let rest = bare[3..].trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                if let Some(doc) = docs.last_mut() {
                    doc.push_str(rest);
                    doc.push('\n');
                }
            }
        } else if bare == "..." {
            continue;
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
        }
    }
    docs.retain(|d| !d.trim().is_empty());
    docs
}

fn yaml_err(index: usize, e: impl std::fmt::Display) -> InjectError {
    InjectError::Yaml {
        index,
        message: e.to_string(),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// JSON to YAML for the added objects, `name` first (as people write manifests), then the other
/// keys in alphabetical order.
fn to_yaml(value: &Json) -> Yaml {
    match value {
        Json::Null => Yaml::Null,
        Json::Bool(b) => Yaml::Bool(*b),
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Yaml::Number(u.into()),
            (None, Some(i), _) => Yaml::Number(i.into()),
            (None, None, Some(f)) => Yaml::Number(f.into()),
            _ => Yaml::Null,
        },
        Json::String(s) => Yaml::String(s.clone()),
        Json::Array(items) => Yaml::Sequence(items.iter().map(to_yaml).collect()),
        Json::Object(map) => {
            let mut out = serde_yaml_ng::Mapping::new();
            let name = map.get_key_value("name");
            for (k, v) in name
                .into_iter()
                .chain(map.iter().filter(|(k, _)| *k != "name"))
            {
                out.insert(Yaml::String(k.clone()), to_yaml(v));
            }
            Yaml::Mapping(out)
        }
    }
}

/// Applies one `add` operation to a YAML value (keys keep their order; new keys go last).
fn apply_add(root: &mut Yaml, op: &PatchOp) -> Result<(), String> {
    let value = to_yaml(&op.value);
    let tokens: Vec<String> = op.path.split('/').skip(1).map(unescape).collect();
    let Some((last, parents)) = tokens.split_last() else {
        return Err(format!("cannot add at the document root ({})", op.path));
    };
    let mut node = root;
    for token in parents {
        node = match node {
            Yaml::Mapping(map) => map.get_mut(token.as_str()),
            Yaml::Sequence(seq) => token.parse::<usize>().ok().and_then(|i| seq.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path {} does not exist", op.path))?;
    }
    match node {
        Yaml::Mapping(map) => {
            map.insert(Yaml::String(last.clone()), value);
        }
        Yaml::Sequence(seq) if last == "-" => seq.push(value),
        Yaml::Sequence(seq) => match last.parse::<usize>() {
            Ok(i) if i <= seq.len() => seq.insert(i, value),
            _ => return Err(format!("bad index in {}", op.path)),
        },
        _ => return Err(format!("parent of {} is not a mapping or list", op.path)),
    }
    Ok(())
}

fn describe(object: &Json) -> String {
    let kind = object.get("kind").and_then(Json::as_str).unwrap_or("-");
    let name = object
        .pointer("/metadata/name")
        .or_else(|| object.pointer("/metadata/generateName"))
        .and_then(Json::as_str)
        .unwrap_or("-");
    format!("{kind}/{name}")
}

/// Plans one object, or every item of a `List`, with paths relative to the document.
fn plan_document(object: &Json, config: &InjectConfig) -> Result<Plan, InjectError> {
    let kind = object.get("kind").and_then(Json::as_str).unwrap_or("");
    if kind != "List" {
        return plan(object, kind, config);
    }
    let mut ops = Vec::new();
    let mut reasons = Vec::new();
    let items = object.get("items").and_then(Json::as_array);
    for (i, item) in items.into_iter().flatten().enumerate() {
        let item_kind = item.get("kind").and_then(Json::as_str).unwrap_or("");
        match plan(item, item_kind, config)? {
            Plan::Patch(item_ops) => ops.extend(item_ops.into_iter().map(|mut op| {
                op.path = format!("/items/{i}{}", op.path);
                op
            })),
            Plan::Skip(reason) => reasons.push(format!("{}: {reason}", describe(item))),
        }
    }
    if ops.is_empty() {
        Ok(Plan::Skip(format!(
            "List with nothing to inject ({})",
            reasons.join("; ")
        )))
    } else {
        Ok(Plan::Patch(ops))
    }
}

/// Injects every document of a YAML stream. Documents are separated by `---` in the output.
pub fn inject_yaml(
    input: &str,
    config: &InjectConfig,
) -> Result<(String, Vec<DocumentOutcome>), InjectError> {
    let mut out = String::new();
    let mut outcomes = Vec::new();
    for (i, text) in split_documents(input).iter().enumerate() {
        let index = i + 1;
        if i > 0 {
            out.push_str("---\n");
        }
        let mut doc: Yaml = serde_yaml_ng::from_str(text).map_err(|e| yaml_err(index, e))?;
        if doc.is_null() {
            out.push_str(text);
            continue;
        }
        let object: Json = serde_json::to_value(&doc).map_err(|e| yaml_err(index, e))?;
        let object_name = describe(&object);
        match plan_document(&object, config)? {
            Plan::Skip(reason) => {
                out.push_str(text);
                if !text.ends_with('\n') {
                    out.push('\n');
                }
                outcomes.push(DocumentOutcome {
                    index,
                    object: object_name,
                    skipped: Some(reason),
                });
            }
            Plan::Patch(ops) => {
                for op in &ops {
                    apply_add(&mut doc, op).map_err(|e| yaml_err(index, e))?;
                }
                out.push_str(&serde_yaml_ng::to_string(&doc).map_err(|e| yaml_err(index, e))?);
                outcomes.push(DocumentOutcome {
                    index,
                    object: object_name,
                    skipped: None,
                });
            }
        }
    }
    Ok((out, outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_separators_only() {
        let docs = split_documents("---\na: 1\n---\n# c\nb: \"---\"\n...\n--- # x\nc: 3\n");
        assert_eq!(docs, vec!["a: 1\n", "# c\nb: \"---\"\n", "c: 3\n"]);
    }

    #[test]
    fn add_inserts_in_lists_and_maps() {
        let mut doc: Yaml = serde_yaml_ng::from_str("s:\n  l: [1, 2]\n").unwrap();
        let op = |path: &str, v: Json| PatchOp {
            op: "add",
            path: path.to_string(),
            value: v,
        };
        apply_add(&mut doc, &op("/s/l/0", Json::from(0))).unwrap();
        apply_add(&mut doc, &op("/s/l/-", Json::from(3))).unwrap();
        apply_add(&mut doc, &op("/s/a~1b", Json::from("x"))).unwrap();
        assert_eq!(
            serde_yaml_ng::to_string(&doc).unwrap(),
            "s:\n  l:\n  - 0\n  - 1\n  - 2\n  - 3\n  a/b: x\n"
        );
        assert!(apply_add(&mut doc, &op("/nope/x", Json::Null)).is_err());
        assert!(apply_add(&mut doc, &op("/s/l/9", Json::Null)).is_err());
    }
}
