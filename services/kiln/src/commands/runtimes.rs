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

/// One line per runtime: name, status, the three dates ("-" when none)
/// and the ready nodes that offer it.
pub fn table(v: &Value) -> String {
    let mut out = format!(
        "{:<18} {:<14} {:<12} {:<12} {:<12} {}\n",
        "RUNTIME", "STATUS", "NO-CREATE", "NO-UPDATE", "NO-INVOKE", "NODES"
    );
    let empty = Vec::new();
    for r in v["runtimes"].as_array().unwrap_or(&empty) {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        let nodes = r["nodes"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |n| n.to_string());
        out.push_str(&format!(
            "{:<18} {:<14} {:<12} {:<12} {:<12} {}\n",
            s("runtime"),
            s("status"),
            s("deprecationDate"),
            s("blockUpdateDate"),
            s("endOfLifeDate"),
            nodes
        ));
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
}
