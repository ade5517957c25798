//! Loading a policy set from one file or a directory (POLICY.md §1): files in lexicographic
//! name order, documents in order; strict validation; every error names file, line and field.
//! A set with any error is rejected whole, and so is a source that yields no `PolicySet` (an
//! empty or comment-only file, a directory without a policy file, a file cut short: see
//! [`super::complete`]); only an explicit `policies: []` is an empty set.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::complete;
use super::model::{
    Action, Defaults, Direction, OnPolicyChange, PathNormalization, Policy, PolicyDoc, API_VERSION,
};

/// Errors collected before loading gives up (a malformed file can yield endless errors).
const MAX_ISSUES: usize = 100;

/// One problem found while loading, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadIssue {
    /// The file (or directory) concerned.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The YAML path of the field, e.g. `policies[2].rules[0].from`.
    pub field: String,
    /// What is wrong, for operators.
    pub message: String,
}

impl fmt::Display for LoadIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A policy set that did not load; the previous set (if any) stays in force.
#[derive(Debug, Clone, thiserror::Error)]
pub struct PolicyLoadError {
    /// Every problem found (at least one).
    pub issues: Vec<LoadIssue>,
}

impl fmt::Display for PolicyLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy set rejected ({} error(s))", self.issues.len())?;
        for i in &self.issues {
            write!(f, "\n  {i}")?;
        }
        Ok(())
    }
}

/// A policy with where it came from.
#[derive(Debug, Clone)]
pub struct SourcedPolicy {
    /// The policy.
    pub policy: Policy,
    /// Its file.
    pub file: PathBuf,
    /// Its 1-based line, when known.
    pub line: Option<usize>,
}

/// Effective settings of a set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveSettings {
    /// Path normalization mode.
    pub path_normalization: PathNormalization,
    /// Escaped slashes in `base` / `merge-slashes` paths.
    pub escaped_slashes: super::model::EscapedSlashes,
    /// Policy-change behavior for open non-HTTP connections.
    pub on_policy_change: OnPolicyChange,
}

/// The parsed, validated content of the files, in canonical order.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Policies in canonical order (file name, then position).
    pub policies: Vec<SourcedPolicy>,
    /// Explicit defaults.
    pub defaults: Defaults,
    /// Settings with defaults applied.
    pub settings: EffectiveSettings,
    /// Files read.
    pub files: Vec<PathBuf>,
    /// Limits in canonical order.
    pub limits: Vec<super::limits::SourcedLimit>,
}

fn io_issue(file: &Path, e: std::io::Error) -> PolicyLoadError {
    PolicyLoadError {
        issues: vec![LoadIssue {
            file: file.to_path_buf(),
            line: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        }],
    }
}

/// The policy files of `path`: the file itself, or the `*.yaml`/`*.yml` files of a directory
/// (not hidden, not recursive) in lexicographic file-name order.
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyLoadError> {
    let meta = std::fs::metadata(path).map_err(|e| io_issue(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| io_issue(path, e))? {
        let entry = entry.map_err(|e| io_issue(path, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        if entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Loads and validates `path` (a file or a directory); see [`complete::disk_issues`] for what
/// is refused besides what [`load_texts`] rejects.
pub fn load_path(path: &Path) -> Result<Loaded, PolicyLoadError> {
    let mut texts = Vec::new();
    for f in policy_files(path)? {
        let text = std::fs::read_to_string(&f).map_err(|e| io_issue(&f, e))?;
        texts.push((f, text));
    }
    let mut issues = complete::disk_issues(path, &texts);
    match load_texts(&texts) {
        Ok(loaded) if issues.is_empty() => Ok(loaded),
        Ok(_) => Err(PolicyLoadError { issues }),
        Err(mut e) => {
            issues.append(&mut e.issues);
            Err(PolicyLoadError { issues })
        }
    }
}

/// Loads and validates in-memory files `(name, text)` given in canonical order.
pub fn load_texts(files: &[(PathBuf, String)]) -> Result<Loaded, PolicyLoadError> {
    let mut issues = Vec::new();
    let mut out = Loaded {
        files: files.iter().map(|f| f.0.clone()).collect(),
        ..Loaded::default()
    };
    let mut agree = Agreement::default();
    let mut names: HashMap<String, PathBuf> = HashMap::new();
    let mut limit_names: HashMap<String, PathBuf> = HashMap::new();
    for (file, text) in files {
        let issue = |line: Option<usize>, field: String, message: String| LoadIssue {
            file: file.clone(),
            line,
            field,
            message,
        };
        let (documents, gaps) = complete::check_text(text);
        if documents == Some(0) {
            issues.push(issue(None, String::new(), complete::NO_DOCUMENT.into()));
        }
        for g in gaps {
            let line = Locator::new(text, g.doc).key_line(g.policy, &g.key);
            issues.push(issue(line, g.field, g.message));
        }
        let mut last_error = String::new();
        for (doc_index, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            // serde_yaml_ng panics on some malformed input (e.g. an undefined alias in a flow
            // sequence: `ports: [*x]`, found by fuzz/policy_yaml); contain it as a load error.
            let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Option::<PolicyDoc>::deserialize(de)
            }));
            let Ok(parsed) = parsed else {
                issues.push(issue(
                    None,
                    "yaml".into(),
                    "the YAML parser failed on this document (an undefined alias `*name`?)".into(),
                ));
                break;
            };
            let doc = match parsed {
                Ok(Some(doc)) => doc,
                Ok(None) => continue,
                Err(e) => {
                    // After a YAML syntax error serde_yaml_ng yields the same error forever
                    // (found by fuzz/policy_yaml: unbounded memory): stop at the repeat.
                    let text = e.to_string();
                    if text == last_error || issues.len() >= MAX_ISSUES {
                        break;
                    }
                    let (field, message) = split_serde_error(&text);
                    last_error = text;
                    issues.push(issue(e.location().map(|l| l.line()), field, message));
                    continue;
                }
            };
            let loc = Locator::new(text, doc_index);
            if doc.api_version != API_VERSION {
                issues.push(issue(
                    loc.key_line(None, "apiVersion"),
                    "apiVersion".into(),
                    format!("must be {API_VERSION:?}, got {:?}", doc.api_version),
                ));
            }
            if doc.kind != "PolicySet" {
                issues.push(issue(
                    loc.key_line(None, "kind"),
                    "kind".into(),
                    format!("must be \"PolicySet\", got {:?}", doc.kind),
                ));
            }
            let mut agree_one = |key: &str, value: Option<String>| {
                if let Some(v) = value {
                    if let Some(m) = agree.check(key, v, file) {
                        issues.push(issue(
                            loc.key_line(None, key.rsplit('.').next().unwrap_or(key)),
                            key.into(),
                            m,
                        ));
                    }
                }
            };
            agree_one(
                "defaults.inbound",
                doc.defaults
                    .inbound
                    .map(|v| format!("{v:?}").to_lowercase()),
            );
            agree_one(
                "defaults.egress",
                doc.defaults.egress.map(|v| format!("{v:?}").to_lowercase()),
            );
            agree_one(
                "settings.pathNormalization",
                doc.settings.path_normalization.map(|v| format!("{v:?}")),
            );
            agree_one(
                "settings.escapedSlashes",
                doc.settings.escaped_slashes.map(|v| format!("{v:?}")),
            );
            agree_one(
                "settings.onPolicyChange",
                doc.settings.on_policy_change.map(|v| format!("{v:?}")),
            );
            out.defaults.inbound = out.defaults.inbound.or(doc.defaults.inbound);
            out.defaults.egress = out.defaults.egress.or(doc.defaults.egress);
            if let Some(p) = doc.settings.path_normalization {
                out.settings.path_normalization = p;
            }
            if let Some(p) = doc.settings.escaped_slashes {
                out.settings.escaped_slashes = p;
            }
            if let Some(p) = doc.settings.on_policy_change {
                out.settings.on_policy_change = p;
            }
            for (i, policy) in doc.policies.into_iter().enumerate() {
                let line = loc.item_line(i);
                let at = |key: &str| loc.key_line(Some(i), key).or(line);
                let base = format!("policies[{i}]");
                for (field, message) in validate_policy(&policy) {
                    let key = field.split(['.', '[']).next_back().unwrap_or("");
                    let key_line = at(key);
                    issues.push(issue(key_line, format!("{base}.{field}"), message));
                }
                if let Some(first) = names.get(&policy.name) {
                    issues.push(issue(
                        line,
                        format!("{base}.name"),
                        format!(
                            "duplicate policy name {:?} (first defined in {})",
                            policy.name,
                            first.display()
                        ),
                    ));
                } else {
                    names.insert(policy.name.clone(), file.clone());
                }
                out.policies.push(SourcedPolicy {
                    policy,
                    file: file.clone(),
                    line,
                });
            }
            for (i, limit) in doc.limits.into_iter().enumerate() {
                if let Some(first) = limit_names.get(&limit.name) {
                    issues.push(issue(
                        loc.key_line(None, "limits"),
                        format!("limits[{i}].name"),
                        format!(
                            "duplicate limit name {:?} (first defined in {})",
                            limit.name,
                            first.display()
                        ),
                    ));
                } else {
                    limit_names.insert(limit.name.clone(), file.clone());
                }
                out.limits.push(super::limits::SourcedLimit {
                    limit,
                    file: file.clone(),
                });
            }
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(PolicyLoadError { issues })
    }
}

/// Cross-field checks serde cannot express. Returns `(field, message)` pairs.
fn validate_policy(p: &Policy) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let name_ok = !p.name.is_empty()
        && p.name.len() <= 253
        && p.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !name_ok {
        errs.push((
            "name".into(),
            format!(
                "policy name {:?} must be 1-253 characters of [A-Za-z0-9._-]",
                p.name
            ),
        ));
    }
    if p.action == Action::Audit && p.dry_run == Some(true) {
        errs.push((
            "dryRun".into(),
            "`dryRun` is not allowed on an `audit` policy (audit never enforces)".into(),
        ));
    }
    for (j, rule) in p.rules.iter().flatten().enumerate() {
        if p.direction == Direction::Egress && rule.from.is_some() {
            errs.push((
                format!("rules[{j}].from"),
                "`from` is not allowed in egress rules (the source is this workload)".into(),
            ));
        }
        for (k, to) in rule.to.iter().flatten().enumerate() {
            let present = |name: &'static str, set: bool| set.then_some(name);
            let wrong: Vec<&str> = if p.direction == Direction::Inbound {
                [
                    present("cidrs", to.cidrs.is_some()),
                    present("notCidrs", to.not_cidrs.is_some()),
                    present("spiffeIds", to.spiffe_ids.is_some()),
                    present("notSpiffeIds", to.not_spiffe_ids.is_some()),
                ]
                .into_iter()
                .flatten()
                .collect()
            } else {
                [
                    present("notMethods", to.not_methods.is_some()),
                    present("notPaths", to.not_paths.is_some()),
                ]
                .into_iter()
                .flatten()
                .collect()
            };
            for w in wrong {
                let dir = if p.direction == Direction::Inbound {
                    "inbound"
                } else {
                    "egress"
                };
                errs.push((
                    format!("rules[{j}].to[{k}].{w}"),
                    format!("`{w}` is not a field of {dir} `to` entries"),
                ));
            }
        }
    }
    errs
}

/// Splits serde_yaml's `path: message at line L column C` into `(path, message)`.
fn split_serde_error(s: &str) -> (String, String) {
    let s = match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => s,
    };
    match s.split_once(": ") {
        Some((path, msg)) if !path.contains(' ') => (path.to_string(), msg.to_string()),
        _ => (String::new(), s.to_string()),
    }
}

/// Tracks `defaults`/`settings` keys across files: they must agree.
#[derive(Default)]
struct Agreement {
    seen: HashMap<String, (String, PathBuf)>,
}

impl Agreement {
    fn check(&mut self, key: &str, value: String, file: &Path) -> Option<String> {
        match self.seen.get(key) {
            Some((v, f)) if *v != value => Some(format!(
                "{key} is {value} here but {v} in {}; files must agree",
                f.display()
            )),
            Some(_) => None,
            None => {
                self.seen
                    .insert(key.to_string(), (value, file.to_path_buf()));
                None
            }
        }
    }
}

/// Best-effort line lookup in block-style YAML for semantic errors (serde positions cover the
/// syntactic ones).
struct Locator<'a> {
    lines: Vec<(usize, &'a str)>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str, doc_index: usize) -> Self {
        let mut docs: Vec<Vec<(usize, &'a str)>> = vec![Vec::new()];
        for (n, l) in text.lines().enumerate() {
            if l.starts_with("---") {
                docs.push(Vec::new());
            } else if let Some(d) = docs.last_mut() {
                d.push((n + 1, l));
            }
        }
        let has_content = |d: &Vec<(usize, &str)>| {
            d.iter()
                .any(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        };
        let lines = docs
            .into_iter()
            .filter(has_content)
            .nth(doc_index)
            .unwrap_or_default();
        Self { lines }
    }

    /// Index in `lines` of the i-th item of the top-level `policies` sequence.
    fn item_index(&self, i: usize) -> Option<usize> {
        let start = self
            .lines
            .iter()
            .position(|(_, l)| l.starts_with("policies:"))?;
        let mut indent = None;
        let mut count = 0;
        for (idx, (_, l)) in self.lines.iter().enumerate().skip(start + 1) {
            let trimmed = l.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let ind = l.len() - trimmed.len();
            if ind == 0 && !trimmed.starts_with('-') {
                break;
            }
            if trimmed.starts_with("- ") || trimmed == "-" {
                let want = *indent.get_or_insert(ind);
                if ind == want {
                    if count == i {
                        return Some(idx);
                    }
                    count += 1;
                }
            }
        }
        None
    }

    fn item_line(&self, i: usize) -> Option<usize> {
        self.item_index(i).map(|idx| self.lines[idx].0)
    }

    /// Line of `key:` inside policy `item` (or anywhere in the document).
    fn key_line(&self, item: Option<usize>, key: &str) -> Option<usize> {
        let (from, to) = match item {
            Some(i) => {
                let s = self.item_index(i)?;
                let e = self.item_index(i + 1).unwrap_or(self.lines.len());
                (s, e)
            }
            None => (0, self.lines.len()),
        };
        let needle = format!("{key}:");
        self.lines[from..to]
            .iter()
            .find(|(_, l)| {
                let t = l.trim_start().trim_start_matches("- ");
                t.starts_with(&needle)
                    || t.contains(&format!("{{ {needle}"))
                    || t.contains(&format!("{{{needle}"))
            })
            .map(|(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (fuzz/policy_yaml): serde_yaml_ng panicked on an undefined alias inside a
    /// flow sequence; the loader reports it instead.
    #[test]
    fn an_undefined_alias_is_an_error_not_a_panic() {
        let text = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: a\n  direction: inbound\n  action: allow\n  rules: [{to: [{ports: [*x]}]}]\n";
        let err = load_texts(&[(PathBuf::from("alias.yaml"), text.to_string())])
            .expect_err("an undefined alias is an error");
        assert!(err.to_string().contains("undefined alias"), "{err}");
    }

    /// Regression (fuzz/policy_yaml): a YAML syntax error used to make the loader collect the
    /// same error forever until memory ran out.
    #[test]
    fn a_yaml_syntax_error_is_reported_once_and_loading_ends() {
        let text = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: a\n  rules: [{from: [x]}]}]\n";
        let err = load_texts(&[(PathBuf::from("bad.yaml"), text.to_string())])
            .expect_err("a syntax error is an error");
        let syntax = err
            .issues
            .iter()
            .filter(|i| i.message.contains("did not find expected key"))
            .count();
        assert_eq!(syntax, 1, "{err}");
        assert!(err.issues.len() <= 2, "{err}");
    }
}
