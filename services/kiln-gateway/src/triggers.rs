//! Triggers (FC's CreateTrigger and friends): what a trigger is, its
//! checked configuration, and the index the catalog keeps of them.
//!
//! Two trigger types exist in Kiln, as in FC: `http` (the function answers
//! HTTP requests at its own host name, see [`crate::http_trigger`]) and
//! `timer` (a cron schedule; stored and validated here, fired by the timer
//! service, which is not part of this module). Every other FC type (oss,
//! log, mns_topic, cdn_events, eventbridge, ...) is refused: Kiln has no
//! such event source, and accepting one would be a trigger that never
//! fires.
//!
//! A trigger names its function and a qualifier (LATEST, a version or an
//! alias); a function cannot be deleted while it has triggers (FC's rule).
//! An HTTP trigger's host label (`{function}-{id}`) is unique across all
//! accounts: the gateway finds the trigger of a request by its Host.
//!
//! The index lives in the [`Catalog`] beside functions and versions and is
//! written under the catalog's write lock, store first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::Method;
use kiln_core::{AccountId, FcError, FcErrorCode, FunctionName};
use serde::{Deserialize, Serialize};

use crate::catalog::{blocking, Catalog, CatalogError};
use crate::versions::Qualifier;

/// At most this many triggers per function.
pub const TRIGGERS_MAX: usize = 50;
/// At most this many characters in a trigger description.
pub const DESCRIPTION_MAX: usize = 256;
/// The largest `triggerConfig` string taken.
pub const CONFIG_MAX: usize = 16 * 1024;
/// The largest timer `payload`.
pub const TIMER_PAYLOAD_MAX: usize = 4 * 1024;

/// The trigger types Kiln serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerType {
    Http,
    Timer,
}

impl TriggerType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Timer => "timer",
        }
    }

    /// FC's `triggerType`: `http` or `timer`; FC's other types are named
    /// and refused.
    pub fn parse(s: &str) -> Result<Self, FcError> {
        match s {
            "http" => Ok(Self::Http),
            "timer" => Ok(Self::Timer),
            "oss" | "log" | "mns_topic" | "cdn_events" | "tablestore" | "eventbridge"
            | "rdb" | "kafka" | "rocketmq" | "rabbitmq" | "mqtt" | "mns" => {
                Err(FcError::invalid_argument(format!(
                    "triggerType {s:?} is not supported by Kiln: it has no such event source; use http or timer"
                )))
            }
            _ => Err(FcError::invalid_argument(format!(
                "triggerType {s:?} is unknown; use http or timer"
            ))),
        }
    }
}

/// FC's HTTP trigger `authType`s that Kiln serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthType {
    /// No signature: anyone who knows the URL may call.
    Anonymous,
    /// The request carries an ACS3-HMAC-SHA256 signature of a key of the
    /// function's account, checked like an API call's.
    Function,
}

/// `HTTPTriggerConfig`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpTriggerConfig {
    pub methods: Vec<String>,
    pub auth_type: AuthType,
    pub disable_url_internet: bool,
}

impl HttpTriggerConfig {
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method.as_str())
    }
}

/// `TimerTriggerConfig`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerTriggerConfig {
    pub cron_expression: String,
    pub payload: String,
    pub enable: bool,
}

/// A trigger's configuration by type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum TriggerConfig {
    Http(HttpTriggerConfig),
    Timer(TimerTriggerConfig),
}

impl TriggerConfig {
    pub fn trigger_type(&self) -> TriggerType {
        match self {
            Self::Http(_) => TriggerType::Http,
            Self::Timer(_) => TriggerType::Timer,
        }
    }

    /// FC's `triggerConfig`: a JSON document in a string, checked for
    /// `trigger_type`.
    pub fn parse(trigger_type: TriggerType, raw: &str) -> Result<Self, FcError> {
        if raw.len() > CONFIG_MAX {
            return Err(FcError::invalid_argument(format!(
                "triggerConfig is longer than {CONFIG_MAX} bytes"
            )));
        }
        let invalid = |e: serde_json::Error| {
            FcError::invalid_argument(format!(
                "triggerConfig is not a valid {} trigger configuration: {e}",
                trigger_type.as_str()
            ))
        };
        match trigger_type {
            TriggerType::Http => {
                let c: RawHttpConfig = serde_json::from_str(raw).map_err(invalid)?;
                c.check().map(Self::Http)
            }
            TriggerType::Timer => {
                let c: RawTimerConfig = serde_json::from_str(raw).map_err(invalid)?;
                c.check().map(Self::Timer)
            }
        }
    }
}

/// `HTTPTriggerConfig` as FC spells it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHttpConfig {
    methods: Option<Vec<String>>,
    auth_type: Option<String>,
    #[serde(rename = "disableURLInternet")]
    disable_url_internet: Option<bool>,
    auth_config: Option<serde_json::Value>,
    cors_config: Option<serde_json::Value>,
}

/// The methods an HTTP trigger may accept (FC's list).
const HTTP_METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"];

impl RawHttpConfig {
    fn check(self) -> Result<HttpTriggerConfig, FcError> {
        let methods = self
            .methods
            .filter(|m| !m.is_empty())
            .ok_or_else(|| FcError::invalid_argument("triggerConfig.methods is required: a list of HTTP methods such as [\"GET\", \"POST\"]"))?;
        let mut out: Vec<String> = Vec::new();
        for m in methods {
            let up = m.to_ascii_uppercase();
            if !HTTP_METHODS.contains(&up.as_str()) {
                return Err(FcError::invalid_argument(format!(
                    "triggerConfig.methods: {m:?} is not one of {}",
                    HTTP_METHODS.join(", ")
                )));
            }
            if !out.contains(&up) {
                out.push(up);
            }
        }
        let auth_type = match self.auth_type.as_deref() {
            None | Some("anonymous") => AuthType::Anonymous,
            Some("function") => AuthType::Function,
            Some(other) => {
                return Err(FcError::invalid_argument(format!(
                    "triggerConfig.authType {other:?} is not supported: use anonymous or function"
                )))
            }
        };
        if self.auth_config.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(FcError::invalid_argument(
                "triggerConfig.authConfig configures jwt authentication, which Kiln does not support; leave it out",
            ));
        }
        if self.cors_config.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(FcError::invalid_argument(
                "triggerConfig.corsConfig is not supported by Kiln yet; leave it out and answer CORS in the function",
            ));
        }
        Ok(HttpTriggerConfig {
            methods: out,
            auth_type,
            disable_url_internet: self.disable_url_internet.unwrap_or(false),
        })
    }
}

/// `TimerTriggerConfig` as FC spells it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTimerConfig {
    cron_expression: Option<String>,
    payload: Option<String>,
    enable: Option<bool>,
}

impl RawTimerConfig {
    fn check(self) -> Result<TimerTriggerConfig, FcError> {
        let cron = self
            .cron_expression
            .ok_or_else(|| FcError::invalid_argument("triggerConfig.cronExpression is required"))?;
        check_cron(&cron).map_err(FcError::invalid_argument)?;
        let payload = self.payload.unwrap_or_default();
        if payload.len() > TIMER_PAYLOAD_MAX {
            return Err(FcError::invalid_argument(format!(
                "triggerConfig.payload is longer than {TIMER_PAYLOAD_MAX} bytes"
            )));
        }
        Ok(TimerTriggerConfig {
            cron_expression: cron,
            payload,
            enable: self.enable.unwrap_or(true),
        })
    }
}

/// FC's timer `cronExpression` forms: `@every 1m` (a whole number of
/// minutes or hours, at least one minute), or six cron fields (seconds
/// minutes hours day-of-month month day-of-week, UTC) optionally prefixed
/// with `CRON_TZ=<IANA zone> `. Parsed by croner.
pub fn check_cron(expr: &str) -> Result<(), String> {
    crate::timers::Schedule::of(expr, 0).map(drop)
}

/// `1m`, `90m`, `2h`, `1h30m` in seconds.
pub(crate) fn parse_every(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut num = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total = total.checked_add(match c {
            'h' => n.checked_mul(3600)?,
            'm' => n.checked_mul(60)?,
            's' => n,
            _ => return None,
        })?;
        any = true;
    }
    (num.is_empty() && any).then_some(total)
}

/// A trigger name: FC's rule (1 to 128 letters, digits, `_` or `-`, not
/// starting with a digit or `-`).
pub fn check_trigger_name(s: &str) -> Result<(), FcError> {
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FcError::invalid_argument(format!(
            "triggerName {s:?} is invalid: 1 to 128 letters, digits, '_' or '-', not starting with a digit or '-'"
        )))
    }
}

pub fn check_description(s: &str) -> Result<(), FcError> {
    if s.chars().count() > DESCRIPTION_MAX {
        return Err(FcError::invalid_argument(format!(
            "description is longer than {DESCRIPTION_MAX} characters"
        )));
    }
    Ok(())
}

/// FC's TriggerNotFound.
pub fn trigger_not_found(name: &FunctionName, trigger: &str) -> FcError {
    FcError::new(
        FcErrorCode::TriggerNotFound,
        format!("trigger '{trigger}' of function '{name}' does not exist"),
    )
}

/// One trigger as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRecord {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    pub trigger_name: String,
    pub trigger_id: String,
    /// `triggerConfig` as the caller wrote it (FC returns the string).
    pub config_raw: String,
    pub config: TriggerConfig,
    /// LATEST, a version id or an alias name.
    pub qualifier: String,
    pub invocation_role: String,
    pub source_arn: String,
    pub description: String,
    /// An HTTP trigger's host label (`{function}-{id}`), unique.
    pub host_label: Option<String>,
    pub created_ms: u64,
    pub modified_ms: u64,
}

impl TriggerRecord {
    pub fn qualifier(&self) -> Qualifier {
        Qualifier::parse(Some(&self.qualifier)).unwrap_or(Qualifier::Latest)
    }

    pub fn http(&self) -> Option<&HttpTriggerConfig> {
        match &self.config {
            TriggerConfig::Http(h) => Some(h),
            TriggerConfig::Timer(_) => None,
        }
    }
}

/// A new HTTP trigger's host label: the function's name made a DNS label
/// (lower case, `_` as `-`, at most 40 characters) and a random id.
pub fn new_host_label(function: &FunctionName) -> String {
    use rand::Rng as _;
    let mut base: String = function
        .as_str()
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .take(40)
        .collect();
    while base.ends_with('-') {
        base.pop();
    }
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let id: String = (0..10)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    if base.is_empty() {
        id
    } else {
        format!("{base}-{id}")
    }
}

/// Every trigger, by account, function and name, and HTTP triggers by host
/// label.
#[derive(Debug, Default)]
pub struct TriggerIndex {
    by_function: HashMap<AccountId, HashMap<String, BTreeMap<String, Arc<TriggerRecord>>>>,
    by_host: HashMap<String, Arc<TriggerRecord>>,
}

impl TriggerIndex {
    pub fn load(records: Vec<TriggerRecord>) -> Self {
        let mut index = Self::default();
        for r in records {
            index.insert(Arc::new(r));
        }
        index
    }

    fn insert(&mut self, r: Arc<TriggerRecord>) {
        if let Some(label) = &r.host_label {
            self.by_host.insert(label.clone(), r.clone());
        }
        self.by_function
            .entry(r.account_id.clone())
            .or_default()
            .entry(r.function_name.to_string())
            .or_default()
            .insert(r.trigger_name.clone(), r);
    }

    fn remove(&mut self, account: &AccountId, name: &FunctionName, trigger: &str) {
        let Some(m) = self.by_function.get_mut(account) else {
            return;
        };
        if let Some(f) = m.get_mut(name.as_str()) {
            if let Some(r) = f.remove(trigger) {
                if let Some(label) = &r.host_label {
                    self.by_host.remove(label);
                }
            }
            if f.is_empty() {
                m.remove(name.as_str());
            }
        }
    }

    fn of(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Option<&BTreeMap<String, Arc<TriggerRecord>>> {
        self.by_function.get(account)?.get(name.as_str())
    }
}

/// A new trigger or the fields an update changes.
#[derive(Debug, Clone, Default)]
pub struct TriggerChange {
    pub config: Option<(String, TriggerConfig)>,
    pub qualifier: Option<String>,
    pub invocation_role: Option<String>,
    pub description: Option<String>,
}

impl Catalog {
    fn trigger_index(&self) -> std::sync::RwLockReadGuard<'_, TriggerIndex> {
        self.triggers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn trigger_index_mut(&self) -> std::sync::RwLockWriteGuard<'_, TriggerIndex> {
        self.triggers.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The function's triggers, by name.
    pub fn triggers_of(&self, account: &AccountId, name: &FunctionName) -> Vec<Arc<TriggerRecord>> {
        self.trigger_index()
            .of(account, name)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn trigger(
        &self,
        account: &AccountId,
        name: &FunctionName,
        trigger: &str,
    ) -> Option<Arc<TriggerRecord>> {
        self.trigger_index()
            .of(account, name)?
            .get(trigger)
            .cloned()
    }

    /// Every timer trigger, of every account.
    pub fn timer_triggers(&self) -> Vec<Arc<TriggerRecord>> {
        self.trigger_index()
            .by_function
            .values()
            .flat_map(|functions| functions.values())
            .flat_map(|triggers| triggers.values())
            .filter(|t| matches!(t.config, TriggerConfig::Timer(_)))
            .cloned()
            .collect()
    }

    /// The HTTP trigger whose host label is `label`.
    pub fn trigger_by_host(&self, label: &str) -> Option<Arc<TriggerRecord>> {
        self.trigger_index().by_host.get(label).cloned()
    }

    /// Whether the function has triggers (it cannot be deleted before
    /// they are).
    pub(crate) fn has_triggers(&self, account: &AccountId, name: &FunctionName) -> bool {
        self.trigger_index()
            .of(account, name)
            .is_some_and(|m| !m.is_empty())
    }

    /// Whether any trigger of the function names `qualifier`.
    pub(crate) fn trigger_on(
        &self,
        account: &AccountId,
        name: &FunctionName,
        qualifier: &str,
    ) -> Option<Arc<TriggerRecord>> {
        self.trigger_index()
            .of(account, name)?
            .values()
            .find(|t| t.qualifier == qualifier)
            .cloned()
    }

    /// Create a trigger. Its qualifier must name something that exists.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_trigger(
        &self,
        account: &AccountId,
        name: &FunctionName,
        trigger: &str,
        config_raw: String,
        config: TriggerConfig,
        change: TriggerChange,
        source_arn: String,
        now_ms: u64,
    ) -> Result<Arc<TriggerRecord>, CatalogError> {
        let _w = self.write.lock().await;
        if self.function(account, name).is_none() {
            return Err(CatalogError::NotFound(name.clone()));
        }
        let invalid = CatalogError::Invalid;
        if self.trigger(account, name, trigger).is_some() {
            return Err(invalid(FcError::new(
                FcErrorCode::TriggerAlreadyExists,
                format!("trigger '{trigger}' of function '{name}' already exists"),
            )));
        }
        if self.triggers_of(account, name).len() >= TRIGGERS_MAX {
            return Err(invalid(FcError::new(
                FcErrorCode::LimitExceeded,
                format!("function '{name}' already has {TRIGGERS_MAX} triggers"),
            )));
        }
        let qualifier = change
            .qualifier
            .clone()
            .unwrap_or_else(|| crate::versions::LATEST.to_owned());
        self.check_trigger_qualifier(account, name, &qualifier)?;
        // FC: one HTTP trigger per version or alias.
        if config.trigger_type() == TriggerType::Http {
            if let Some(other) = self
                .triggers_of(account, name)
                .iter()
                .find(|t| t.http().is_some() && t.qualifier == qualifier)
            {
                return Err(invalid(FcError::invalid_argument(format!(
                    "function '{name}' already has HTTP trigger '{}' for qualifier {qualifier}: one HTTP trigger per version or alias",
                    other.trigger_name
                ))));
            }
        }
        let host_label = (config.trigger_type() == TriggerType::Http).then(|| new_host_label(name));
        let record = TriggerRecord {
            account_id: account.clone(),
            function_name: name.clone(),
            trigger_name: trigger.to_owned(),
            trigger_id: uuid::Uuid::new_v4().to_string(),
            config_raw,
            config,
            qualifier,
            invocation_role: change.invocation_role.unwrap_or_default(),
            source_arn,
            description: change.description.unwrap_or_default(),
            host_label,
            created_ms: now_ms,
            modified_ms: now_ms,
        };
        let store = self.store.clone();
        let r = record.clone();
        blocking(move || Ok(store.insert_trigger(&r)?)).await?;
        let record = Arc::new(record);
        self.trigger_index_mut().insert(record.clone());
        Ok(record)
    }

    /// Change a trigger's configuration (of the same type), qualifier,
    /// role or description.
    pub async fn update_trigger(
        &self,
        account: &AccountId,
        name: &FunctionName,
        trigger: &str,
        change: TriggerChange,
        now_ms: u64,
    ) -> Result<Arc<TriggerRecord>, CatalogError> {
        let _w = self.write.lock().await;
        if self.function(account, name).is_none() {
            return Err(CatalogError::NotFound(name.clone()));
        }
        let current = self
            .trigger(account, name, trigger)
            .ok_or_else(|| CatalogError::Invalid(trigger_not_found(name, trigger)))?;
        let mut record = (*current).clone();
        if let Some((raw, config)) = change.config {
            if config.trigger_type() != record.config.trigger_type() {
                return Err(CatalogError::Invalid(FcError::invalid_argument(
                    "a trigger's type cannot change: delete the trigger and create another",
                )));
            }
            record.config_raw = raw;
            record.config = config;
        }
        if let Some(q) = change.qualifier {
            self.check_trigger_qualifier(account, name, &q)?;
            record.qualifier = q;
        }
        if let Some(r) = change.invocation_role {
            record.invocation_role = r;
        }
        if let Some(d) = change.description {
            record.description = d;
        }
        record.modified_ms = now_ms.max(record.created_ms);
        let store = self.store.clone();
        let r = record.clone();
        blocking(move || Ok(store.update_trigger(&r)?)).await?;
        let record = Arc::new(record);
        let mut index = self.trigger_index_mut();
        index.remove(account, name, trigger);
        index.insert(record.clone());
        Ok(record)
    }

    pub async fn delete_trigger(
        &self,
        account: &AccountId,
        name: &FunctionName,
        trigger: &str,
    ) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        if self.function(account, name).is_none() {
            return Err(CatalogError::NotFound(name.clone()));
        }
        if self.trigger(account, name, trigger).is_none() {
            return Err(CatalogError::Invalid(trigger_not_found(name, trigger)));
        }
        let store = self.store.clone();
        let (a, n, t) = (account.clone(), name.clone(), trigger.to_owned());
        blocking(move || Ok(store.delete_trigger(&a, &n, &t)?)).await?;
        self.trigger_index_mut().remove(account, name, trigger);
        Ok(())
    }

    fn check_trigger_qualifier(
        &self,
        account: &AccountId,
        name: &FunctionName,
        qualifier: &str,
    ) -> Result<(), CatalogError> {
        let q = Qualifier::parse(Some(qualifier)).map_err(CatalogError::Invalid)?;
        self.check_qualifier(account, name, &q)
            .map_err(CatalogError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_configs_are_checked() {
        let c = TriggerConfig::parse(
            TriggerType::Http,
            r#"{"methods":["get","POST","GET"],"authType":"function","disableURLInternet":false}"#,
        )
        .unwrap();
        let TriggerConfig::Http(h) = c else { panic!() };
        assert_eq!(h.methods, ["GET", "POST"]);
        assert_eq!(h.auth_type, AuthType::Function);
        assert!(h.allows(&Method::GET) && !h.allows(&Method::PUT));
        for bad in [
            "not json",
            r#"{"authType":"anonymous"}"#,
            r#"{"methods":[]}"#,
            r#"{"methods":["BREW"]}"#,
            r#"{"methods":["GET"],"authType":"jwt"}"#,
            r#"{"methods":["GET"],"authConfig":{"jwks":{}}}"#,
            r#"{"methods":["GET"],"corsConfig":{"allowOrigins":["*"]}}"#,
            r#"{"methods":["GET"],"unknown":1}"#,
        ] {
            let e = TriggerConfig::parse(TriggerType::Http, bad).unwrap_err();
            assert_eq!(e.code, FcErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn timer_expressions_take_fcs_forms() {
        for ok in [
            "@every 1m",
            "@every 2h",
            "@every 1h30m",
            "0 0 4 * * *",
            "0 */5 * * * ?",
            "CRON_TZ=Asia/Shanghai 0 0 8 * * MON-FRI",
        ] {
            check_cron(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "@every 30s",
            "@every",
            "@every 1x",
            "* * * * *",
            "0 0 25 * * *",
            "CRON_TZ=Mars/Base 0 0 8 * * *",
            "CRON_TZ=UTC",
        ] {
            assert!(check_cron(bad).is_err(), "{bad}");
        }
        let c = TriggerConfig::parse(
            TriggerType::Timer,
            r#"{"cronExpression":"@every 1m","payload":"{\"a\":1}","enable":false}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            TriggerConfig::Timer(TimerTriggerConfig {
                cron_expression: "@every 1m".into(),
                payload: r#"{"a":1}"#.into(),
                enable: false,
            })
        );
        assert!(TriggerConfig::parse(TriggerType::Timer, r#"{"payload":"x"}"#).is_err());
    }

    #[test]
    fn other_fc_types_are_refused_by_name() {
        assert_eq!(TriggerType::parse("http").unwrap(), TriggerType::Http);
        assert_eq!(TriggerType::parse("timer").unwrap(), TriggerType::Timer);
        let e = TriggerType::parse("oss").unwrap_err();
        assert!(e.message.contains("not supported"), "{}", e.message);
        assert!(TriggerType::parse("HTTP").is_err());
    }

    #[test]
    fn host_labels_are_dns_labels() {
        let l = new_host_label(&"My_Func".parse().unwrap());
        assert!(l.starts_with("my-func-"), "{l}");
        assert!(l.len() <= 63);
        assert!(l
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        assert_ne!(l, new_host_label(&"My_Func".parse().unwrap()));
    }

    #[test]
    fn trigger_names_follow_fc() {
        assert!(check_trigger_name("http_t-1").is_ok());
        for bad in ["", "1x", "-x", "a b", &"x".repeat(129)] {
            assert!(check_trigger_name(bad).is_err(), "{bad}");
        }
    }
}
