//! "Why": for `svidcar policy check`, each rule of the direction with matched / not matched and
//! the first section that did not match.

use super::compile::{dir_index, CompiledPolicy};
use super::eval::{match_rule, Ctx, Miss};
use super::model::{Action, Direction};
use super::normalize::PathError;
use super::request::{Decision, Reason, Request};

/// One rule's outcome for one evaluation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleCheck {
    /// Rule id.
    pub id: String,
    /// Egress with several names: the name this line is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether it matched.
    pub matched: bool,
    /// `"matched"` or the first section that did not match, and why.
    pub reason: String,
}

/// A decision with the per-rule detail.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The decision, exactly as [`CompiledPolicy::decide`] returns it.
    pub decision: Decision,
    /// Every rule of the direction (including policies whose selector does not match).
    pub rules: Vec<RuleCheck>,
}

fn describe(m: Miss, entries: usize) -> String {
    // A miss on a `notX` field means the attribute matched an excluded value.
    let what = |field: &str| {
        if field == "notValues" || field.starts_with("not") && field.len() > 3 {
            format!("{field}: an excluded value matched")
        } else if field == "authenticated" {
            "authenticated: did not match".to_string()
        } else {
            format!("{field}: did not match (or the attribute is absent)")
        }
    };
    match m.section {
        "http" => "HTTP-only field on non-HTTP traffic: an allow rule cannot match".into(),
        "when" => format!("when[{}] {}", m.index, what(m.field)),
        s if m.field.is_empty() => format!("{s}: no entry"),
        s if entries > 1 => format!("{s}: no entry matched (first: {s}[0].{})", what(m.field)),
        s => format!("{s}[0].{}", what(m.field)),
    }
}

impl Explanation {
    /// A request refused by path normalization, as the proxy answers it (`400`, no rule
    /// evaluated): `DENY by normalize:<reason>`, no rule lines.
    pub fn refused(e: &PathError) -> Self {
        Self::refused_for(e.reason())
    }

    /// A request refused before any rule was evaluated, with the proxy's reason label (e.g.
    /// `authority:invalid` for a `Host` the proxy answers `400`): `DENY by <reason>`.
    pub fn refused_for(reason: &'static str) -> Self {
        Self {
            decision: Decision {
                allow: false,
                reason: Reason::Refused(reason),
                shadow: None,
                audit: Vec::new(),
            },
            rules: Vec::new(),
        }
    }
}

impl CompiledPolicy {
    /// Decides `req` and explains every rule of its direction.
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        let decision = self.decide(req);
        let names: Vec<Option<&str>> = match req.direction {
            Direction::Inbound => vec![None],
            Direction::Egress => {
                let n: Vec<Option<&str>> =
                    req.egress_names().into_iter().flatten().map(Some).collect();
                if n.is_empty() {
                    vec![None]
                } else {
                    n
                }
            }
        };
        let multi = names.len() > 1;
        let mut rules = Vec::new();
        let d = dir_index(req.direction);
        for name in names {
            let c = Ctx::new(req, name);
            let mut ord = 0usize;
            for p in self.summary.iter() {
                if dir_index(p.direction) != d {
                    if p.selected {
                        ord += p.rules.len();
                    }
                    continue;
                }
                for id in &p.rules {
                    let (matched, reason) = if !p.selected {
                        (false, "selector does not match the local ID".to_string())
                    } else {
                        let rule = &self.rules[ord];
                        ord += 1;
                        let allow = p.action == Action::Allow;
                        match match_rule(rule, &c, allow) {
                            Ok(()) => (true, "matched".to_string()),
                            Err(m) => {
                                let n = match m.section {
                                    "from" => rule.from.as_ref().map_or(0, Vec::len),
                                    "to" => rule.to.as_ref().map_or(0, Vec::len),
                                    _ => 0,
                                };
                                (false, describe(m, n))
                            }
                        }
                    };
                    let suffix = match (p.dry_run, p.action) {
                        (true, _) => " [dry-run]",
                        (_, Action::Audit) => " [audit]",
                        _ => "",
                    };
                    rules.push(RuleCheck {
                        id: id.clone(),
                        name: if multi {
                            name.map(str::to_string)
                        } else {
                            None
                        },
                        matched,
                        reason: format!("{reason}{suffix}"),
                    });
                }
            }
        }
        Explanation { decision, rules }
    }
}
