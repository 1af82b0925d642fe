//! CreateTrigger, GetTrigger, UpdateTrigger, DeleteTrigger, ListTriggers
//! (see [`crate::triggers`] for what a trigger is and which types Kiln
//! serves; [`crate::http_trigger`] serves HTTP triggers' URLs).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FunctionName};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::request::{caller_function, function_arn, page_by_name};
use super::respond::{json, no_content, Body};
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::model::fc_time;
use crate::triggers::{self, TriggerChange, TriggerConfig, TriggerRecord, TriggerType};

/// `CreateTriggerInput`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateTriggerInput {
    trigger_name: Option<String>,
    trigger_type: Option<String>,
    trigger_config: Option<serde_json::Value>,
    qualifier: Option<String>,
    invocation_role: Option<String>,
    source_arn: Option<String>,
    description: Option<String>,
}

/// `UpdateTriggerInput`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpdateTriggerInput {
    trigger_config: Option<serde_json::Value>,
    qualifier: Option<String>,
    invocation_role: Option<String>,
    description: Option<String>,
}

/// `HTTPTrigger`: the trigger's URLs.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpTriggerUrls {
    url_internet: String,
    url_intranet: String,
}

/// `Trigger`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Trigger {
    trigger_name: String,
    trigger_id: String,
    trigger_type: &'static str,
    /// A JSON document in a string, as FC answers it.
    trigger_config: String,
    qualifier: String,
    invocation_role: String,
    source_arn: String,
    target_arn: String,
    description: String,
    status: &'static str,
    created_time: String,
    last_modified_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_trigger: Option<HttpTriggerUrls>,
}

impl Trigger {
    fn of(gw: &Gateway, caller: &Caller, t: &TriggerRecord) -> Self {
        let http_trigger = t.host_label.as_deref().map(|label| {
            let (url_internet, url_intranet) = gw.http_triggers.urls(label);
            HttpTriggerUrls {
                url_internet,
                url_intranet,
            }
        });
        Self {
            trigger_name: t.trigger_name.clone(),
            trigger_id: t.trigger_id.clone(),
            trigger_type: t.config.trigger_type().as_str(),
            trigger_config: t.config_raw.clone(),
            qualifier: t.qualifier.clone(),
            invocation_role: t.invocation_role.clone(),
            source_arn: t.source_arn.clone(),
            target_arn: function_arn(gw, caller, t.function_name.as_str()),
            description: t.description.clone(),
            status: "OK",
            created_time: fc_time(t.created_ms),
            last_modified_time: fc_time(t.modified_ms),
            http_trigger,
        }
    }
}

/// `ListTriggersOutput`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListTriggersOutput {
    triggers: Vec<Trigger>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

fn body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, FcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| FcError::invalid_argument(format!("request body is invalid: {e}")))
}

/// FC's `triggerConfig`: a JSON document in a string.
fn config_string(v: serde_json::Value) -> Result<String, FcError> {
    match v {
        serde_json::Value::String(s) => Ok(s),
        _ => Err(FcError::invalid_argument(
            "triggerConfig must be a string holding the configuration's JSON, as FC takes it",
        )),
    }
}

fn check_qualifier(q: &str) -> Result<(), FcError> {
    crate::versions::Qualifier::parse(Some(q)).map(|_| ())
}

pub async fn create(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    raw: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input: CreateTriggerInput = body(&raw)?;
    let trigger = input
        .trigger_name
        .ok_or_else(|| FcError::invalid_argument("triggerName is required"))?;
    triggers::check_trigger_name(&trigger)?;
    let trigger_type = TriggerType::parse(
        input
            .trigger_type
            .as_deref()
            .ok_or_else(|| FcError::invalid_argument("triggerType is required"))?,
    )?;
    let config_raw = config_string(
        input
            .trigger_config
            .ok_or_else(|| FcError::invalid_argument("triggerConfig is required"))?,
    )?;
    let config = TriggerConfig::parse(trigger_type, &config_raw)?;
    if let Some(d) = &input.description {
        triggers::check_description(d)?;
    }
    if let Some(q) = &input.qualifier {
        check_qualifier(q)?;
    }
    caller_function(gw, caller, name)?;
    let qualifier = input
        .qualifier
        .clone()
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| crate::versions::LATEST.to_owned());
    let change = TriggerChange {
        config: None,
        qualifier: Some(qualifier),
        invocation_role: input.invocation_role,
        description: input.description,
    };
    let t = gw
        .catalog
        .create_trigger(
            &caller.account_id,
            name,
            &trigger,
            config_raw,
            config,
            change,
            input.source_arn.unwrap_or_default(),
            gw.clock.now_ms(),
        )
        .await?;
    tracing::info!(function = %name, trigger = %t.trigger_name, trigger_type = t.config.trigger_type().as_str(), qualifier = %t.qualifier, "trigger created");
    Ok(json(StatusCode::OK, &Trigger::of(gw, caller, &t)))
}

pub fn get(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    trigger: &str,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    let t = gw
        .catalog
        .trigger(&caller.account_id, name, trigger)
        .ok_or_else(|| triggers::trigger_not_found(name, trigger))?;
    Ok(json(StatusCode::OK, &Trigger::of(gw, caller, &t)))
}

pub async fn update(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    trigger: &str,
    raw: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input: UpdateTriggerInput = body(&raw)?;
    caller_function(gw, caller, name)?;
    let current = gw
        .catalog
        .trigger(&caller.account_id, name, trigger)
        .ok_or_else(|| triggers::trigger_not_found(name, trigger))?;
    let config = match input.trigger_config {
        None => None,
        Some(v) => {
            let raw = config_string(v)?;
            let config = TriggerConfig::parse(current.config.trigger_type(), &raw)?;
            Some((raw, config))
        }
    };
    if let Some(d) = &input.description {
        triggers::check_description(d)?;
    }
    let qualifier = match input.qualifier {
        Some(q) if q.is_empty() => Some(crate::versions::LATEST.to_owned()),
        other => other,
    };
    if let Some(q) = &qualifier {
        check_qualifier(q)?;
        if current.http().is_some() {
            if let Some(other) = gw
                .catalog
                .triggers_of(&caller.account_id, name)
                .iter()
                .find(|t| t.http().is_some() && &t.qualifier == q && t.trigger_name != trigger)
            {
                return Err(FcError::invalid_argument(format!(
                    "function '{name}' already has HTTP trigger '{}' for qualifier {q}: one HTTP trigger per version or alias",
                    other.trigger_name
                ))
                .into());
            }
        }
    }
    let change = TriggerChange {
        config,
        qualifier,
        invocation_role: input.invocation_role,
        description: input.description,
    };
    let t = gw
        .catalog
        .update_trigger(&caller.account_id, name, trigger, change, gw.clock.now_ms())
        .await?;
    tracing::info!(function = %name, trigger = %t.trigger_name, qualifier = %t.qualifier, "trigger updated");
    Ok(json(StatusCode::OK, &Trigger::of(gw, caller, &t)))
}

pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    trigger: &str,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    gw.catalog
        .delete_trigger(&caller.account_id, name, trigger)
        .await?;
    tracing::info!(function = %name, trigger, "trigger deleted");
    Ok(no_content())
}

pub fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    let (page, next_token) = page_by_name(
        parts,
        gw.catalog.triggers_of(&caller.account_id, name),
        |t| &t.trigger_name,
    )?;
    Ok(json(
        StatusCode::OK,
        &ListTriggersOutput {
            triggers: page.iter().map(|t| Trigger::of(gw, caller, t)).collect(),
            next_token,
        },
    ))
}
