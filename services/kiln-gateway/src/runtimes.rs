//! The runtime catalogue and FC's end-of-support sequence.
//!
//! Every runtime Kiln knows is in the catalogue; the gateway's config may
//! give a runtime up to three dates (UTC days), which must not go
//! backwards. From each date on, one more thing is refused, with an
//! InvalidArgument naming the runtime and its dates:
//!
//! 1. `deprecation_date`: no new functions (CreateFunction, or an update
//!    that moves a function onto the runtime);
//! 2. `block_update_date`: no updates of functions that stay on it
//!    (moving a function off it is allowed: that is the way out);
//! 3. `end_of_life_date`: no invocations (sync or async).
//!
//! `GET /2023-03-30/runtimes` (Kiln's `ListRuntimes`) lists the catalogue,
//! each runtime's handler model (a built-in runtime's language; none for
//! the custom runtimes), a note where its name is not one of FC's, and
//! how many ready compute nodes offer each runtime (from the
//! scheduler's node list; left out when the scheduler cannot be reached).
//! The clock is the gateway's (injectable in tests).

use std::sync::Arc;

use http::{Response, StatusCode};
use kiln_core::{FcError, HandlerLanguage, RuntimeName};
use kiln_internal_api::server::{json, Body};
use kiln_internal_api::NodeInfo;
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::gateway::Gateway;

/// One `[[runtimes]]` entry of the gateway config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeLifecycleConfig {
    pub name: String,
    /// `YYYY-MM-DD` (UTC): no new functions from this day.
    #[serde(default)]
    pub deprecation_date: Option<String>,
    /// `YYYY-MM-DD` (UTC): no updates from this day.
    #[serde(default)]
    pub block_update_date: Option<String>,
    /// `YYYY-MM-DD` (UTC): no invocations from this day.
    #[serde(default)]
    pub end_of_life_date: Option<String>,
}

/// Where a runtime is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum RuntimeStatus {
    /// Everything allowed.
    Active,
    /// No new functions.
    Deprecated,
    /// No new functions, no updates.
    UpdateBlocked,
    /// Nothing runs any more.
    EndOfLife,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Dates {
    /// Day starts (ms since the epoch) of the three stages.
    deprecation: Option<u64>,
    block_update: Option<u64>,
    end_of_life: Option<u64>,
}

/// Why a runtime config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeConfigError {
    #[error("runtimes: {0:?} is not a runtime this Kiln offers ({supported})", supported = RuntimeName::supported())]
    Unknown(String),
    #[error("runtimes: {0} is listed twice")]
    Duplicate(String),
    #[error("runtimes: {runtime}.{field} {value:?} is not a YYYY-MM-DD date")]
    BadDate {
        runtime: String,
        field: &'static str,
        value: String,
    },
    #[error("runtimes: the dates of {0} must not go backwards (deprecation <= block_update <= end_of_life)")]
    Order(String),
}

/// The catalogue: every runtime and its dates.
#[derive(Debug, Clone, Default)]
pub struct RuntimeCatalogue {
    /// Every runtime, in [`RuntimeName::ALL`]'s order.
    dates: Vec<(RuntimeName, Dates)>,
}

fn parse_day(
    runtime: &str,
    field: &'static str,
    v: &Option<String>,
) -> Result<Option<u64>, RuntimeConfigError> {
    let Some(v) = v else { return Ok(None) };
    let bad = || RuntimeConfigError::BadDate {
        runtime: runtime.to_owned(),
        field,
        value: v.clone(),
    };
    let d = time::Date::parse(v, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| bad())?;
    let ts = d.midnight().assume_utc().unix_timestamp();
    u64::try_from(ts).map(|s| Some(s * 1000)).map_err(|_| bad())
}

fn day(ms: u64) -> String {
    crate::model::fc_time(ms)
        .split('T')
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl RuntimeCatalogue {
    pub fn from_config(entries: &[RuntimeLifecycleConfig]) -> Result<Self, RuntimeConfigError> {
        let mut dates: Vec<(RuntimeName, Dates)> = RuntimeName::ALL
            .into_iter()
            .map(|r| (r, Dates::default()))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            let name: RuntimeName = e
                .name
                .parse()
                .map_err(|_| RuntimeConfigError::Unknown(e.name.clone()))?;
            if !seen.insert(name) {
                return Err(RuntimeConfigError::Duplicate(e.name.clone()));
            }
            let d = Dates {
                deprecation: parse_day(&e.name, "deprecation_date", &e.deprecation_date)?,
                block_update: parse_day(&e.name, "block_update_date", &e.block_update_date)?,
                end_of_life: parse_day(&e.name, "end_of_life_date", &e.end_of_life_date)?,
            };
            let given: Vec<u64> = [d.deprecation, d.block_update, d.end_of_life]
                .into_iter()
                .flatten()
                .collect();
            if given.windows(2).any(|w| w[0] > w[1]) {
                return Err(RuntimeConfigError::Order(e.name.clone()));
            }
            if let Some(slot) = dates.iter_mut().find(|(r, _)| *r == name) {
                slot.1 = d;
            }
        }
        Ok(Self { dates })
    }

    fn dates_of(&self, runtime: RuntimeName) -> Dates {
        self.dates
            .iter()
            .find(|(r, _)| *r == runtime)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    }

    pub fn status(&self, runtime: RuntimeName, now_ms: u64) -> RuntimeStatus {
        let d = self.dates_of(runtime);
        let past = |t: Option<u64>| t.is_some_and(|t| now_ms >= t);
        if past(d.end_of_life) {
            RuntimeStatus::EndOfLife
        } else if past(d.block_update) {
            RuntimeStatus::UpdateBlocked
        } else if past(d.deprecation) {
            RuntimeStatus::Deprecated
        } else {
            RuntimeStatus::Active
        }
    }

    fn dates_text(&self, runtime: RuntimeName) -> String {
        let d = self.dates_of(runtime);
        let f = |t: Option<u64>| t.map_or_else(|| "not scheduled".to_owned(), day);
        format!(
            "no new functions from {}, no updates from {}, no invocations from {}",
            f(d.deprecation),
            f(d.block_update),
            f(d.end_of_life)
        )
    }

    fn refuse(&self, runtime: RuntimeName, what: &str) -> FcError {
        FcError::invalid_argument(format!(
            "runtime {runtime} has reached end of support and {what} ({}); use a supported runtime",
            self.dates_text(runtime)
        ))
    }

    /// CreateFunction with `runtime`.
    pub fn check_create(&self, runtime: RuntimeName, now_ms: u64) -> Result<(), FcError> {
        if self.status(runtime, now_ms) >= RuntimeStatus::Deprecated {
            return Err(self.refuse(runtime, "no new functions may use it"));
        }
        Ok(())
    }

    /// UpdateFunction from `old` to `new` (the same when unchanged).
    pub fn check_update(
        &self,
        old: RuntimeName,
        new: RuntimeName,
        now_ms: u64,
    ) -> Result<(), FcError> {
        if old != new {
            return self.check_create(new, now_ms);
        }
        if self.status(new, now_ms) >= RuntimeStatus::UpdateBlocked {
            return Err(self.refuse(
                new,
                "functions that use it can no longer be updated except to move to another runtime",
            ));
        }
        Ok(())
    }

    /// A sync or async invocation of a function on `runtime`.
    pub fn check_invoke(&self, runtime: RuntimeName, now_ms: u64) -> Result<(), FcError> {
        if self.status(runtime, now_ms) >= RuntimeStatus::EndOfLife {
            return Err(self.refuse(runtime, "functions that use it can no longer be invoked"));
        }
        Ok(())
    }

    /// The catalogue as ListRuntimes shows it; with `nodes` (the
    /// scheduler's node list), how many ready nodes offer each runtime.
    pub fn list(&self, now_ms: u64, nodes: Option<&[NodeInfo]>) -> ListRuntimesOutput {
        ListRuntimesOutput {
            runtimes: self
                .dates
                .iter()
                .map(|(r, d)| RuntimeInfo {
                    runtime: r.as_str(),
                    language: r.handler_language().map(|l| match l {
                        HandlerLanguage::Python => "python",
                        HandlerLanguage::Nodejs => "nodejs",
                    }),
                    note: r.fc_note(),
                    status: self.status(*r, now_ms),
                    deprecation_date: d.deprecation.map(day),
                    block_update_date: d.block_update.map(day),
                    end_of_life_date: d.end_of_life.map(day),
                    nodes: nodes.map(|nodes| {
                        nodes
                            .iter()
                            .filter(|n| n.state == "ready" && n.labels.offers(*r))
                            .count() as u32
                    }),
                })
                .collect(),
        }
    }
}

/// One runtime in `ListRuntimesOutput`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInfo {
    pub runtime: &'static str,
    /// A built-in runtime's language (FC's `handler(event, context)`
    /// model); absent for the custom runtimes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<&'static str>,
    /// Where the name is not FC's: what it is and FC's nearest names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
    pub status: RuntimeStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deprecation_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_update_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_of_life_date: Option<String>,
    /// Ready compute nodes that offer the runtime (absent when the
    /// scheduler could not be asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
}

/// `ListRuntimesOutput` (Kiln extension, in FC's style).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListRuntimesOutput {
    pub runtimes: Vec<RuntimeInfo>,
}

/// `GET /2023-03-30/runtimes`.
pub async fn list(gw: &Arc<Gateway>) -> Result<Response<Body>, ApiError> {
    let nodes = match gw.scheduler.nodes().await {
        Ok(nodes) => Some(nodes),
        Err(e) => {
            // The catalogue and its stages still answer without it.
            tracing::warn!(error = %e, "cannot list the compute nodes; runtimes listed without them");
            None
        }
    };
    Ok(json(
        StatusCode::OK,
        &gw.runtimes.list(gw.clock.now_ms(), nodes.as_deref()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(d: Option<&str>, u: Option<&str>, e: Option<&str>) -> RuntimeLifecycleConfig {
        RuntimeLifecycleConfig {
            name: "custom".into(),
            deprecation_date: d.map(Into::into),
            block_update_date: u.map(Into::into),
            end_of_life_date: e.map(Into::into),
        }
    }

    const DAY: u64 = 86_400_000;
    // 2030-01-01T00:00:00Z
    const JAN1: u64 = 1_893_456_000_000;

    #[test]
    fn each_stage_refuses_one_more_thing_from_its_day() {
        let c = RuntimeCatalogue::from_config(&[entry(
            Some("2030-01-01"),
            Some("2030-01-02"),
            Some("2030-01-03"),
        )])
        .unwrap();
        let (rt, other) = (RuntimeName::Custom, RuntimeName::CustomDebian12);
        let before = JAN1 - 1;
        assert_eq!(c.status(rt, before), RuntimeStatus::Active);
        c.check_create(rt, before).unwrap();
        assert_eq!(c.status(rt, JAN1), RuntimeStatus::Deprecated);
        let e = c.check_create(rt, JAN1).unwrap_err();
        assert_eq!(e.code, kiln_core::FcErrorCode::InvalidArgument);
        assert!(e.message.contains("runtime custom"), "{}", e.message);
        assert!(e.message.contains("2030-01-01") && e.message.contains("2030-01-03"));
        c.check_update(rt, rt, JAN1).unwrap();
        c.check_update(other, rt, JAN1).unwrap_err();
        c.check_invoke(rt, JAN1).unwrap();
        assert_eq!(c.status(rt, JAN1 + DAY), RuntimeStatus::UpdateBlocked);
        c.check_update(rt, rt, JAN1 + DAY).unwrap_err();
        c.check_update(rt, other, JAN1 + DAY).unwrap();
        c.check_invoke(rt, JAN1 + DAY).unwrap();
        assert_eq!(c.status(rt, JAN1 + 2 * DAY), RuntimeStatus::EndOfLife);
        let e = c.check_invoke(rt, JAN1 + 2 * DAY).unwrap_err();
        assert!(e.message.contains("can no longer be invoked"));
        assert_eq!(c.status(other, JAN1 + 9 * DAY), RuntimeStatus::Active);
        let l = c.list(JAN1, None);
        assert_eq!(l.runtimes.len(), RuntimeName::ALL.len());
        assert_eq!(l.runtimes[0].nodes, None);
        assert_eq!(
            l.runtimes[0].deprecation_date.as_deref(),
            Some("2030-01-01")
        );
    }

    fn node(state: &str, runtimes: Option<Vec<RuntimeName>>) -> NodeInfo {
        NodeInfo {
            node_id: "n1".parse().unwrap(),
            agent_url: "https://127.0.0.1:1".into(),
            capacity: kiln_internal_api::NodeCapacity {
                memory_mb: 1024,
                cpu_milli: 1000,
                max_instances: 4,
            },
            labels: kiln_internal_api::NodeLabels {
                zone: "zone-a".into(),
                tenancy: kiln_internal_api::Tenancy::Dedicated,
                sandbox_kinds: vec![kiln_core::SandboxKind::Container],
                dedicated_account: None,
                runtimes,
                network_isolation: Default::default(),
            },
            state: state.into(),
            instances: 0,
            memory_used_mb: 0,
            last_heartbeat_ms: 0,
        }
    }

    #[test]
    fn the_listing_counts_the_ready_nodes_that_offer_each_runtime() {
        let c = RuntimeCatalogue::from_config(&[]).unwrap();
        let nodes = [
            node("ready", Some(vec![RuntimeName::Custom])),
            // An agent that predates reporting its runtimes offers all.
            node("ready", None),
            node("failed", Some(RuntimeName::ALL.to_vec())),
            node("cordoned", Some(RuntimeName::ALL.to_vec())),
        ];
        let l = c.list(0, Some(&nodes));
        let count = |r: RuntimeName| {
            l.runtimes
                .iter()
                .find(|i| i.runtime == r.as_str())
                .unwrap()
                .nodes
        };
        assert_eq!(count(RuntimeName::Custom), Some(2));
        assert_eq!(count(RuntimeName::CustomDebian12), Some(1));
        let l = c.list(0, Some(&nodes[..1]));
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v["runtimes"][1]["runtime"], "custom.debian12");
        assert!(v["runtimes"][1].get("language").is_none());
        let py = &v["runtimes"][2];
        assert_eq!(
            (py["runtime"].as_str(), py["language"].as_str()),
            (Some("python3.11"), Some("python"))
        );
        assert!(py["note"]
            .as_str()
            .unwrap()
            .contains("not an FC runtime name"));
        let js = &v["runtimes"][3];
        assert_eq!(
            (js["runtime"].as_str(), js["language"].as_str()),
            (Some("nodejs18"), Some("nodejs"))
        );
        assert!(js.get("note").is_none(), "nodejs18 is FC's own name");
        assert_eq!(v["runtimes"][4]["runtime"], "python3.13");
        assert!(v["runtimes"][4]["note"]
            .as_str()
            .unwrap()
            .contains("python3.12"));
        assert_eq!(v["runtimes"][5]["runtime"], "nodejs20");
        assert!(
            v["runtimes"][5].get("note").is_none(),
            "nodejs20 is FC's own name"
        );
        assert_eq!(v["runtimes"][1]["nodes"], 0);
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(matches!(
            RuntimeCatalogue::from_config(&[entry(Some("2030-13-01"), None, None)]),
            Err(RuntimeConfigError::BadDate { .. })
        ));
        assert!(matches!(
            RuntimeCatalogue::from_config(&[entry(Some("2030-02-01"), None, Some("2030-01-01"))]),
            Err(RuntimeConfigError::Order(_))
        ));
        assert!(matches!(
            RuntimeCatalogue::from_config(&[entry(None, None, None), entry(None, None, None)]),
            Err(RuntimeConfigError::Duplicate(_))
        ));
        let mut e = entry(None, None, None);
        e.name = "python3.10".into();
        assert!(matches!(
            RuntimeCatalogue::from_config(&[e]),
            Err(RuntimeConfigError::Unknown(_))
        ));
    }
}
