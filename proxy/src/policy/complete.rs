//! A policy path that is given must yield a `PolicySet` (POLICY.md §9): an empty or
//! comment-only file, a directory with no policy file, or a file cut short is an error, never an
//! empty set that allows everything (a truncating editor or a ConfigMap swap must not open the
//! mesh for a second). Only an explicit `policies: []` is an empty set.
//!
//! Cut short is recognized by what a prefix of a valid file looks like: no document at all, a
//! last line without its newline (cut inside a line), a key without a value (`rules:` cut after
//! the colon), or a file none of whose documents lists `policies` (cut after the header). A cut exactly between two complete list items
//! cannot be told from a shorter file; the reload watcher's errors and `policy check` on the new
//! file are the operator's guard there.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::load::LoadIssue;

/// One problem found in a file's raw YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Gap {
    /// Index of the document in the file (as enumerated by the YAML deserializer).
    pub doc: usize,
    /// Index in `policies` when the problem is inside a policy.
    pub policy: Option<usize>,
    /// The key whose line to report.
    pub key: String,
    /// The YAML path, e.g. `policies[0].rules`.
    pub field: String,
    /// What is wrong, for operators.
    pub message: String,
}

/// The message for a file without any document.
pub(super) const NO_DOCUMENT: &str = "no PolicySet document: the file is empty or holds only comments (cut short while being written?); write `policies: []` for an explicitly empty set";

/// The message for a directory without a policy file.
const NO_FILE: &str = "no policy file (*.yaml, *.yml) in the directory; write a file with `policies: []` for an explicitly empty set";

/// The message for a file on disk whose last line has no newline.
const NO_NEWLINE: &str = "the file does not end with a newline (cut short while being written?); end the last line with a newline";

/// What is wrong with a source on disk before its texts are parsed: a directory without a
/// policy file (`texts` empty), a file whose last line has no newline (cut inside a line).
pub(super) fn disk_issues(path: &Path, texts: &[(PathBuf, String)]) -> Vec<LoadIssue> {
    let issue = |file: &Path, line, message: &str| LoadIssue {
        file: file.to_path_buf(),
        line,
        field: String::new(),
        message: message.into(),
    };
    if texts.is_empty() {
        return vec![issue(path, None, NO_FILE)];
    }
    texts
        .iter()
        .filter(|(_, t)| !t.is_empty() && !t.ends_with('\n'))
        .map(|(f, t)| issue(f, Some(t.lines().count()), NO_NEWLINE))
        .collect()
}

/// Checks every document of `text`: returns how many non-empty documents it holds (`None` when
/// the YAML does not parse; the loader reports that) and the gaps found.
pub(super) fn check_text(text: &str) -> (Option<usize>, Vec<Gap>) {
    let mut gaps = Vec::new();
    let mut docs = 0;
    let mut listed = false;
    for (doc, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        // serde_yaml_ng panics on some malformed input; the loader reports it.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Option::<Value>::deserialize(de)
        }));
        let value = match parsed {
            Ok(Ok(Some(v))) => v,
            Ok(Ok(None)) => continue,
            Ok(Err(_)) | Err(_) => return (None, gaps),
        };
        if matches!(value, Value::Null) {
            continue;
        }
        docs += 1;
        let Value::Mapping(map) = &value else {
            continue; // not a PolicySet: the loader says so
        };
        listed |= map.contains_key("policies");
        nulls(&value, doc, None, "", &mut gaps);
    }
    if docs > 0 && !listed {
        gaps.push(Gap {
            doc: 0,
            policy: None,
            key: "kind".into(),
            field: "policies".into(),
            message: "missing: no document of the file lists `policies` (cut short while being written?); write `policies: []` for a file that only sets defaults or settings".into(),
        });
    }
    (Some(docs), gaps)
}

/// Every mapping key with a null value (`key:` and nothing after it) under `v`.
fn nulls(v: &Value, doc: usize, policy: Option<usize>, path: &str, gaps: &mut Vec<Gap>) {
    match v {
        Value::Mapping(map) => {
            for (k, val) in map {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if matches!(val, Value::Null) {
                    gaps.push(Gap {
                        doc,
                        policy,
                        key: key.clone(),
                        field: field.clone(),
                        message: "has no value (cut short while being written?); give a value or remove the key".into(),
                    });
                    continue;
                }
                if path.is_empty() && key == "policies" {
                    if let Value::Sequence(items) = val {
                        for (i, item) in items.iter().enumerate() {
                            nulls(item, doc, Some(i), &format!("policies[{i}]"), gaps);
                        }
                        continue;
                    }
                }
                nulls(val, doc, policy, &field, gaps);
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                nulls(item, doc, policy, &format!("{path}[{i}]"), gaps);
            }
        }
        Value::Tagged(t) => nulls(&t.value, doc, policy, path, gaps),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\n";

    #[test]
    fn empty_comment_only_and_separator_only_files_hold_no_document() {
        for text in [
            "",
            "\n\n",
            "# nothing here\n# at all\n",
            "---\n",
            "---\n# c\n---\n",
        ] {
            assert_eq!(check_text(text), (Some(0), vec![]), "{text:?}");
        }
    }

    #[test]
    fn explicit_empty_set_is_complete() {
        let text = format!("{HEAD}policies: []\n");
        assert_eq!(check_text(&text), (Some(1), vec![]));
    }

    #[test]
    fn missing_policies_and_keys_without_values() {
        let (docs, gaps) = check_text(&format!("{HEAD}defaults:\n  egress: deny\n"));
        assert_eq!(docs, Some(1));
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].field, "policies");
        // One listing document is enough (a second one may hold only defaults).
        let two = format!("{HEAD}defaults: {{egress: deny}}\n---\n{HEAD}policies: []\n");
        assert_eq!(check_text(&two), (Some(2), vec![]));
        let (_, gaps) = check_text(&format!("{HEAD}policies:\n"));
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].field, "policies");
        assert!(gaps[0].message.contains("no value"));
        let text =
            format!("{HEAD}policies:\n- name: a\n  direction: egress\n  action: deny\n  rules:\n");
        let (_, gaps) = check_text(&text);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].field, "policies[0].rules");
        assert_eq!(gaps[0].policy, Some(0));
        let text = format!("{HEAD}policies:\n- name: a\n  direction: egress\n  action: deny\n  rules:\n  - to:\n    - hosts:\n");
        let (_, gaps) = check_text(&text);
        assert_eq!(gaps[0].field, "policies[0].rules[0].to[0].hosts");
    }

    #[test]
    fn a_syntax_error_is_left_to_the_loader() {
        assert_eq!(check_text("a: [b\n").0, None);
    }
}
