//! `kiln runtimes`: the gateway's runtime catalogue (Kiln's ListRuntimes)
//! with each runtime's end-of-support stage and dates, and how many ready
//! compute nodes offer it ("-" when the gateway could not ask).

use anyhow::Result;
use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::client::FcClient;

pub async fn run(client: &FcClient, json: bool) -> Result<()> {
    let resp = client
        .request(Method::GET, "/2023-03-30/runtimes", &[], &[], Bytes::new())
        .await?
        .error_for_status()?;
    let v = resp.json()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", table(&v));
    }
    Ok(())
}

/// One line per runtime: name, handler language ("-" for the custom
/// runtimes), status, the three dates ("-" when none) and the ready nodes
/// that offer it; then a note for each name that is not FC's.
pub fn table(v: &Value) -> String {
    let mut out = format!(
        "{:<18} {:<9} {:<14} {:<12} {:<12} {:<12} {}\n",
        "RUNTIME", "HANDLER", "STATUS", "NO-CREATE", "NO-UPDATE", "NO-INVOKE", "NODES"
    );
    let mut notes = String::new();
    let empty = Vec::new();
    for r in v["runtimes"].as_array().unwrap_or(&empty) {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        let nodes = r["nodes"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |n| n.to_string());
        if let Some(note) = r["note"].as_str() {
            notes.push_str(&format!("{}: {note}\n", s("runtime")));
        }
        out.push_str(&format!(
            "{:<18} {:<9} {:<14} {:<12} {:<12} {:<12} {}\n",
            s("runtime"),
            s("language"),
            s("status"),
            s("deprecationDate"),
            s("blockUpdateDate"),
            s("endOfLifeDate"),
            nodes
        ));
    }
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_each_runtime_and_its_dates() {
        let v = serde_json::json!({"runtimes": [
            {"runtime": "custom", "status": "Active", "nodes": 3},
            {"runtime": "custom.debian12", "status": "Deprecated",
             "deprecationDate": "2030-01-01", "endOfLifeDate": "2030-03-01"},
        ]});
        let t = table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with("NODES"));
        assert!(lines[1].starts_with("custom ") && lines[1].contains("Active"));
        assert!(lines[1].ends_with(" 3"), "{}", lines[1]);
        assert!(lines[2].ends_with(" -"), "{}", lines[2]);
        assert!(lines[2].contains("Deprecated") && lines[2].contains("2030-01-01"));
        assert!(lines[2].contains(" - ") && lines[2].contains("2030-03-01"));
    }

    #[test]
    fn built_in_runtimes_show_their_language_and_any_note() {
        let v = serde_json::json!({"runtimes": [
            {"runtime": "python3.11", "language": "python", "status": "Active",
             "note": "not an FC runtime name; FC's nearest: python3.10, python3.12"},
            {"runtime": "nodejs18", "language": "nodejs", "status": "Active"},
        ]});
        let t = table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("python3.11") && lines[1].contains(" python "));
        assert!(lines[2].starts_with("nodejs18") && lines[2].contains(" nodejs "));
        assert_eq!(lines[3], "");
        assert_eq!(
            lines[4],
            "python3.11: not an FC runtime name; FC's nearest: python3.10, python3.12"
        );
        assert_eq!(lines.len(), 5, "only names that are not FC's get a note");
    }
}
