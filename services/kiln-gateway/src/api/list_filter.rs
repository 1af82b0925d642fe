//! ListFunctions' filters, as FC 3.0 takes them in the query string:
//! `functionName` (exact), `runtime` (exact), `description` (contained),
//! `tags` (a JSON list of `{"Key", "Value"}`, all of them present),
//! `resourceGroupId` (exact), `fcVersion` (`v3`: every Kiln function;
//! `v2`: none) and `gpuType` (Kiln has no GPU functions: none match). A
//! filter that does not parse is InvalidArgument, never ignored.

use kiln_core::FcError;
use serde::Deserialize;
use serde_json::Value;

use super::request::query_param;
use crate::model::FunctionRecord;

#[derive(Debug, Default, PartialEq)]
pub struct ListFilter {
    function_name: Option<String>,
    runtime: Option<String>,
    description: Option<String>,
    tags: Vec<Tag>,
    resource_group_id: Option<String>,
    /// `fcVersion=v2` or a `gpuType`: nothing in Kiln matches.
    nothing: bool,
}

/// FC's `Tag` as the SDKs send it (`Key`, `Value`), or lower-case.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tag {
    #[serde(alias = "Key")]
    key: String,
    #[serde(default, alias = "Value")]
    value: String,
}

impl ListFilter {
    pub fn from_query(parts: &http::request::Parts) -> Result<Self, FcError> {
        let get = |k: &str| query_param(parts, k).filter(|v| !v.is_empty());
        let nothing = match get("fcVersion").as_deref() {
            None | Some("v3") => false,
            Some("v2") => true,
            Some(other) => {
                return Err(FcError::invalid_argument(format!(
                    "fcVersion must be v3 or v2, got {other:?}"
                )))
            }
        } || get("gpuType").is_some();
        let tags = match get("tags") {
            None => Vec::new(),
            Some(t) => serde_json::from_str::<Vec<Tag>>(&t).map_err(|e| {
                FcError::invalid_argument(format!(
                    "tags must be a JSON list of {{\"key\": ..., \"value\": ...}}: {e}"
                ))
            })?,
        };
        Ok(Self {
            function_name: get("functionName"),
            runtime: get("runtime"),
            description: get("description"),
            tags,
            resource_group_id: get("resourceGroupId"),
            nothing,
        })
    }

    pub fn matches(&self, f: &FunctionRecord) -> bool {
        let c = &f.config;
        let extra = |k: &str| c.extras.get(k);
        !self.nothing
            && self
                .function_name
                .as_ref()
                .is_none_or(|n| f.name.as_str() == n)
            && self
                .runtime
                .as_ref()
                .is_none_or(|r| c.runtime.as_str() == r)
            && self
                .description
                .as_ref()
                .is_none_or(|d| c.description.contains(d.as_str()))
            && self.resource_group_id.as_ref().is_none_or(|g| {
                extra("resourceGroupId").and_then(Value::as_str) == Some(g.as_str())
            })
            && self.tags.iter().all(|want| has_tag(extra("tags"), want))
    }
}

/// FC's function `tags`: a list of `{"Key", "Value"}`.
fn has_tag(tags: Option<&Value>, want: &Tag) -> bool {
    tags.and_then(Value::as_array).is_some_and(|list| {
        list.iter()
            .filter_map(super::tags::tag_of)
            .any(|(k, v)| k == want.key && v == want.value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts(query: &str) -> http::request::Parts {
        http::Request::get(format!("/2023-03-30/functions?{query}"))
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn filter(query: &str) -> ListFilter {
        ListFilter::from_query(&parts(query)).unwrap()
    }

    fn function(name: &str, description: &str, extras: Value) -> FunctionRecord {
        let mut f = crate::store::tests::record("100", name, &"a".repeat(64));
        f.config.description = description.into();
        f.config.extras = serde_json::from_value(extras).unwrap();
        f
    }

    #[test]
    fn each_filter_narrows_the_list() {
        let web = function(
            "web",
            "the shop's web front",
            json!({"tags": [{"key": "team", "value": "shop"}, {"key": "tier", "value": "1"}],
                   "resourceGroupId": "rg-a"}),
        );
        let job = function("job", "nightly job", json!({}));
        let all = [&web, &job];
        let names = |f: &ListFilter| -> Vec<&str> {
            all.iter()
                .filter(|r| f.matches(r))
                .map(|r| r.name.as_str())
                .collect()
        };
        assert_eq!(names(&filter("")), ["web", "job"]);
        assert_eq!(names(&filter("functionName=job")), ["job"]);
        assert_eq!(names(&filter("description=web%20front")), ["web"]);
        assert_eq!(names(&filter("runtime=custom")).len(), 2);
        assert!(names(&filter("runtime=custom.debian12")).is_empty());
        let tags = "tags=%5B%7B%22key%22%3A%22team%22%2C%22value%22%3A%22shop%22%7D%5D";
        assert_eq!(names(&filter(tags)), ["web"]);
        let wrong = "tags=%5B%7B%22key%22%3A%22team%22%2C%22value%22%3A%22ops%22%7D%5D";
        assert!(names(&filter(wrong)).is_empty());
        assert_eq!(names(&filter("resourceGroupId=rg-a")), ["web"]);
        assert_eq!(names(&filter("fcVersion=v3")).len(), 2);
        assert!(names(&filter("fcVersion=v2")).is_empty());
        assert!(names(&filter("gpuType=fc.gpu.tesla.1")).is_empty());
    }

    #[test]
    fn a_filter_that_does_not_parse_is_refused() {
        for q in [
            "fcVersion=v4",
            "tags=not-json",
            "tags=%5B%7B%22k%22%3A1%7D%5D",
        ] {
            let err = ListFilter::from_query(&parts(q)).unwrap_err();
            assert_eq!(err.code, kiln_core::FcErrorCode::InvalidArgument, "{q}");
        }
    }
}
