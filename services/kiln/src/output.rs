//! How commands print what they get back, by `-o table|json`: lists have
//! their own tables (each command's module); one object prints as `KEY
//! VALUE` lines; an action prints a sentence, or with `-o json` what it
//! acted on.

use anyhow::Result;
use serde_json::Value;

/// How a command prints what the gateway answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, one line per item.
    #[default]
    Table,
    /// The gateway's JSON answer.
    Json,
}

/// Print `items` as `output` asks.
pub fn print(output: Output, items: &[Value], table: fn(&[Value]) -> String) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(items)?),
        Output::Table => print!("{}", table(items)),
    }
    Ok(())
}

/// Print one item (a list of one in a table).
pub fn print_one(output: Output, item: &Value, table: fn(&[Value]) -> String) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(item)?),
        Output::Table => print!("{}", table(std::slice::from_ref(item))),
    }
    Ok(())
}

/// One object: `-o json` prints it as the gateway answered it; a table
/// prints one line per top-level field, nested values as compact JSON.
pub fn object(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", key_values(v));
    }
    Ok(())
}

/// An action's outcome: `-o json` prints `v` (what it acted on), a table
/// the sentence.
pub fn done(v: &Value, json: bool, sentence: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{sentence}");
    }
    Ok(())
}

/// `KEY  VALUE` lines, keys aligned; a value that is not an object is
/// printed as it is.
pub fn key_values(v: &Value) -> String {
    let Value::Object(map) = v else {
        return format!("{v}\n");
    };
    let width = map.keys().map(|k| k.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, value) in map {
        let shown = match value {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        out += &format!("{k:<width$}  {shown}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_object_is_aligned_key_value_lines() {
        let t = key_values(&json!({"functionName": "f", "memorySize": 512,
            "environmentVariables": {"A": "1"}, "description": null}));
        assert_eq!(
            t,
            "description           -\n\
             environmentVariables  {\"A\":\"1\"}\n\
             functionName          f\n\
             memorySize            512\n"
        );
        assert_eq!(key_values(&json!([1, 2])), "[1,2]\n");
    }
}
