//! RAM-style policy documents: which `fc:<Operation>` actions a role may
//! take on which `acs:...` resources.
//!
//! ```json
//! {"Version": "1", "Statement": [
//!   {"Effect": "Allow", "Action": ["fc:GetFunction"],
//!    "Resource": ["acs:fc:*:*:functions/my-*"]}]}
//! ```
//!
//! `Action` and `Resource` take a string or a list; `*` matches any run of
//! characters and `?` one, as in RAM. An explicit `Deny` wins over any
//! `Allow`; without a matching `Allow` the request is denied.

use serde::{Deserialize, Serialize};

/// The most statements a document may hold.
const MAX_STATEMENTS: usize = 100;
/// The most patterns of one statement's `Action` or `Resource`.
const MAX_PATTERNS: usize = 100;
const MAX_PATTERN_LEN: usize = 512;

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not a valid policy document: {0}")]
    Malformed(String),
    #[error("policy Version must be \"1\"")]
    Version,
    #[error("policy has no statements, or more than {MAX_STATEMENTS}")]
    StatementCount,
    #[error("policy statement {0}: {1}")]
    Statement(usize, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    Allow,
    Deny,
}

/// A string or a list of strings (RAM accepts both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatement {
    #[serde(rename = "Effect")]
    effect: Effect,
    #[serde(rename = "Action")]
    action: OneOrMany,
    #[serde(rename = "Resource")]
    resource: OneOrMany,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(rename = "Version")]
    version: String,
    #[serde(rename = "Statement")]
    statement: Vec<RawStatement>,
}

/// One checked statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Statement {
    #[serde(rename = "Effect")]
    pub effect: Effect,
    #[serde(rename = "Action")]
    pub action: Vec<String>,
    #[serde(rename = "Resource")]
    pub resource: Vec<String>,
}

/// A checked policy document; serialises back to RAM's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    #[serde(rename = "Version")]
    pub version: String,
    #[serde(rename = "Statement")]
    pub statement: Vec<Statement>,
}

fn check_patterns(
    i: usize,
    what: &str,
    patterns: &[String],
    ok: impl Fn(&str) -> bool,
    expected: &str,
) -> Result<(), PolicyError> {
    if patterns.is_empty() || patterns.len() > MAX_PATTERNS {
        return Err(PolicyError::Statement(
            i,
            format!("{what} must list 1 to {MAX_PATTERNS} patterns"),
        ));
    }
    for p in patterns {
        if p.is_empty() || p.len() > MAX_PATTERN_LEN || !p.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(PolicyError::Statement(
                i,
                format!("{what} {p:?} must be 1 to {MAX_PATTERN_LEN} visible ASCII characters"),
            ));
        }
        if !ok(p) {
            return Err(PolicyError::Statement(
                i,
                format!("{what} {p:?} is not {expected}"),
            ));
        }
    }
    Ok(())
}

impl Policy {
    /// Parse and check a document given as JSON (an object, or a string
    /// holding one, as RAM's API takes it).
    pub fn parse(value: &serde_json::Value) -> Result<Self, PolicyError> {
        let value = match value {
            serde_json::Value::String(s) => {
                serde_json::from_str(s).map_err(|e| PolicyError::Malformed(e.to_string()))?
            }
            v => v.clone(),
        };
        let raw: RawPolicy =
            serde_json::from_value(value).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        if raw.version != "1" {
            return Err(PolicyError::Version);
        }
        if raw.statement.is_empty() || raw.statement.len() > MAX_STATEMENTS {
            return Err(PolicyError::StatementCount);
        }
        let mut statement = Vec::with_capacity(raw.statement.len());
        for (i, s) in raw.statement.into_iter().enumerate() {
            let action = s.action.into_vec();
            let resource = s.resource.into_vec();
            check_patterns(
                i,
                "Action",
                &action,
                |a| a == "*" || a.starts_with("fc:"),
                "\"*\" or an fc:<Operation> pattern",
            )?;
            check_patterns(
                i,
                "Resource",
                &resource,
                |r| r == "*" || r.starts_with("acs:"),
                "\"*\" or an acs:<service>:... pattern",
            )?;
            statement.push(Statement {
                effect: s.effect,
                action,
                resource,
            });
        }
        Ok(Self {
            version: "1".into(),
            statement,
        })
    }

    /// Whether `action` (e.g. `fc:GetFunction`) on `resource` is allowed.
    pub fn allows(&self, action: &str, resource: &str) -> bool {
        let applies = |s: &Statement| {
            s.action.iter().any(|p| wildcard_match(p, action, true))
                && s.resource
                    .iter()
                    .any(|p| wildcard_match(p, resource, false))
        };
        let mut allowed = false;
        for s in &self.statement {
            if applies(s) {
                match s.effect {
                    Effect::Deny => return false,
                    Effect::Allow => allowed = true,
                }
            }
        }
        allowed
    }
}

/// RAM's wildcard match: `*` any run (also empty), `?` one character.
/// Actions compare case-insensitively (as RAM does), resources exactly.
pub fn wildcard_match(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if ignore_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || (p[pi] != b'*' && eq(p[pi], t[ti]))) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn wildcards_match_like_ram() {
        assert!(wildcard_match("*", "", false));
        assert!(wildcard_match("fc:*", "fc:GetFunction", true));
        assert!(wildcard_match("fc:get*", "fc:GetFunction", true));
        assert!(!wildcard_match("fc:get*", "fc:GetFunction", false));
        assert!(wildcard_match("fc:Get?unction", "fc:GetFunction", false));
        assert!(!wildcard_match("fc:Get?unction", "fc:GetFFunction", false));
        assert!(wildcard_match(
            "acs:fc:*:*:functions/a*b*c",
            "acs:fc:r:1:functions/aXbYbZc",
            false
        ));
        assert!(!wildcard_match(
            "acs:fc:*:*:functions/a*b*c",
            "acs:fc:r:1:functions/aXbYbZ",
            false
        ));
        assert!(!wildcard_match(
            "acs:fc:*:*:functions/f",
            "acs:fc:r:1:functions/f2",
            false
        ));
        assert!(wildcard_match("a**", "a", false));
        assert!(!wildcard_match("", "a", false));
    }

    fn policy(v: serde_json::Value) -> Policy {
        Policy::parse(&v).unwrap()
    }

    #[test]
    fn allow_needs_action_and_resource_and_deny_wins() {
        let p = policy(json!({"Version": "1", "Statement": [
            {"Effect": "Allow", "Action": ["fc:GetFunction", "fc:Invoke*"],
             "Resource": "acs:fc:*:*:functions/self"},
            {"Effect": "Allow", "Action": "fc:List*", "Resource": "*"},
            {"Effect": "Deny", "Action": "fc:ListRoles", "Resource": "*"},
        ]}));
        let me = "acs:fc:cn-hangzhou:1:functions/self";
        assert!(p.allows("fc:GetFunction", me));
        assert!(p.allows("fc:InvokeFunction", me));
        assert!(!p.allows("fc:DeleteFunction", me));
        assert!(!p.allows("fc:GetFunction", "acs:fc:cn-hangzhou:1:functions/other"));
        assert!(p.allows("fc:ListFunctions", "acs:fc:cn-hangzhou:1:functions/*"));
        assert!(!p.allows("fc:ListRoles", "acs:ram::1:role/*"));
    }

    #[test]
    fn a_policy_as_a_json_string_is_accepted() {
        let doc =
            r#"{"Version":"1","Statement":[{"Effect":"Allow","Action":"fc:*","Resource":"*"}]}"#;
        let p = Policy::parse(&json!(doc)).unwrap();
        assert!(p.allows("fc:DeleteFunction", "acs:fc:r:1:functions/x"));
    }

    #[test]
    fn bad_documents_are_refused() {
        for (doc, needle) in [
            (json!("not json"), "valid policy"),
            (json!({"Version": "2", "Statement": []}), "Version"),
            (json!({"Version": "1", "Statement": []}), "statements"),
            (
                json!({"Version": "1", "Statement": [
                {"Effect": "Maybe", "Action": "fc:*", "Resource": "*"}]}),
                "valid policy",
            ),
            (
                json!({"Version": "1", "Statement": [
                {"Effect": "Allow", "Action": "ecs:*", "Resource": "*"}]}),
                "Action",
            ),
            (
                json!({"Version": "1", "Statement": [
                {"Effect": "Allow", "Action": "fc:*", "Resource": "functions/x"}]}),
                "Resource",
            ),
            (
                json!({"Version": "1", "Statement": [
                {"Effect": "Allow", "Action": [], "Resource": "*"}]}),
                "Action",
            ),
            (
                json!({"Version": "1", "Statement": [
                {"Effect": "Allow", "Action": "fc:*", "Resource": "*", "Condition": {}}]}),
                "valid policy",
            ),
        ] {
            let e = Policy::parse(&doc).unwrap_err().to_string();
            assert!(e.contains(needle), "{doc}: {e}");
        }
    }
}
