//! FC's error vocabulary.
//!
//! Every error that leaves Kiln through the public API carries one of these
//! codes, its HTTP status, a message for the caller and the request id. The
//! internal APIs carry the same codes so that an error raised on an agent
//! (say `FunctionNotStarted`) reaches the caller unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An FC error code. The string form is exactly FC's `Code` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FcErrorCode {
    InvalidArgument,
    MissingRequiredHeader,
    PayloadTooLarge,
    /// FC's code for a request body or payload over its limit (HTTP 400).
    EntityTooLarge,
    FunctionNotFound,
    FunctionAlreadyExists,
    PathNotSupported,
    MethodNotAllowed,
    SignatureNotMatch,
    InvalidAccessKeyId,
    RequestTimeTooSkewed,
    SignatureNonceUsed,
    AccessDenied,
    /// FC's code for a request that would take an account over one of its
    /// resource quotas (functions, code bytes, layers; HTTP 400). Not
    /// retryable: the caller must free something or have the quota raised.
    LimitExceeded,
    ResourceThrottled,
    FunctionNotStarted,
    FunctionTimeout,
    InternalServerError,
    ServiceUnavailable,
    /// The function has no async invoke config (HTTP 404).
    AsyncConfigNotExists,
    /// No async task with that id (HTTP 404).
    AsyncTaskNotFound,
    /// No layer or layer version by that name, version or ARN visible to
    /// the caller (HTTP 404).
    LayerNotFound,
    /// No live instance by that id among the function's (HTTP 404).
    InstanceNotFound,
    /// No published version of the function by that id (HTTP 404).
    VersionNotFound,
    /// No alias of the function by that name (HTTP 404).
    AliasNotFound,
    /// The function already has an alias by that name (HTTP 409).
    AliasAlreadyExists,
    /// No trigger of the function by that name, or no HTTP trigger at
    /// that host (HTTP 404).
    TriggerNotFound,
    /// The function already has a trigger by that name (HTTP 409).
    TriggerAlreadyExists,
    /// No custom domain by that name visible to the caller (HTTP 404).
    DomainNameNotFound,
    /// A custom domain by that name exists, in this account or another
    /// (HTTP 409).
    DomainNameAlreadyExists,
    /// Kiln's (HTTP's 421): a request for a custom domain on a connection
    /// whose TLS was set up for another name (HTTP/2 coalescing, or a
    /// client's SNI unlike its Host); the client retries on a connection
    /// of its own to that domain.
    MisdirectedRequest,
    /// An alias's `additionalVersionWeight` names its own major version
    /// (HTTP 400).
    AdditionalVersionContainsMajorVersion,
    /// A temporary (STS) credential's security token has expired (HTTP 403).
    #[serde(rename = "InvalidSecurityToken.Expired")]
    InvalidSecurityTokenExpired,
    /// A security token that is not one this service issued (HTTP 403).
    #[serde(rename = "InvalidSecurityToken.Malformed")]
    InvalidSecurityTokenMalformed,
    /// A security token issued for another access key (HTTP 403).
    #[serde(rename = "InvalidSecurityToken.MismatchWithAccessKey")]
    InvalidSecurityTokenMismatchWithAccessKey,
    /// RAM's code for a role that does not exist (HTTP 404).
    #[serde(rename = "EntityNotExist.Role")]
    EntityNotExistRole,
    /// No access key by that id (HTTP 404; the operator's key API).
    #[serde(rename = "EntityNotExist.AccessKey")]
    EntityNotExistAccessKey,
    /// DisableFunctionInvocation turned the function's calls off (HTTP
    /// 403, not retryable until EnableFunctionInvocation). FC does not
    /// document the code its invocations then answer; this is Kiln's.
    FunctionInvocationDisabled,
}

impl FcErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "InvalidArgument",
            Self::MissingRequiredHeader => "MissingRequiredHeader",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::EntityTooLarge => "EntityTooLarge",
            Self::FunctionNotFound => "FunctionNotFound",
            Self::FunctionAlreadyExists => "FunctionAlreadyExists",
            Self::PathNotSupported => "PathNotSupported",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::SignatureNotMatch => "SignatureNotMatch",
            Self::InvalidAccessKeyId => "InvalidAccessKeyId",
            Self::RequestTimeTooSkewed => "RequestTimeTooSkewed",
            Self::SignatureNonceUsed => "SignatureNonceUsed",
            Self::AccessDenied => "AccessDenied",
            Self::LimitExceeded => "LimitExceeded",
            Self::ResourceThrottled => "ResourceThrottled",
            Self::FunctionNotStarted => "FunctionNotStarted",
            Self::FunctionTimeout => "FunctionTimeout",
            Self::InternalServerError => "InternalServerError",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::AsyncConfigNotExists => "AsyncConfigNotExists",
            Self::AsyncTaskNotFound => "AsyncTaskNotFound",
            Self::LayerNotFound => "LayerNotFound",
            Self::InstanceNotFound => "InstanceNotFound",
            Self::VersionNotFound => "VersionNotFound",
            Self::AliasNotFound => "AliasNotFound",
            Self::AliasAlreadyExists => "AliasAlreadyExists",
            Self::TriggerNotFound => "TriggerNotFound",
            Self::TriggerAlreadyExists => "TriggerAlreadyExists",
            Self::DomainNameNotFound => "DomainNameNotFound",
            Self::DomainNameAlreadyExists => "DomainNameAlreadyExists",
            Self::MisdirectedRequest => "MisdirectedRequest",
            Self::AdditionalVersionContainsMajorVersion => "AdditionalVersionContainsMajorVersion",
            Self::InvalidSecurityTokenExpired => "InvalidSecurityToken.Expired",
            Self::InvalidSecurityTokenMalformed => "InvalidSecurityToken.Malformed",
            Self::InvalidSecurityTokenMismatchWithAccessKey => {
                "InvalidSecurityToken.MismatchWithAccessKey"
            }
            Self::EntityNotExistRole => "EntityNotExist.Role",
            Self::EntityNotExistAccessKey => "EntityNotExist.AccessKey",
            Self::FunctionInvocationDisabled => "FunctionInvocationDisabled",
        }
    }

    /// The HTTP status FC answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument
            | Self::MissingRequiredHeader
            | Self::EntityTooLarge
            | Self::LimitExceeded
            | Self::AdditionalVersionContainsMajorVersion => 400,
            Self::SignatureNotMatch
            | Self::InvalidAccessKeyId
            | Self::RequestTimeTooSkewed
            | Self::SignatureNonceUsed
            | Self::AccessDenied
            | Self::InvalidSecurityTokenExpired
            | Self::InvalidSecurityTokenMalformed
            | Self::InvalidSecurityTokenMismatchWithAccessKey
            | Self::FunctionInvocationDisabled => 403,
            Self::FunctionNotFound
            | Self::PathNotSupported
            | Self::AsyncConfigNotExists
            | Self::AsyncTaskNotFound
            | Self::LayerNotFound
            | Self::InstanceNotFound
            | Self::VersionNotFound
            | Self::AliasNotFound
            | Self::TriggerNotFound
            | Self::DomainNameNotFound
            | Self::EntityNotExistRole
            | Self::EntityNotExistAccessKey => 404,
            Self::MethodNotAllowed => 405,
            Self::MisdirectedRequest => 421,
            Self::FunctionAlreadyExists
            | Self::AliasAlreadyExists
            | Self::TriggerAlreadyExists
            | Self::DomainNameAlreadyExists => 409,
            Self::PayloadTooLarge => 413,
            Self::ResourceThrottled => 429,
            Self::InternalServerError => 500,
            Self::FunctionNotStarted => 502,
            Self::ServiceUnavailable => 503,
            Self::FunctionTimeout => 504,
        }
    }

    /// Whether a caller (or the async dispatcher) may retry the same call.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::ResourceThrottled | Self::ServiceUnavailable | Self::InternalServerError
        )
    }
}

impl fmt::Display for FcErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an FC code alone cannot say about an internal failure, so that a
/// service further along acts on a type instead of reading the message.
/// Carried on the internal APIs only; FC's public error shape has no such
/// field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FcErrorKind {
    /// The function's initializer failed or timed out (an agent's create
    /// error, code `FunctionNotStarted`): the invocation fails as FC's
    /// `UnhandledInitializationError`, not as a platform error.
    Initialization,
    /// A standby scheduler turned the call away (code
    /// `ServiceUnavailable`; the message names the leader): the caller
    /// tries the next scheduler it knows.
    NotLeader,
}

/// An error with FC's code and a message meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FcError {
    pub code: FcErrorCode,
    pub message: String,
    /// Set on internal errors a caller must tell apart (see
    /// [`FcErrorKind`]); never part of a public answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FcErrorKind>,
}

impl FcError {
    pub fn new(code: FcErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            kind: None,
        }
    }

    /// This error, marked with `kind` for the services it crosses.
    pub fn with_kind(mut self, kind: FcErrorKind) -> Self {
        self.kind = Some(kind);
        self
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(FcErrorCode::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(FcErrorCode::InternalServerError, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(FcErrorCode::ServiceUnavailable, message)
    }

    pub fn throttled(message: impl Into<String>) -> Self {
        Self::new(FcErrorCode::ResourceThrottled, message)
    }

    /// FC's JSON body: `{"Code","Message","RequestId"}`.
    pub fn to_body(&self, request_id: &str) -> String {
        serde_json::json!({
            "Code": self.code.as_str(),
            "Message": self.message,
            "RequestId": request_id,
        })
        .to_string()
    }

    /// The internal APIs' error body: FC's shape plus `Kind` when set, so
    /// the kind survives the hops between services.
    pub fn to_internal_body(&self, request_id: &str) -> String {
        let mut v = serde_json::json!({
            "Code": self.code.as_str(),
            "Message": self.message,
            "RequestId": request_id,
        });
        if let Some(kind) = self.kind {
            v["Kind"] = serde_json::to_value(kind).expect("a kind serialises");
        }
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_fc_shape() {
        let e = FcError::new(FcErrorCode::FunctionNotFound, "function 'x' does not exist");
        let v: serde_json::Value = serde_json::from_str(&e.to_body("r-1")).unwrap();
        assert_eq!(v["Code"], "FunctionNotFound");
        assert_eq!(v["Message"], "function 'x' does not exist");
        assert_eq!(v["RequestId"], "r-1");
        assert_eq!(e.code.http_status(), 404);
    }

    #[test]
    fn a_kind_crosses_internal_bodies_only() {
        let e = FcError::new(FcErrorCode::FunctionNotStarted, "init failed")
            .with_kind(FcErrorKind::Initialization);
        let public: serde_json::Value = serde_json::from_str(&e.to_body("r")).unwrap();
        assert!(public.get("Kind").is_none(), "{public}");
        let internal: serde_json::Value = serde_json::from_str(&e.to_internal_body("r")).unwrap();
        assert_eq!(internal["Kind"], "initialization");
        assert_eq!(internal["Code"], "FunctionNotStarted");
        let plain: serde_json::Value =
            serde_json::from_str(&FcError::internal("x").to_internal_body("r")).unwrap();
        assert!(plain.get("Kind").is_none(), "{plain}");
    }

    #[test]
    fn dotted_codes_serialise_as_their_fc_string() {
        for code in [
            FcErrorCode::InvalidSecurityTokenExpired,
            FcErrorCode::InvalidSecurityTokenMalformed,
            FcErrorCode::InvalidSecurityTokenMismatchWithAccessKey,
            FcErrorCode::EntityNotExistRole,
            FcErrorCode::EntityNotExistAccessKey,
            FcErrorCode::FunctionInvocationDisabled,
        ] {
            let s = serde_json::to_string(&code).unwrap();
            assert_eq!(s, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<FcErrorCode>(&s).unwrap(), code);
        }
    }

    #[test]
    fn code_serialises_as_fc_string() {
        let s = serde_json::to_string(&FcErrorCode::ResourceThrottled).unwrap();
        assert_eq!(s, "\"ResourceThrottled\"");
    }
}
