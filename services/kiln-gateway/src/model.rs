//! FC 2023-03-30 JSON models, named exactly as the official SDK names them
//! (`CreateFunctionInput`, `UpdateFunctionInput`, `Function`,
//! `CustomRuntimeConfig`, `InputCodeLocation`, `ListFunctionsOutput`), and
//! the normalised function document the gateway stores.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a function's VPC bindings are kept among its stored fields (not
/// returned by GetFunction: ListVpcBindings returns them).
pub const BINDINGS_KEY: &str = "vpcBindings";
/// The function-level switch to VPC-only inbound access.
pub const DISABLE_INTERNET_KEY: &str = "disableURLInternet";

/// `CreateFunctionInput` / `UpdateFunctionInput`: every field optional here;
/// which ones are required is decided by [`crate::validate`]. Fields Kiln
/// does not implement are inspected on the raw JSON before this is parsed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionInput {
    pub function_name: Option<String>,
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub memory_size: Option<i64>,
    pub cpu: Option<f64>,
    pub disk_size: Option<i64>,
    pub timeout: Option<i64>,
    pub instance_concurrency: Option<i64>,
    pub environment_variables: Option<BTreeMap<String, String>>,
    pub custom_runtime_config: Option<CustomRuntimeConfig>,
    pub code: Option<InputCodeLocation>,
    pub description: Option<String>,
    pub instance_lifecycle_config: Option<InstanceLifecycleConfig>,
    /// Layer version ARNs, in order (see [`crate::layers`]).
    pub layers: Option<Vec<String>>,
    /// For runtime `custom-container` (checked by [`crate::validate`]).
    pub custom_container_config: Option<CustomContainerConfigInput>,
}

/// `CustomContainerConfig` as a create or update body gives it. Fields
/// Kiln does not implement are refused by name in [`crate::validate`];
/// `resolvedImageUri` is GetFunction's output and ignored on input, as FC
/// does.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomContainerConfigInput {
    pub image: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub port: Option<i64>,
    pub health_check_config: Option<Value>,
    pub registry_config: Option<RegistryConfigInput>,
    pub acceleration_type: Option<String>,
    pub acceleration_info: Option<Value>,
    pub acr_instance_id: Option<String>,
    pub resolved_image_uri: Option<String>,
}

/// FC's `RegistryConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryConfigInput {
    pub auth_config: Option<RegistryAuthConfigInput>,
    pub cert_config: Option<RegistryCertConfigInput>,
    pub network_config: Option<Value>,
}

/// FC's `RegistryAuthConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryAuthConfigInput {
    pub user_name: Option<String>,
    pub password: Option<String>,
}

/// FC's `RegistryCertConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryCertConfigInput {
    pub insecure: Option<bool>,
    pub root_ca_cert_base64: Option<String>,
}

/// A custom-container function's image as stored. The registry password
/// is sealed with the environment ([`FunctionConfig::take_secrets`]),
/// never written in the plain document, never returned by GetFunction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerConfig {
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Echoed; Kiln's readiness check is the port, as for custom runtimes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_config: Option<Value>,
    /// Echoed: image acceleration is a pull optimisation of FC's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceleration_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_password: Option<String>,
}

impl ContainerConfig {
    /// FC's `customContainerConfig` as GetFunction shows it: the password
    /// never appears.
    pub fn to_fc(&self, port: u16) -> Value {
        let mut v = serde_json::json!({
            "image": self.image,
            "port": port,
        });
        if !self.entrypoint.is_empty() {
            v["entrypoint"] = serde_json::json!(self.entrypoint);
        }
        if !self.command.is_empty() {
            v["command"] = serde_json::json!(self.command);
        }
        if let Some(h) = &self.health_check_config {
            v["healthCheckConfig"] = h.clone();
        }
        if let Some(a) = &self.acceleration_type {
            v["accelerationType"] = serde_json::json!(a);
        }
        if let Some(u) = &self.registry_username {
            v["registryConfig"] = serde_json::json!({"authConfig": {"userName": u}});
        }
        v
    }
}

/// `InstanceLifecycleConfig`: FC's Initializer and PreStop hooks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceLifecycleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer: Option<LifecycleHook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_stop: Option<LifecycleHook>,
}

/// `LifecycleHook`: a hook's handler and timeout in seconds (`command` is
/// in FC's model but refused by [`crate::validate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LifecycleHook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

impl LifecycleHook {
    fn from_core(h: &kiln_core::LifecycleHook) -> Self {
        Self {
            command: None,
            handler: Some(h.handler.clone()),
            timeout: Some(i64::from(h.timeout_s)),
        }
    }
}

/// `CustomRuntimeConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomRuntimeConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Accepted by the SDK's model; Kiln's readiness check is the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_config: Option<Value>,
}

/// `InputCodeLocation`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputCodeLocation {
    pub zip_file: Option<String>,
    pub checksum: Option<String>,
    pub oss_bucket_name: Option<String>,
    pub oss_object_name: Option<String>,
}

/// The stored, complete and validated configuration of one function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    pub runtime: kiln_core::RuntimeName,
    pub handler: String,
    pub memory_mb: u32,
    pub cpu_milli: u32,
    /// The caller chose the vCPU; otherwise it follows memory on update.
    pub cpu_explicit: bool,
    pub disk_mb: u32,
    pub timeout_s: u32,
    pub concurrency: u32,
    pub environment: BTreeMap<String, String>,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub port: u16,
    pub description: String,
    pub code: CodeRef,
    /// `instanceLifecycleConfig.initializer`, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer: Option<kiln_core::LifecycleHook>,
    /// `instanceLifecycleConfig.preStop`, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_stop: Option<kiln_core::LifecycleHook>,
    /// FC's `layers`, resolved when the function was written, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerRef>,
    /// FC fields Kiln accepts without acting on them, echoed back as given.
    pub extras: BTreeMap<String, Value>,
    /// Set by Disable/EnableFunctionInvocation, never by the function's
    /// own Create or Update; a published version's snapshot has none (the
    /// function's applies to every qualifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_restriction: Option<InvocationRestriction>,
    /// FC's `customContainerConfig`, for runtime `custom-container` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerConfig>,
}

/// Where the registry password sits among a function's sealed values.
const REGISTRY_PASSWORD_KEY: &str = kiln_core::REGISTRY_PASSWORD_KEY;

/// Whether a function's calls are turned off (FC's
/// `invocationRestriction`), and what EnableFunctionInvocation restores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvocationRestriction {
    pub disable: bool,
    pub reason: String,
    pub modified_ms: u64,
    /// The provision configurations the function had when it was
    /// disabled, by qualifier (LATEST or an alias; their instances were
    /// destroyed and the scheduler's copies deleted):
    /// EnableFunctionInvocation puts them back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provisions: BTreeMap<String, kiln_internal_api::ProvisionConfig>,
}

impl InvocationRestriction {
    /// FC's shape: `{disable, reason, lastModifiedTime}`.
    pub fn to_fc(&self) -> Value {
        serde_json::json!({
            "disable": self.disable,
            "reason": self.reason,
            "lastModifiedTime": fc_time(self.modified_ms),
        })
    }
}

impl FunctionConfig {
    /// What PublishFunctionVersion keeps: everything but the restriction,
    /// which stays the function's.
    pub fn version_snapshot(&self) -> FunctionConfig {
        FunctionConfig {
            invocation_restriction: None,
            ..self.clone()
        }
    }

    /// The values a store seals (the environment and the registry
    /// password, under a key no environment variable can have), and the
    /// document to store in plain: the same configuration without them.
    pub fn take_secrets(&self) -> (BTreeMap<String, String>, Value) {
        let mut secrets = self.environment.clone();
        let mut bare = self.clone();
        bare.environment = BTreeMap::new();
        if let Some(p) = bare
            .container
            .as_mut()
            .and_then(|c| c.registry_password.take())
        {
            secrets.insert(REGISTRY_PASSWORD_KEY.to_owned(), p);
        }
        (
            secrets,
            serde_json::to_value(&bare).expect("config serialises"),
        )
    }

    /// Put back what [`FunctionConfig::take_secrets`] took out.
    pub fn put_secrets(&mut self, mut secrets: BTreeMap<String, String>) {
        let password = secrets.remove(REGISTRY_PASSWORD_KEY);
        if let (Some(c), Some(p)) = (self.container.as_mut(), password) {
            c.registry_password = Some(p);
        }
        self.environment = secrets;
    }

    /// The reason calls are refused, when DisableFunctionInvocation
    /// turned them off.
    pub fn invocation_disabled(&self) -> Option<&str> {
        self.invocation_restriction
            .as_ref()
            .filter(|r| r.disable)
            .map(|r| r.reason.as_str())
    }
}

/// A layer version as a function references it: its ARN and its zip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRef {
    pub arn: String,
    pub sha256: String,
    pub size: u64,
}

/// `FunctionLayer`, the SDK's model of a function's layer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionLayer {
    pub arn: String,
    pub size: u64,
}

/// A code package as a function references it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeRef {
    /// Hex sha256 of the zip: the key it is stored under.
    pub sha256: String,
    pub size: u64,
    /// FC's `codeChecksum`: the CRC-64 (ECMA-182, as OSS computes it) of
    /// the zip, in decimal.
    pub checksum: String,
}

/// One function as stored: identity, times and configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionRecord {
    pub account_id: kiln_core::AccountId,
    pub name: kiln_core::FunctionName,
    pub function_id: String,
    pub created_ms: u64,
    pub modified_ms: u64,
    pub config: FunctionConfig,
}

/// `Function`, the SDK's output model.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Function {
    pub function_name: String,
    pub function_id: String,
    pub function_arn: String,
    pub runtime: String,
    pub handler: String,
    pub memory_size: u32,
    pub cpu: f64,
    pub disk_size: u32,
    pub timeout: u32,
    pub instance_concurrency: u32,
    pub environment_variables: BTreeMap<String, String>,
    pub custom_runtime_config: CustomRuntimeConfig,
    pub description: String,
    pub code_checksum: String,
    pub code_size: u64,
    pub created_time: String,
    pub last_modified_time: String,
    pub state: &'static str,
    pub last_update_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_lifecycle_config: Option<InstanceLifecycleConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<FunctionLayer>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invocation_restriction: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_container_config: Option<Value>,
    #[serde(flatten)]
    pub extras: BTreeMap<String, Value>,
}

/// `ListFunctionsOutput`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListFunctionsOutput {
    pub functions: Vec<Function>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

impl Function {
    pub fn from_record(r: &FunctionRecord, region: &str) -> Self {
        let c = &r.config;
        Self {
            function_name: r.name.to_string(),
            function_id: r.function_id.clone(),
            function_arn: format!("acs:fc:{region}:{}:functions/{}", r.account_id, r.name),
            runtime: c.runtime.as_str().to_owned(),
            handler: c.handler.clone(),
            memory_size: c.memory_mb,
            cpu: f64::from(c.cpu_milli) / 1000.0,
            disk_size: c.disk_mb,
            timeout: c.timeout_s,
            instance_concurrency: c.concurrency,
            environment_variables: c.environment.clone(),
            custom_runtime_config: CustomRuntimeConfig {
                command: (!c.command.is_empty()).then(|| c.command.clone()),
                args: (!c.args.is_empty()).then(|| c.args.clone()),
                port: Some(i64::from(c.port)),
                health_check_config: None,
            },
            description: c.description.clone(),
            code_checksum: c.code.checksum.clone(),
            code_size: c.code.size,
            created_time: fc_time(r.created_ms),
            last_modified_time: fc_time(r.modified_ms),
            state: "Active",
            last_update_status: "Successful",
            instance_lifecycle_config: (c.initializer.is_some() || c.pre_stop.is_some()).then(
                || InstanceLifecycleConfig {
                    initializer: c.initializer.as_ref().map(LifecycleHook::from_core),
                    pre_stop: c.pre_stop.as_ref().map(LifecycleHook::from_core),
                },
            ),
            layers: (!c.layers.is_empty()).then(|| {
                c.layers
                    .iter()
                    .map(|l| FunctionLayer {
                        arn: l.arn.clone(),
                        size: l.size,
                    })
                    .collect()
            }),
            invocation_restriction: c
                .invocation_restriction
                .as_ref()
                .map(InvocationRestriction::to_fc),
            custom_container_config: c.container.as_ref().map(|cc| cc.to_fc(c.port)),
            extras: {
                // FC returns internetAccess (default true) with every function.
                let mut extras = c.extras.clone();
                // ListVpcBindings returns those.
                extras.remove(BINDINGS_KEY);
                extras
                    .entry("internetAccess".to_owned())
                    .or_insert(Value::Bool(true));
                extras
            },
        }
    }
}

/// FC's timestamp format: ISO 8601 in UTC to the second, `2023-03-30T06:38:39Z`.
pub fn fc_time(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fc_time_format() {
        assert_eq!(fc_time(1_680_158_319_123), "2023-03-30T06:38:39Z");
    }
}
