//! FC's async invoke config (PutAsyncInvokeConfig and friends): the body a
//! caller sends, its validation, and the stored and answered shapes.

use kiln_core::{FcError, FunctionName};
use serde::{Deserialize, Serialize};

/// Retries on a function error when the config does not say.
pub const DEFAULT_RETRIES: u32 = 3;
pub const RETRIES_MAX: i64 = 8;
/// Message TTL when the config does not say (FC: 24 h).
pub const DEFAULT_AGE_S: u64 = 86_400;
pub const AGE_MAX_S: i64 = 604_800;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    pub destination: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Destination>,
}

/// PutAsyncInvokeConfigInput, plus Kiln's `dedicatedQueue` extension (the
/// function's messages wait in their own queue instead of the account's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AsyncConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_task: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_config: Option<DestinationConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_async_event_age_in_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_async_retry_attempts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated_queue: Option<bool>,
    /// Set by the gateway, refused from callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ms: Option<u64>,
}

/// Where a destination delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Function(FunctionName),
    Webhook(String),
}

impl AsyncConfig {
    /// Parse and check a caller's body; nothing is stored on error.
    pub fn parse(body: &[u8], region: &str, account: &str) -> Result<Self, FcError> {
        let cfg: Self = serde_json::from_slice(body)
            .map_err(|e| FcError::invalid_argument(format!("invalid async invoke config: {e}")))?;
        if cfg.created_ms.is_some() || cfg.modified_ms.is_some() {
            return Err(FcError::invalid_argument(
                "createdMs and modifiedMs are set by the service",
            ));
        }
        cfg.validate(region, account)?;
        Ok(cfg)
    }

    pub fn validate(&self, region: &str, account: &str) -> Result<(), FcError> {
        if let Some(n) = self.max_async_retry_attempts {
            if !(0..=RETRIES_MAX).contains(&n) {
                return Err(FcError::invalid_argument(format!(
                    "maxAsyncRetryAttempts {n} must be between 0 and {RETRIES_MAX}"
                )));
            }
        }
        if let Some(n) = self.max_async_event_age_in_seconds {
            if !(1..=AGE_MAX_S).contains(&n) {
                return Err(FcError::invalid_argument(format!(
                    "maxAsyncEventAgeInSeconds {n} must be between 1 and {AGE_MAX_S}"
                )));
            }
        }
        if let Some(d) = &self.destination_config {
            for (which, dest) in [("onSuccess", &d.on_success), ("onFailure", &d.on_failure)] {
                if let Some(dest) = dest {
                    parse_target(&dest.destination, region, account).map_err(|m| {
                        FcError::invalid_argument(format!("destinationConfig.{which}: {m}"))
                    })?;
                }
            }
        }
        Ok(())
    }

    pub fn retries(&self) -> u32 {
        self.max_async_retry_attempts
            .map_or(DEFAULT_RETRIES, |n| n.clamp(0, RETRIES_MAX) as u32)
    }

    pub fn max_age_ms(&self) -> u64 {
        self.max_async_event_age_in_seconds
            .map_or(DEFAULT_AGE_S, |n| n.clamp(1, AGE_MAX_S) as u64)
            * 1000
    }

    pub fn on_success(&self, region: &str, account: &str) -> Option<Target> {
        let d = self.destination_config.as_ref()?.on_success.as_ref()?;
        parse_target(&d.destination, region, account).ok()
    }

    pub fn on_failure(&self, region: &str, account: &str) -> Option<Target> {
        let d = self.destination_config.as_ref()?.on_failure.as_ref()?;
        parse_target(&d.destination, region, account).ok()
    }

    /// FC's AsyncConfig answer.
    pub fn to_fc(&self, function_arn: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "asyncTask": self.async_task.unwrap_or(false),
            "functionArn": function_arn,
            "maxAsyncEventAgeInSeconds": self.max_age_ms() / 1000,
            "maxAsyncRetryAttempts": self.retries(),
            "createdTime": crate::model::fc_time(self.created_ms.unwrap_or(0)),
            "lastModifiedTime": crate::model::fc_time(self.modified_ms.unwrap_or(0)),
        });
        if let Some(d) = &self.destination_config {
            v["destinationConfig"] = serde_json::to_value(d).expect("serialises");
        }
        if let Some(q) = self.dedicated_queue {
            v["dedicatedQueue"] = q.into();
        }
        v
    }
}

/// A destination: a function of the same account and region by ARN, or an
/// https:// webhook.
pub fn parse_target(s: &str, region: &str, account: &str) -> Result<Target, String> {
    if let Some(rest) = s.strip_prefix("https://") {
        if rest.is_empty()
            || rest.starts_with('/')
            || s.len() > 2048
            || s.contains(char::is_whitespace)
        {
            return Err(format!("{s:?} is not a usable https URL"));
        }
        return Ok(Target::Webhook(s.to_owned()));
    }
    let prefix = format!("acs:fc:{region}:{account}:functions/");
    match s.strip_prefix(&prefix) {
        Some(name) => name
            .parse::<FunctionName>()
            .map(Target::Function)
            .map_err(|e| format!("{s:?}: {}", e.reason)),
        None => Err(format!(
            "{s:?} must be a function ARN ({prefix}<name>) or an https:// URL"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let ok = br#"{"maxAsyncRetryAttempts":1,"maxAsyncEventAgeInSeconds":60,"asyncTask":true,
            "destinationConfig":{"onSuccess":{"destination":"acs:fc:cn-hangzhou:1:functions/sink"},
            "onFailure":{"destination":"https://hooks.example/x"}}}"#;
        let c = AsyncConfig::parse(ok, "cn-hangzhou", "1").unwrap();
        assert_eq!((c.retries(), c.max_age_ms()), (1, 60_000));
        assert_eq!(
            c.on_success("cn-hangzhou", "1"),
            Some(Target::Function("sink".parse().unwrap()))
        );
        assert_eq!(
            c.on_failure("cn-hangzhou", "1"),
            Some(Target::Webhook("https://hooks.example/x".into()))
        );
        assert_eq!(AsyncConfig::default().retries(), DEFAULT_RETRIES);
        for bad in [
            &br#"{"maxAsyncRetryAttempts":9}"#[..],
            br#"{"maxAsyncRetryAttempts":-1}"#,
            br#"{"maxAsyncEventAgeInSeconds":0}"#,
            br#"{"maxAsyncEventAgeInSeconds":604801}"#,
            br#"{"destinationConfig":{"onSuccess":{"destination":"acs:mns:cn-hangzhou:1:/queues/q"}}}"#,
            br#"{"destinationConfig":{"onSuccess":{"destination":"acs:fc:cn-beijing:1:functions/x"}}}"#,
            br#"{"destinationConfig":{"onFailure":{"destination":"http://plain.example"}}}"#,
            br#"{"unknown":1}"#,
            br#"{"createdMs":5}"#,
            b"not json",
        ] {
            let e = AsyncConfig::parse(bad, "cn-hangzhou", "1").unwrap_err();
            assert_eq!(e.code, kiln_core::FcErrorCode::InvalidArgument, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        use std::time::Duration;
        let cap = Duration::from_secs(4);
        let got: Vec<u64> = (1..=6)
            .map(|n| super::super::backoff(n, cap).as_millis() as u64)
            .collect();
        assert_eq!(got, vec![500, 1000, 2000, 4000, 4000, 4000]);
    }
}
