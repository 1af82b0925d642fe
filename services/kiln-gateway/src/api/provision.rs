//! FC's provisioned-instance configs (PutProvisionConfig,
//! GetProvisionConfig, DeleteProvisionConfig, ListProvisionConfigs): checked
//! here, scoped to the caller's account and existing functions, and kept by
//! the scheduler (`/v1/functions/provision`, `/v1/accounts/{id}/provisions`),
//! which also checks cron expressions, time zones and time windows.
//! `alwaysAllocateCPU` defaults to true, as in FC: provisioned instances keep
//! their CPU while idle; `false` is FC's idle mode, where agents freeze them
//! between calls like on-demand instances.

use std::sync::Arc;

use super::request::function_arn as arn;
use super::respond::{json as json_response, no_content, Body};
use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FcErrorCode, FunctionName};
use kiln_internal_api::{
    FunctionRef, InternalClientError, ProvisionConfig, ProvisionDetail, ProvisionStatus,
    PutProvision, ScheduledAction, TargetTrackingPolicy,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::request::query_param;
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::versions::Qualifier;

/// The most provisioned instances one function may ask for (the
/// scheduler's bound too).
pub const TARGET_MAX: i64 = 10_000;
const ACTIONS_MAX: usize = 100;
const POLICIES_MAX: usize = 10;
const METRIC_TYPE: &str = "ProvisionedConcurrencyUtilization";

/// FC's PutProvisionConfigInput.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PutInput {
    #[serde(default)]
    target: Option<i64>,
    #[serde(default)]
    default_target: Option<i64>,
    #[serde(default, rename = "alwaysAllocateCPU")]
    always_allocate_cpu: Option<bool>,
    #[serde(default, rename = "alwaysAllocateGPU")]
    always_allocate_gpu: Option<bool>,
    #[serde(default)]
    scheduled_actions: Option<Vec<ActionInput>>,
    #[serde(default)]
    target_tracking_policies: Option<Vec<PolicyInput>>,
}

/// FC's ScheduledAction.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ActionInput {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    schedule_expression: Option<String>,
    #[serde(default)]
    target: Option<i64>,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    end_time: Option<String>,
}

/// FC's TargetTrackingPolicy.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyInput {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    metric_type: Option<String>,
    #[serde(default)]
    metric_target: Option<f64>,
    #[serde(default)]
    min_capacity: Option<i64>,
    #[serde(default)]
    max_capacity: Option<i64>,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    end_time: Option<String>,
}

fn bad(m: String) -> FcError {
    FcError::invalid_argument(m)
}

fn count(v: Option<i64>, what: &str) -> Result<u32, FcError> {
    match v {
        None => Err(bad(format!("{what} is required"))),
        Some(n) if (0..=TARGET_MAX).contains(&n) => Ok(n as u32),
        Some(n) => Err(bad(format!(
            "{what} must be between 0 and {TARGET_MAX}, got {n}"
        ))),
    }
}

fn name_of(n: Option<String>, what: &str, seen: &mut Vec<String>) -> Result<String, FcError> {
    let n = n.unwrap_or_default();
    if n.is_empty() || n.len() > 128 {
        return Err(bad(format!(
            "{what}: name is required (at most 128 characters)"
        )));
    }
    if seen.contains(&n) {
        return Err(bad(format!("{what}: name {n:?} is used twice")));
    }
    seen.push(n.clone());
    Ok(n)
}

fn text(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

/// Parse and check FC's PutProvisionConfigInput into the scheduler's
/// configuration. Cron expressions, time zones and times are checked by the
/// scheduler before it changes anything.
pub fn parse_input(body: &[u8]) -> Result<ProvisionConfig, FcError> {
    let input: PutInput = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the provision config is not valid: {e}")))?;
    if input.always_allocate_gpu == Some(true) {
        return Err(bad(
            "alwaysAllocateGPU: this endpoint has no GPU instances".into()
        ));
    }
    let target = match (input.default_target, input.target) {
        (Some(d), _) => count(Some(d), "defaultTarget")?,
        (None, t) => count(t, "target")?,
    };
    let actions = input.scheduled_actions.unwrap_or_default();
    if actions.len() > ACTIONS_MAX {
        return Err(bad(format!("at most {ACTIONS_MAX} scheduledActions")));
    }
    let policies = input.target_tracking_policies.unwrap_or_default();
    if policies.len() > POLICIES_MAX {
        return Err(bad(format!(
            "at most {POLICIES_MAX} targetTrackingPolicies"
        )));
    }
    let mut names = Vec::new();
    let mut scheduled_actions = Vec::with_capacity(actions.len());
    for (i, a) in actions.into_iter().enumerate() {
        let what = format!("scheduledActions[{i}]");
        let name = name_of(a.name, &what, &mut names)?;
        let what = format!("scheduled action {name:?}");
        let schedule_expression = text(a.schedule_expression)
            .ok_or_else(|| bad(format!("{what}: scheduleExpression is required")))?;
        scheduled_actions.push(ScheduledAction {
            target: count(a.target, &format!("{what}: target"))?,
            name,
            schedule_expression,
            time_zone: text(a.time_zone),
            start_time: text(a.start_time),
            end_time: text(a.end_time),
        });
    }
    let mut names = Vec::new();
    let mut target_tracking_policies = Vec::with_capacity(policies.len());
    for (i, p) in policies.into_iter().enumerate() {
        let what = format!("targetTrackingPolicies[{i}]");
        let name = name_of(p.name, &what, &mut names)?;
        let what = format!("target tracking policy {name:?}");
        let metric_type = text(p.metric_type).unwrap_or_else(|| METRIC_TYPE.to_owned());
        if metric_type != METRIC_TYPE {
            return Err(bad(format!(
                "{what}: metricType must be {METRIC_TYPE}, got {metric_type:?}"
            )));
        }
        let metric_target = match p.metric_target {
            Some(t) if t > 0.0 && t <= 1.0 => t,
            Some(t) => {
                return Err(bad(format!(
                    "{what}: metricTarget must be greater than 0 and at most 1, got {t}"
                )))
            }
            None => return Err(bad(format!("{what}: metricTarget is required"))),
        };
        let min_capacity = count(p.min_capacity, &format!("{what}: minCapacity"))?;
        let max_capacity = count(p.max_capacity, &format!("{what}: maxCapacity"))?;
        if min_capacity > max_capacity {
            return Err(bad(format!(
                "{what}: minCapacity {min_capacity} is greater than maxCapacity {max_capacity}"
            )));
        }
        target_tracking_policies.push(TargetTrackingPolicy {
            name,
            metric_type,
            metric_target,
            min_capacity,
            max_capacity,
            time_zone: text(p.time_zone),
            start_time: text(p.start_time),
            end_time: text(p.end_time),
        });
    }
    Ok(ProvisionConfig {
        target,
        // FC's default (PutProvisionConfigInput: "Default value: true"):
        // provisioned instances keep their CPU while idle unless the caller
        // asks for idle mode with `false`, when they are frozen between calls.
        always_allocate_cpu: input.always_allocate_cpu.unwrap_or(true),
        scheduled_actions,
        target_tracking_policies,
    })
}

/// FC's ProvisionConfig: `target` is what schedules and tracking ask for
/// now, `defaultTarget` the configured one, `current` the instances up.
pub fn to_fc(arn: &str, config: &ProvisionConfig, status: Option<&ProvisionStatus>) -> Value {
    json!({
        "functionArn": arn,
        "target": status.map_or(config.target, |s| s.desired),
        "defaultTarget": config.target,
        "current": status.map_or(0, |s| s.current),
        "alwaysAllocateCPU": config.always_allocate_cpu,
        "alwaysAllocateGPU": false,
        "scheduledActions": config.scheduled_actions.iter().map(|a| {
            let mut v = json!({
                "name": a.name,
                "scheduleExpression": a.schedule_expression,
                "target": a.target,
            });
            put_opt(&mut v, "timeZone", &a.time_zone);
            put_opt(&mut v, "startTime", &a.start_time);
            put_opt(&mut v, "endTime", &a.end_time);
            v
        }).collect::<Vec<_>>(),
        "targetTrackingPolicies": config.target_tracking_policies.iter().map(|p| {
            let mut v = json!({
                "name": p.name,
                "metricType": p.metric_type,
                "metricTarget": p.metric_target,
                "minCapacity": p.min_capacity,
                "maxCapacity": p.max_capacity,
            });
            put_opt(&mut v, "timeZone", &p.time_zone);
            put_opt(&mut v, "startTime", &p.start_time);
            put_opt(&mut v, "endTime", &p.end_time);
            v
        }).collect::<Vec<_>>(),
    })
}

fn put_opt(v: &mut Value, key: &str, val: &Option<String>) {
    if let Some(s) = val {
        v[key] = s.clone().into();
    }
}

/// The caller's provision configurations, by function name and
/// qualifier: the scheduler's, and those DisableFunctionInvocation keeps for
/// its functions (asking for no instance until they are enabled).
async fn details(gw: &Gateway, caller: &Caller) -> Result<Vec<ProvisionDetail>, ApiError> {
    let mut all = gw.scheduler.provisions(&caller.account_id).await?;
    let (disabled, _) = gw
        .catalog
        .list(&caller.account_id, "", None, usize::MAX, |f| {
            !kept_provisions(f).is_empty()
        });
    for f in disabled {
        for (qualifier, config) in kept_provisions(&f) {
            all.retain(|d| {
                !(d.status.function_name == f.record.name && &d.status.qualifier == qualifier)
            });
            all.push(ProvisionDetail {
                status: ProvisionStatus {
                    account_id: caller.account_id.clone(),
                    function_name: f.record.name.clone(),
                    qualifier: qualifier.clone(),
                    target: config.target,
                    desired: 0,
                    current: 0,
                    zones: Default::default(),
                },
                config: config.clone(),
            });
        }
    }
    all.sort_by(|a, b| {
        (&a.status.function_name, &a.status.qualifier)
            .cmp(&(&b.status.function_name, &b.status.qualifier))
    });
    Ok(all)
}

/// The provision configurations a disabled function keeps, by qualifier.
fn kept_provisions(
    f: &crate::catalog::FunctionEntry,
) -> &std::collections::BTreeMap<String, ProvisionConfig> {
    static NONE: std::collections::BTreeMap<String, ProvisionConfig> =
        std::collections::BTreeMap::new();
    match f.record.config.invocation_restriction.as_ref() {
        Some(r) if r.disable => &r.provisions,
        _ => &NONE,
    }
}

/// FC's `qualifier` of a provision configuration: LATEST or an alias (FC
/// provisions no bare version).
fn provision_qualifier(parts: &http::request::Parts) -> Result<Qualifier, FcError> {
    match super::request::qualifier(parts)? {
        Qualifier::Version(v) => Err(bad(format!(
            "qualifier {v}: a provision configuration is for LATEST or an alias, not a version"
        ))),
        q => Ok(q),
    }
}

/// The spec a provision configuration of `qualifier` keeps started now:
/// LATEST's, or the alias's (major) version's.
pub fn provision_spec(
    gw: &Gateway,
    account: &kiln_core::AccountId,
    name: &FunctionName,
    qualifier: &Qualifier,
) -> Result<kiln_core::InstanceSpec, FcError> {
    let latest = gw
        .catalog
        .function(account, name)
        .ok_or_else(|| super::request::not_found(name))?;
    match qualifier {
        Qualifier::Alias(a) => {
            let alias = gw
                .catalog
                .alias(account, name, a)
                .ok_or_else(|| crate::versions::alias_not_found(name, a))?;
            gw.catalog
                .version(account, name, alias.version)
                .filter(|v| v.entry.record.function_id == latest.record.function_id)
                .map(|v| v.entry.spec.clone())
                .ok_or_else(|| crate::versions::version_not_found(name, &alias.version.to_string()))
        }
        _ => Ok(latest.spec.clone()),
    }
}

/// The configuration's ARN: the function's, with RAM's alias path for an
/// alias's.
fn qualified_arn(gw: &Gateway, caller: &Caller, name: &str, qualifier: &str) -> String {
    let base = arn(gw, caller, name);
    if qualifier == kiln_internal_api::LATEST {
        base
    } else {
        format!("{base}/aliases/{qualifier}")
    }
}

pub async fn put(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let qualifier = provision_qualifier(parts)?;
    let config = parse_input(&body)?;
    let entry = super::request::caller_function(gw, caller, name)?;
    if let Some(reason) = entry.record.config.invocation_disabled() {
        return Err(crate::versions::invocation_disabled(name, reason).into());
    }
    let req = PutProvision {
        spec: provision_spec(gw, &caller.account_id, name, &qualifier)?,
        config: config.clone(),
        qualifier: qualifier.to_string(),
    };
    let status: ProvisionStatus = gw.scheduler.put_provision(&req).await?;
    tracing::info!(function = %name, %qualifier, target = config.target, "provision config set");
    Ok(json_response(
        StatusCode::OK,
        &to_fc(
            &qualified_arn(gw, caller, name.as_str(), &req.qualifier),
            &config,
            Some(&status),
        ),
    ))
}

/// A function without a configuration has none provisioned: FC's shape
/// with zero targets.
pub async fn get(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let qualifier = provision_qualifier(parts)?.to_string();
    super::request::caller_function(gw, caller, name)?;
    let arn = qualified_arn(gw, caller, name.as_str(), &qualifier);
    let found = details(gw, caller)
        .await?
        .into_iter()
        .find(|d| &d.status.function_name == name && d.status.qualifier == qualifier);
    let v = match found {
        Some(d) => to_fc(&arn, &d.config, Some(&d.status)),
        None => to_fc(
            &arn,
            &ProvisionConfig {
                target: 0,
                // What a Put without the field would set.
                always_allocate_cpu: true,
                scheduled_actions: vec![],
                target_tracking_policies: vec![],
            },
            None,
        ),
    };
    Ok(json_response(StatusCode::OK, &v))
}

/// Idempotent: deleting a configuration that is not there succeeds.
pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let qualifier = provision_qualifier(parts)?.to_string();
    let entry = super::request::caller_function(gw, caller, name)?;
    if kept_provisions(&entry).contains_key(&qualifier) {
        // Disabled: the configuration Enable would restore goes instead.
        gw.catalog
            .update(&caller.account_id, name, gw.clock.now_ms(), None, |c| {
                let mut c = c.clone();
                if let Some(r) = c.invocation_restriction.as_mut() {
                    r.provisions.remove(&qualifier);
                }
                Ok(c)
            })
            .await?;
    }
    remove(gw, &caller.account_id, name, &qualifier).await?;
    tracing::info!(function = %name, %qualifier, "provision config deleted");
    Ok(no_content())
}

/// Remove the scheduler's configuration of `qualifier`, if it has one.
pub async fn remove(
    gw: &Gateway,
    account: &kiln_core::AccountId,
    name: &FunctionName,
    qualifier: &str,
) -> Result<(), ApiError> {
    let f = FunctionRef {
        account_id: account.clone(),
        function_name: name.clone(),
        qualifier: qualifier.to_owned(),
    };
    match gw.scheduler.delete_provision(&f).await {
        Ok(()) => Ok(()),
        Err(InternalClientError::Remote { error, .. })
            if error.code == FcErrorCode::FunctionNotFound =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn limit_param(parts: &http::request::Parts) -> Result<usize, FcError> {
    match query_param(parts, "limit").filter(|l| !l.is_empty()) {
        None => Ok(20),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => Ok(n),
            _ => Err(bad(format!("limit {l:?} must be an integer from 1 to 100"))),
        },
    }
}

/// ListProvisionConfigs: the account's configurations by function name
/// (or one function's); `nextToken` is opaque.
pub async fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let limit = limit_param(parts)?;
    let only = query_param(parts, "functionName").filter(|s| !s.is_empty());
    let after = match query_param(parts, "nextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => {
            // `function/qualifier` (or an older Kiln's bare function name).
            let last = super::request::decode_raw_token(&t)?;
            let function = last.split_once('/').map_or(last.as_str(), |(f, _)| f);
            function
                .parse::<FunctionName>()
                .map_err(|_| FcError::invalid_argument("nextToken is invalid"))?;
            Some(last)
        }
    };
    let mut page: Vec<ProvisionDetail> = details(gw, caller)
        .await?
        .into_iter()
        .filter(|d| {
            only.as_deref()
                .is_none_or(|o| o == d.status.function_name.as_str())
        })
        // The token names the last (function, qualifier) returned; an
        // older Kiln's names a function alone: after all of it.
        .filter(|d| {
            after.as_deref().is_none_or(|a| {
                let (f, q) = a.split_once('/').unwrap_or((a, "\u{10FFFF}"));
                (d.status.function_name.as_str(), d.status.qualifier.as_str()) > (f, q)
            })
        })
        // A configuration outliving its function (deleted meanwhile) is
        // not listed.
        .filter(|d| {
            gw.catalog
                .function(&caller.account_id, &d.status.function_name)
                .is_some()
        })
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let mut out = json!({
        "provisionConfigs": page
            .iter()
            .map(|d| {
                let arn = qualified_arn(gw, caller, d.status.function_name.as_str(), &d.status.qualifier);
                to_fc(&arn, &d.config, Some(&d.status))
            })
            .collect::<Vec<_>>(),
    });
    if more {
        if let Some(d) = page.last() {
            let last = format!("{}/{}", d.status.function_name, d.status.qualifier);
            out["nextToken"] = super::request::encode_token(&last).into();
        }
    }
    Ok(json_response(StatusCode::OK, &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ProvisionConfig, FcError> {
        parse_input(v.to_string().as_bytes())
    }

    fn refused(v: Value, says: &str) {
        let e = parse(v).unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
        assert!(e.message.contains(says), "{says:?} not in {:?}", e.message);
    }

    #[test]
    fn fc_input_becomes_the_scheduler_config() {
        let c = parse(json!({
            "target": 2,
            "alwaysAllocateCPU": true,
            "scheduledActions": [{
                "name": "morning", "scheduleExpression": "cron(0 0 8 * * *)",
                "target": 5, "timeZone": "Asia/Shanghai", "startTime": "", "endTime": "2030-01-01T00:00:00Z"
            }],
            "targetTrackingPolicies": [{
                "name": "tt", "metricType": "ProvisionedConcurrencyUtilization",
                "metricTarget": 0.6, "minCapacity": 1, "maxCapacity": 8
            }]
        }))
        .unwrap();
        assert_eq!(c.target, 2);
        assert!(c.always_allocate_cpu);
        let a = &c.scheduled_actions[0];
        assert_eq!(
            (a.target, a.time_zone.as_deref(), a.start_time.as_deref()),
            (5, Some("Asia/Shanghai"), None)
        );
        assert_eq!(a.end_time.as_deref(), Some("2030-01-01T00:00:00Z"));
        let p = &c.target_tracking_policies[0];
        assert_eq!((p.min_capacity, p.max_capacity), (1, 8));
        // defaultTarget wins over target; empty lists are fine.
        let c = parse(json!({"target": 9, "defaultTarget": 3, "scheduledActions": []})).unwrap();
        assert_eq!(c.target, 3);
        // alwaysAllocateCPU is true unless the caller turns it off (FC's
        // default); off, provisioned instances are frozen between calls.
        assert!(c.always_allocate_cpu);
        let off = parse(json!({"target": 1, "alwaysAllocateCPU": false})).unwrap();
        assert!(!off.always_allocate_cpu);
        assert_eq!(to_fc("arn", &off, None)["alwaysAllocateCPU"], false);
        let v = to_fc("arn", &c, None);
        assert_eq!(v["defaultTarget"], 3);
        assert_eq!(v["current"], 0);
    }

    #[test]
    fn bad_input_is_refused_naming_what() {
        refused(json!({}), "target is required");
        refused(json!({"target": -1}), "target must be between 0");
        refused(json!({"target": 10_001}), "target must be between 0");
        refused(json!({"target": "x"}), "not valid");
        refused(json!({"target": 1, "bogus": 1}), "unknown field");
        refused(json!({"target": 1, "alwaysAllocateGPU": true}), "GPU");
        refused(
            json!({"target": 1, "scheduledActions": [{"scheduleExpression": "cron(* * * * * *)", "target": 1}]}),
            "name is required",
        );
        refused(
            json!({"target": 1, "scheduledActions": [{"name": "a", "target": 1}]}),
            "scheduleExpression is required",
        );
        refused(
            json!({"target": 1, "scheduledActions": [
                {"name": "a", "scheduleExpression": "cron(0 0 8 * * *)", "target": 1},
                {"name": "a", "scheduleExpression": "cron(0 0 9 * * *)", "target": 2}]}),
            "used twice",
        );
        refused(
            json!({"target": 1, "scheduledActions": [{"name": "a", "scheduleExpression": "cron(0 0 8 * * *)", "target": -3}]}),
            "target must be between 0",
        );
        let tt = |p: Value| json!({"target": 1, "targetTrackingPolicies": [p]});
        refused(
            tt(json!({"name": "t", "metricTarget": 0.5, "minCapacity": 5, "maxCapacity": 2})),
            "minCapacity 5 is greater than maxCapacity 2",
        );
        refused(
            tt(json!({"name": "t", "metricTarget": 0.0, "minCapacity": 1, "maxCapacity": 2})),
            "metricTarget must be greater than 0",
        );
        refused(
            tt(json!({"name": "t", "metricTarget": -0.5, "minCapacity": 1, "maxCapacity": 2})),
            "metricTarget",
        );
        refused(
            tt(json!({"name": "t", "metricTarget": 1.5, "minCapacity": 1, "maxCapacity": 2})),
            "metricTarget",
        );
        refused(
            tt(
                json!({"name": "t", "metricType": "CPU", "metricTarget": 0.5, "minCapacity": 1, "maxCapacity": 2}),
            ),
            "metricType",
        );
        refused(
            tt(json!({"name": "t", "metricTarget": 0.5, "minCapacity": -1, "maxCapacity": 2})),
            "minCapacity must be between 0",
        );
        refused(
            tt(json!({"name": "t", "minCapacity": 1, "maxCapacity": 2})),
            "metricTarget is required",
        );
    }
}
