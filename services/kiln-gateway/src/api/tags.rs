//! FC's resource tags on functions (`/2023-03-30/tags-v2`): TagResources,
//! UntagResources, ListTagResources, in the shapes the official SDKs send
//! (`ResourceId` and `Tag`/`TagKey` lists as JSON in the query string for
//! the two that have no body).
//!
//! A function's tags are its `tags` field (`[{"Key", "Value"}]`, what
//! GetFunction shows and ListFunctions filters on); changing them does not
//! touch its instances. A resource is named by its function name or its
//! ARN in the caller's account and region; `ResourceType` is `function`
//! (or the tag service's `ALIYUN::FC::FUNCTION`). At most 20 tags a
//! function; keys of 1-64 characters, not starting with `acs:` or
//! `aliyun` and without `http://` or `https://`, values of at most 256. Every id is checked before any is
//! changed: a bad request changes nothing.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FunctionName};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use super::request::{caller_function, decode_raw_token, encode_token, function_arn, query_param};
use super::respond::{json, no_content, Body};
use crate::auth::Caller;
use crate::catalog::FunctionEntry;
use crate::gateway::Gateway;

pub const TAGS_MAX: usize = 20;
const LIST_LIMIT_DEFAULT: usize = 20;
const LIST_LIMIT_MAX: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct Tag {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct TagResourcesInput {
    resource_id: Vec<String>,
    #[serde(default)]
    resource_type: Option<String>,
    tag: Vec<Tag>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct TagResource {
    resource_id: String,
    resource_type: &'static str,
    tag_key: String,
    tag_value: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ListTagResourcesOutput {
    tag_resources: Vec<TagResource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

fn bad(msg: impl Into<String>) -> FcError {
    FcError::invalid_argument(msg)
}

fn check_type(t: Option<&str>) -> Result<(), FcError> {
    match t {
        None | Some("function") | Some("ALIYUN::FC::FUNCTION") => Ok(()),
        Some(other) => Err(bad(format!(
            "ResourceType {other:?} is not supported: Kiln tags functions (ResourceType function)"
        ))),
    }
}

fn check_tag(t: &Tag) -> Result<(), FcError> {
    let k = t.key.as_str();
    if k.is_empty() || k.chars().count() > 64 {
        return Err(bad(format!("tag key {k:?} must have 1 to 64 characters")));
    }
    let lower = k.to_ascii_lowercase();
    if lower.starts_with("acs:") || lower.starts_with("aliyun") {
        return Err(bad(format!(
            "tag key {k:?} is reserved (keys may not start with acs: or aliyun)"
        )));
    }
    if lower.contains("http://") || lower.contains("https://") {
        return Err(bad(format!("tag key {k:?} may not contain a URL scheme")));
    }
    if t.value.chars().count() > 256 {
        return Err(bad(format!(
            "the value of tag {k:?} is longer than 256 characters"
        )));
    }
    Ok(())
}

/// A function named by its name or its ARN in the caller's account and
/// region.
fn function_of(gw: &Gateway, caller: &Caller, id: &str) -> Result<Arc<FunctionEntry>, ApiError> {
    let prefix = function_arn(gw, caller, "");
    let name = id.strip_prefix(&prefix).unwrap_or(id);
    let name: FunctionName = name
        .parse()
        .map_err(|_| bad(format!("ResourceId {id:?} is neither a function name nor a function ARN of this account and region")))?;
    caller_function(gw, caller, &name)
}

/// One of a function's `tags` (FC's `Tag`: `Key`, `Value`; the lower-case
/// spelling a caller may have used in CreateFunction is read too).
pub fn tag_of(t: &Value) -> Option<(&str, &str)> {
    let field = |upper: &str, lower: &str| {
        t.get(upper)
            .or_else(|| t.get(lower))
            .and_then(Value::as_str)
    };
    Some((field("Key", "key")?, field("Value", "value").unwrap_or("")))
}

/// The tags in a function config's `tags`, in order.
fn tags_of(extras: &std::collections::BTreeMap<String, Value>) -> Vec<(String, String)> {
    extras
        .get("tags")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(tag_of)
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn set_tags(extras: &mut std::collections::BTreeMap<String, Value>, tags: &[(String, String)]) {
    if tags.is_empty() {
        extras.remove("tags");
    } else {
        extras.insert(
            "tags".into(),
            Value::Array(
                tags.iter()
                    .map(|(k, v)| json!({"Key": k, "Value": v}))
                    .collect(),
            ),
        );
    }
}

/// A JSON list in a query parameter, as the SDKs send it.
fn json_query<T: serde::de::DeserializeOwned>(
    parts: &http::request::Parts,
    key: &str,
) -> Result<Option<T>, FcError> {
    match query_param(parts, key).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => serde_json::from_str(&v)
            .map(Some)
            .map_err(|e| bad(format!("{key} must be a JSON list: {e}"))),
    }
}

/// TagResources: add or overwrite the given tags on every resource.
pub async fn tag(
    gw: &Arc<Gateway>,
    caller: &Caller,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input: TagResourcesInput =
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid request body: {e}")))?;
    check_type(input.resource_type.as_deref())?;
    if input.resource_id.is_empty() || input.tag.is_empty() {
        return Err(bad("ResourceId and Tag must each name at least one").into());
    }
    for t in &input.tag {
        check_tag(t)?;
    }
    let entries = input
        .resource_id
        .iter()
        .map(|id| function_of(gw, caller, id))
        .collect::<Result<Vec<_>, _>>()?;
    // Every function must have room before any changes.
    for entry in &entries {
        let name = &entry.record.name;
        let mut tags = tags_of(&entry.record.config.extras);
        merge(&mut tags, &input.tag);
        if tags.len() > TAGS_MAX {
            return Err(bad(format!(
                "function '{name}' would have {} tags, more than {TAGS_MAX}",
                tags.len()
            ))
            .into());
        }
    }
    let now = gw.clock.now_ms();
    for entry in &entries {
        let name = &entry.record.name;
        gw.catalog
            .update(&caller.account_id, name, now, None, |current| {
                let mut config = current.clone();
                let mut tags = tags_of(&config.extras);
                merge(&mut tags, &input.tag);
                if tags.len() > TAGS_MAX {
                    return Err(bad(format!(
                        "function '{name}' would have more than {TAGS_MAX} tags"
                    )));
                }
                set_tags(&mut config.extras, &tags);
                Ok(config)
            })
            .await?;
    }
    Ok(no_content())
}

fn merge(tags: &mut Vec<(String, String)>, new: &[Tag]) {
    for t in new {
        match tags.iter_mut().find(|(k, _)| *k == t.key) {
            Some(existing) => existing.1 = t.value.clone(),
            None => tags.push((t.key.clone(), t.value.clone())),
        }
    }
}

/// UntagResources: remove the given keys (or, with `All=true`, every tag).
pub async fn untag(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    check_type(
        query_param(parts, "ResourceType")
            .as_deref()
            .filter(|t| !t.is_empty()),
    )?;
    let ids: Vec<String> =
        json_query(parts, "ResourceId")?.ok_or_else(|| bad("ResourceId is required"))?;
    let keys: Vec<String> = json_query(parts, "TagKey")?.unwrap_or_default();
    // The Python SDK sends Python's spelling (`True`).
    let all = match query_param(parts, "All")
        .map(|a| a.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(bad(format!("All must be true or false, got {other:?}")).into()),
    };
    if keys.is_empty() && !all {
        return Err(bad("give TagKey, or All=true to remove every tag").into());
    }
    let entries = ids
        .iter()
        .map(|id| function_of(gw, caller, id))
        .collect::<Result<Vec<_>, _>>()?;
    let now = gw.clock.now_ms();
    for entry in &entries {
        let name = &entry.record.name;
        gw.catalog
            .update(&caller.account_id, name, now, None, |current| {
                let mut config = current.clone();
                let mut tags = tags_of(&config.extras);
                tags.retain(|(k, _)| !all && !keys.contains(k));
                set_tags(&mut config.extras, &tags);
                Ok(config)
            })
            .await?;
    }
    Ok(no_content())
}

/// ListTagResources: the tags of the given functions, or of every function
/// of the caller; `Tag` narrows to functions carrying all of those.
pub fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    check_type(
        query_param(parts, "ResourceType")
            .as_deref()
            .filter(|t| !t.is_empty()),
    )?;
    let ids: Option<Vec<String>> = json_query(parts, "ResourceId")?;
    let want: Vec<Tag> = json_query(parts, "Tag")?.unwrap_or_default();
    let limit = match query_param(parts, "Limit").filter(|l| !l.is_empty()) {
        None => LIST_LIMIT_DEFAULT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=LIST_LIMIT_MAX).contains(l))
            .ok_or_else(|| {
                bad(format!(
                    "Limit must be between 1 and {LIST_LIMIT_MAX}, got {l:?}"
                ))
            })?,
    };
    let after = match query_param(parts, "NextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(decode_raw_token(&t)?),
    };
    let mut entries: Vec<Arc<FunctionEntry>> = match ids {
        Some(ids) => ids
            .iter()
            .map(|id| function_of(gw, caller, id))
            .collect::<Result<_, _>>()?,
        None => {
            gw.catalog
                .list(&caller.account_id, "", None, usize::MAX, |_| true)
                .0
        }
    };
    entries.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    entries.dedup_by(|a, b| a.record.name == b.record.name);
    // One row per (function, tag), in name then tag order.
    let mut rows = Vec::new();
    for entry in entries {
        let name = &entry.record.name;
        let tags = tags_of(&entry.record.config.extras);
        let carries = want
            .iter()
            .all(|w| tags.iter().any(|(k, v)| *k == w.key && *v == w.value));
        if !carries {
            continue;
        }
        for (k, v) in tags {
            rows.push((
                format!("{name}\u{0}{k}"),
                TagResource {
                    resource_id: function_arn(gw, caller, name.as_str()),
                    resource_type: "function",
                    tag_key: k,
                    tag_value: v,
                },
            ));
        }
    }
    let mut page: Vec<(String, TagResource)> = rows
        .into_iter()
        .filter(|(cursor, _)| after.as_deref().is_none_or(|a| cursor.as_str() > a))
        .take(limit + 1)
        .collect();
    let next_token = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|(c, _)| encode_token(c))
    } else {
        None
    };
    Ok(json(
        StatusCode::OK,
        &ListTagResourcesOutput {
            tag_resources: page.into_iter().map(|(_, r)| r).collect(),
            next_token,
        },
    ))
}
