//! Serverless Devs' `${...}` expressions in s.yaml, the two forms Kiln
//! resolves: `${vars.NAME}` (the project's `vars`, dotted paths into
//! nested maps) and `${env('NAME')}` / `${env('NAME', 'default')}` /
//! `${env.NAME}` (the deploying shell's environment). Any other
//! expression (`${resources...}`, `${config(...)}`, `${file(...)}`) is an
//! error that names it and where it is.
//!
//! A string that is one expression and nothing else takes the value's
//! type (`memorySize: ${vars.memory}` stays a number); an expression
//! inside a longer string is spliced in as text.

use serde_json::{Map, Value};

/// Where variables come from.
pub struct Scope<'a> {
    pub vars: &'a Map<String, Value>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// Resolve every expression in `value` (found at `at`, a dotted path
/// for error messages), collecting one error per bad expression.
pub fn resolve(value: &mut Value, scope: &Scope<'_>, at: &str, errors: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            if let Some(v) = resolve_str(s, scope, at, errors) {
                *value = v;
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                resolve(item, scope, &format!("{at}[{i}]"), errors);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                resolve(v, scope, &join(at, k), errors);
            }
        }
        _ => {}
    }
}

pub fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

/// The resolved value of `s`, or `None` when it holds no expression (or
/// one that failed: the error is recorded).
fn resolve_str(s: &str, scope: &Scope<'_>, at: &str, errors: &mut Vec<String>) -> Option<Value> {
    if !s.contains("${") {
        return None;
    }
    let mut out = String::new();
    let mut rest = s;
    let mut whole: Option<Value> = None;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            errors.push(format!("{at}: unterminated ${{ in {s:?}"));
            return None;
        };
        let expr = rest[start + 2..start + 2 + len].trim();
        let value = match evaluate(expr, scope) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{at}: ${{{expr}}}: {e}"));
                return None;
            }
        };
        if start == 0 && start + 3 + len == rest.len() && out.is_empty() {
            whole = Some(value.clone());
        }
        out.push_str(&rest[..start]);
        match &value {
            Value::String(v) => out.push_str(v),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Some(whole.unwrap_or(Value::String(out)))
}

fn evaluate(expr: &str, scope: &Scope<'_>) -> Result<Value, String> {
    if let Some(path) = expr.strip_prefix("vars.") {
        let mut v: Option<&Value> = None;
        for (i, part) in path.split('.').enumerate() {
            v = if i == 0 {
                scope.vars.get(part)
            } else {
                v.and_then(|v| v.get(part))
            };
        }
        return v.cloned().ok_or_else(|| format!("vars has no {path}"));
    }
    if let Some(name) = expr.strip_prefix("env.") {
        return env(scope, name.trim(), None);
    }
    if let Some(args) = expr.strip_prefix("env(").and_then(|a| a.strip_suffix(')')) {
        let args = args
            .split(',')
            .map(|a| unquote(a.trim()))
            .collect::<Option<Vec<_>>>()
            .ok_or("env() takes quoted strings: env('NAME') or env('NAME', 'default')")?;
        return match args.as_slice() {
            [name] => env(scope, name, None),
            [name, default] => env(scope, name, Some(default)),
            _ => Err("env() takes one name and at most one default".into()),
        };
    }
    Err("Kiln resolves ${vars.NAME} and ${env('NAME')} only; replace this expression with its value".into())
}

fn env(scope: &Scope<'_>, name: &str, default: Option<&str>) -> Result<Value, String> {
    if name.is_empty() {
        return Err("no variable name".into());
    }
    match ((scope.env)(name), default) {
        (Some(v), _) => Ok(Value::String(v)),
        (None, Some(d)) => Ok(Value::String(d.to_owned())),
        (None, None) => Err(format!("the environment variable {name} is not set")),
    }
}

fn unquote(s: &str) -> Option<&str> {
    s.strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(value: Value, vars: Value) -> (Value, Vec<String>) {
        let env = |k: &str| (k == "STAGE").then(|| "prod".to_owned());
        let vars = vars.as_object().unwrap().clone();
        let scope = Scope {
            vars: &vars,
            env: &env,
        };
        let mut v = value;
        let mut errors = Vec::new();
        resolve(&mut v, &scope, "props", &mut errors);
        (v, errors)
    }

    #[test]
    fn whole_expressions_keep_their_type_and_parts_splice_as_text() {
        let (v, errors) = run(
            json!({
                "memorySize": "${vars.memory}",
                "name": "app-${env('STAGE')}-${ vars.n.inner }",
                "env": {"A": "${env.STAGE}", "B": "${env('MISSING', 'fallback')}"},
                "list": ["${vars.memory}", "plain"],
                "untouched": 7
            }),
            json!({"memory": 512, "n": {"inner": "x"}}),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            v,
            json!({
                "memorySize": 512,
                "name": "app-prod-x",
                "env": {"A": "prod", "B": "fallback"},
                "list": [512, "plain"],
                "untouched": 7
            })
        );
    }

    #[test]
    fn every_bad_expression_is_named_with_where_it_is() {
        let (_, errors) = run(
            json!({
                "a": "${vars.nope}",
                "b": "${env('UNSET')}",
                "c": "${resources.other.output.url}",
                "d": "${env(UNQUOTED)}",
                "e": "broken ${vars.x",
            }),
            json!({}),
        );
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(errors[0].starts_with("props.a: ${vars.nope}: vars has no nope"));
        assert!(errors[1].contains("props.b") && errors[1].contains("UNSET is not set"));
        assert!(errors[2].contains("props.c") && errors[2].contains("${vars.NAME}"));
        assert!(errors[3].contains("props.d") && errors[3].contains("quoted"));
        assert!(errors[4].contains("props.e") && errors[4].contains("unterminated"));
    }
}
