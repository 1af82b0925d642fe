//! The agent's answer to an invocation, as the gateway reads it: how the
//! call ended ([`InvokeOutcome`], in the `x-kiln-invoke-outcome` header)
//! and, when the function did not answer itself, why ([`InvokeFailure`],
//! the body). The gateway turns these into FC's shapes; the agent never
//! writes FC's error JSON on this path.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::LeaseOutcome;

/// How an invocation ended on the agent.
///
/// The discriminants index per-outcome metrics ([`InvokeOutcome::ALL`] is
/// in their order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InvokeOutcome {
    /// The function answered with success; the body is its answer.
    Ok = 0,
    /// The function answered with its own error (a non-2xx status, or an
    /// `x-fc-status` other than 2xx); the body is its answer and the
    /// instance stays.
    FunctionError = 1,
    /// The instance crashed, could not be reached or is gone; the body is
    /// an [`InvokeFailure`] and the instance is being replaced.
    InstanceFailed = 2,
    /// The call ran past the function's timeout; the body is an
    /// [`InvokeFailure`] and the instance is destroyed.
    Timeout = 3,
}

/// The header carrying an [`InvokeOutcome`] on the agent's answer.
pub const OUTCOME_HEADER: HeaderName = HeaderName::from_static(crate::headers::INVOKE_OUTCOME);

/// On an HTTP trigger's call from the gateway: the method the function's
/// runtime gets instead of `POST /invoke` (with [`HTTP_PATH_HEADER`]).
/// The gateway never forwards a caller's own `x-kiln-*` headers.
pub const HTTP_METHOD_HEADER: HeaderName = HeaderName::from_static("x-kiln-http-method");
/// On an HTTP trigger's call: the path and query the runtime gets (the
/// request's path under the trigger's URL).
pub const HTTP_PATH_HEADER: HeaderName = HeaderName::from_static("x-kiln-http-path");

/// An `x-kiln-invoke-outcome` value this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the agent answered with an unknown invoke outcome {0:?}")]
pub struct UnknownOutcome(pub String);

impl InvokeOutcome {
    pub const ALL: [InvokeOutcome; 4] = [
        InvokeOutcome::Ok,
        InvokeOutcome::FunctionError,
        InvokeOutcome::InstanceFailed,
        InvokeOutcome::Timeout,
    ];

    /// The wire name (the serde name), also the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::FunctionError => "function-error",
            Self::InstanceFailed => "instance-failed",
            Self::Timeout => "timeout",
        }
    }

    pub fn to_header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }

    /// The outcome an agent's answer carries: `None` when it carries none
    /// (the agent refused the call itself, before any instance saw it).
    pub fn of(headers: &HeaderMap) -> Option<Result<Self, UnknownOutcome>> {
        headers.get(OUTCOME_HEADER).map(Self::from_header)
    }

    pub fn from_header(value: &HeaderValue) -> Result<Self, UnknownOutcome> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str().as_bytes() == value.as_bytes())
            .ok_or_else(|| UnknownOutcome(String::from_utf8_lossy(value.as_bytes()).into_owned()))
    }

    /// Whether the body is the function's own answer.
    pub fn function_answered(self) -> bool {
        matches!(self, Self::Ok | Self::FunctionError)
    }

    /// What the call means for its instance's lease.
    pub fn lease_outcome(self) -> LeaseOutcome {
        if self.function_answered() {
            LeaseOutcome::Ok
        } else {
            LeaseOutcome::InstanceFailed
        }
    }
}

/// Why the function did not answer (the body of an `instance-failed` or
/// `timeout` answer), in words for the caller's `errorMessage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeFailure {
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_through_their_header() {
        for (i, o) in InvokeOutcome::ALL.into_iter().enumerate() {
            assert_eq!(o as usize, i);
            assert_eq!(InvokeOutcome::from_header(&o.to_header()), Ok(o));
            // The header value is the serde name.
            assert_eq!(
                serde_json::to_string(&o).unwrap(),
                format!("\"{}\"", o.as_str())
            );
        }
        assert_eq!(
            InvokeOutcome::from_header(&HeaderValue::from_static("fine")),
            Err(UnknownOutcome("fine".into()))
        );
        let mut h = HeaderMap::new();
        assert_eq!(InvokeOutcome::of(&h), None);
        h.insert(OUTCOME_HEADER, InvokeOutcome::Timeout.to_header());
        assert_eq!(InvokeOutcome::of(&h), Some(Ok(InvokeOutcome::Timeout)));
    }

    #[test]
    fn only_an_answer_keeps_the_instance() {
        assert_eq!(InvokeOutcome::Ok.lease_outcome(), LeaseOutcome::Ok);
        assert_eq!(
            InvokeOutcome::FunctionError.lease_outcome(),
            LeaseOutcome::Ok
        );
        assert_eq!(
            InvokeOutcome::InstanceFailed.lease_outcome(),
            LeaseOutcome::InstanceFailed
        );
        assert_eq!(
            InvokeOutcome::Timeout.lease_outcome(),
            LeaseOutcome::InstanceFailed
        );
    }

    #[test]
    fn failures_are_strict_json() {
        let f: InvokeFailure = serde_json::from_str(r#"{"message":"boom"}"#).unwrap();
        assert_eq!(f.message, "boom");
        assert!(serde_json::from_str::<InvokeFailure>(r#"{"errorMessage":"boom"}"#).is_err());
    }
}
