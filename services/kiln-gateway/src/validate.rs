//! Checks of CreateFunction/UpdateFunction bodies against FC's rules and
//! limits. Nothing here has side effects: a body is turned into a complete
//! [`FunctionConfig`] (plus the decoded zip) or refused with InvalidArgument.

use std::collections::BTreeMap;

use base64::Engine;
use kiln_core::limits::{self, cpu_fits_memory, default_cpu_milli};
use kiln_core::{FcError, FcErrorCode, FunctionName, HandlerLanguage, RuntimeName};
use serde_json::Value;

use crate::model::{
    CodeRef, ContainerConfig, CustomContainerConfigInput, FunctionConfig, FunctionInput,
    LifecycleHook,
};

/// FC fields Kiln does not implement and that would change how a function
/// behaves: refused so nobody believes they took effect.
const REFUSED_FIELDS: &[&str] = &[
    "nasConfig",
    "ossMountConfig",
    "gpuConfig",
    "customDNS",
    "juiceFsConfig",
    "polarFsConfig",
    "microSandboxConfig",
    "sessionAffinity",
    "sessionAffinityConfig",
];

/// FC fields Kiln accepts and echoes without acting on them (they do not
/// change what a call computes).
const ECHOED_FIELDS: &[&str] = &[
    // Echoed as given; checked and acted on by `crate::ram` (temporary
    // credentials for the role).
    "role",
    "logConfig",
    "tracingConfig",
    // Checked by `check_network` and acted on by the agent (the instance's
    // egress mode), kept here in FC's shape.
    "internetAccess",
    "vpcConfig",
    // Checked by `check_network`, acted on by the VPC handlers.
    "disableURLInternet",
    "tags",
    "resourceGroupId",
    "disableInjectCredentials",
    "instanceIsolationMode",
    "idleTimeout",
    "enableLongLiving",
    "disableOndemand",
];

pub const DEFAULT_MEMORY_MB: u32 = 512;
pub const DEFAULT_TIMEOUT_S: u32 = 3;
pub const DEFAULT_DISK_MB: u32 = 512;
pub const HANDLER_MAX: usize = 128;
pub const DESCRIPTION_MAX: usize = 256;
/// FC's default timeout of a lifecycle hook when `timeout` is not given.
pub const HOOK_TIMEOUT_DEFAULT_S: u32 = 3;
/// FC's range of a lifecycle hook's timeout, in seconds.
pub const HOOK_TIMEOUT_MIN_S: u32 = 1;
pub const HOOK_TIMEOUT_MAX_S: u32 = 600;

/// A parsed create or update body.
#[derive(Debug)]
pub struct ParsedInput {
    pub input: FunctionInput,
    pub extras: BTreeMap<String, Value>,
    /// The decoded zip, when the body carries code.
    pub zip: Option<Vec<u8>>,
    /// `code.checksum` as given, to compare with the package's CRC-64.
    pub checksum: Option<String>,
}

fn bad(msg: impl Into<String>) -> FcError {
    FcError::invalid_argument(msg)
}

/// Parse and screen a JSON body: malformed JSON, a non-object, wrong field
/// types, refused fields and unsupported code locations are refused here.
pub fn parse_input(body: &[u8]) -> Result<ParsedInput, FcError> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON body: {e}")))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| bad("request body must be a JSON object"))?;
    // `null` means "not given", as the SDKs never send nulls on purpose.
    obj.retain(|_, v| !v.is_null());
    for field in REFUSED_FIELDS {
        if obj.contains_key(*field) {
            return Err(bad(format!(
                "{field} is not supported by this Function Compute endpoint"
            )));
        }
    }
    if obj.get("disableOndemand") == Some(&Value::Bool(true)) {
        return Err(bad(
            "disableOndemand is not supported by this Function Compute endpoint",
        ));
    }
    let extras = ECHOED_FIELDS
        .iter()
        .filter_map(|f| obj.get(*f).map(|v| ((*f).to_owned(), v.clone())))
        .collect();
    let input: FunctionInput =
        serde_json::from_value(value).map_err(|e| bad(format!("invalid request body: {e}")))?;
    let (zip, checksum) = match &input.code {
        None => (None, None),
        Some(code) => {
            if code.oss_bucket_name.is_some() || code.oss_object_name.is_some() {
                return Err(bad(
                    "code.ossBucketName/ossObjectName are not supported: upload the package as code.zipFile",
                ));
            }
            let b64 = code
                .zip_file
                .as_deref()
                .ok_or_else(|| bad("code.zipFile is required when code is given"))?;
            if b64.len() > limits::CODE_ZIP_MAX.div_ceil(3) * 4 + 4 {
                return Err(FcError::new(
                    FcErrorCode::EntityTooLarge,
                    format!(
                        "code package exceeds maximum allowed size ({} bytes)",
                        limits::CODE_ZIP_MAX
                    ),
                ));
            }
            let zip = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| bad(format!("code.zipFile is not valid base64: {e}")))?;
            if zip.len() > limits::CODE_ZIP_MAX {
                return Err(FcError::new(
                    FcErrorCode::EntityTooLarge,
                    format!(
                        "code package exceeds maximum allowed size ({} bytes)",
                        limits::CODE_ZIP_MAX
                    ),
                ));
            }
            (Some(zip), code.checksum.clone())
        }
    };
    Ok(ParsedInput {
        input,
        extras,
        zip,
        checksum,
    })
}

/// The function name of a create body.
pub fn function_name(input: &FunctionInput) -> Result<FunctionName, FcError> {
    let name = input
        .function_name
        .as_deref()
        .ok_or_else(|| bad("functionName is required"))?;
    name.parse()
        .map_err(|e: kiln_core::IdError| bad(format!("functionName: {}", e.reason)))
}

/// A create must carry a package, except a custom-container function's
/// (its image is its code), which must not.
pub fn require_code(parsed: &ParsedInput) -> Result<(), FcError> {
    let container = parsed.input.runtime.as_deref() == Some(RuntimeName::CustomContainer.as_str());
    match (&parsed.zip, container) {
        (Some(_), false) | (None, true) => Ok(()),
        (None, false) => Err(bad("code is required: give code.zipFile")),
        (Some(_), true) => Err(bad(
            "code does not apply to runtime custom-container: its image (customContainerConfig.image) is its code",
        )),
    }
}

/// The code reference of a custom-container function: no package (the
/// sha256 of nothing, size 0); the agent never fetches it.
pub fn no_code() -> CodeRef {
    CodeRef {
        sha256: EMPTY_SHA256.to_owned(),
        size: 0,
        checksum: "0".to_owned(),
    }
}

/// The sha256 of zero bytes.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The longest image reference accepted (registries' own limit on a
/// repository name is 255; with a host, port, tag or digest, 512).
pub const IMAGE_REF_MAX: usize = 512;
/// The longest registry user name and password accepted.
pub const REGISTRY_CREDENTIAL_MAX: usize = 1024;

/// `customContainerConfig` on top of the current one (an update keeps what
/// is not given; the registry password is kept when the user name stays).
fn check_container(
    given: Option<&CustomContainerConfigInput>,
    base: Option<&ContainerConfig>,
) -> Result<(ContainerConfig, Option<i64>), FcError> {
    let Some(g) = given else {
        return match base {
            Some(b) => Ok((b.clone(), None)),
            None => Err(bad(
                "customContainerConfig is required for runtime custom-container: give at least its image",
            )),
        };
    };
    if g.acr_instance_id.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(bad(
            "customContainerConfig.acrInstanceId is not supported by this Function Compute endpoint: give the image's full reference, registry host included",
        ));
    }
    let mut c = base.cloned().unwrap_or_default();
    if let Some(image) = &g.image {
        check_image_ref(image)?;
        c.image = image.clone();
    }
    if c.image.is_empty() {
        return Err(bad("customContainerConfig.image is required"));
    }
    if let Some(e) = &g.entrypoint {
        check_list("customContainerConfig.entrypoint", e)?;
        c.entrypoint = e.clone();
    }
    if let Some(cmd) = &g.command {
        check_list("customContainerConfig.command", cmd)?;
        c.command = cmd.clone();
    }
    if let Some(h) = &g.health_check_config {
        if !h.is_object() {
            return Err(bad(
                "customContainerConfig.healthCheckConfig must be an object",
            ));
        }
        c.health_check_config = Some(h.clone());
    }
    if let Some(a) = &g.acceleration_type {
        if a != "Default" && a != "None" {
            return Err(bad(
                "customContainerConfig.accelerationType must be Default or None",
            ));
        }
        c.acceleration_type = Some(a.clone());
    }
    if let Some(r) = &g.registry_config {
        if r.network_config.is_some() {
            return Err(bad(
                "customContainerConfig.registryConfig.networkConfig is not supported by this Function Compute endpoint: nodes reach registries over their own network",
            ));
        }
        if let Some(cert) = &r.cert_config {
            if cert.insecure == Some(true) {
                return Err(bad(
                    "customContainerConfig.registryConfig.certConfig.insecure is not supported: registries are always verified against the node's registry CA bundle",
                ));
            }
            if cert
                .root_ca_cert_base64
                .as_deref()
                .is_some_and(|s| !s.is_empty())
            {
                return Err(bad(
                    "customContainerConfig.registryConfig.certConfig.rootCaCertBase64 is not supported by this Function Compute endpoint: the operator adds the registry's CA to the nodes' registry CA bundle",
                ));
            }
        }
        if let Some(auth) = &r.auth_config {
            let user = auth.user_name.clone().filter(|u| !u.is_empty());
            let password = auth.password.clone().filter(|p| !p.is_empty());
            for (field, v) in [("userName", &user), ("password", &password)] {
                if let Some(v) = v {
                    if v.len() > REGISTRY_CREDENTIAL_MAX || v.chars().any(char::is_control) {
                        return Err(bad(format!(
                            "customContainerConfig.registryConfig.authConfig.{field} must be at most {REGISTRY_CREDENTIAL_MAX} bytes without control characters"
                        )));
                    }
                }
            }
            // GetFunction never shows the password: an update that names
            // the same user without one keeps it.
            let password = match (&user, password) {
                (Some(u), None) if c.registry_username.as_ref() == Some(u) => {
                    c.registry_password.clone()
                }
                (_, p) => p,
            };
            if user.is_some() != password.is_some() {
                return Err(bad(
                    "customContainerConfig.registryConfig.authConfig needs both userName and password (or neither)",
                ));
            }
            c.registry_username = user;
            c.registry_password = password;
        }
    }
    Ok((c, g.port))
}

/// An image reference: `[registry[:port]/]repository[:tag][@digest]`,
/// checked for shape here; the agent parses it fully when it pulls.
fn check_image_ref(image: &str) -> Result<(), FcError> {
    let ok = !image.is_empty()
        && image.len() <= IMAGE_REF_MAX
        && !image.contains("://")
        && !image.starts_with(['/', ':', '@', '.', '-'])
        && image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "customContainerConfig.image {:?} is not an image reference: give registry[:port]/repository[:tag] or @sha256:<digest>, at most {IMAGE_REF_MAX} characters",
            image.chars().take(80).collect::<String>()
        )))
    }
}

fn check_list(field: &str, v: &[String]) -> Result<(), FcError> {
    check_argv(field, v)
}

/// Apply `parsed` on top of `base` (an update) or on defaults (a create,
/// `base` None) and check every rule. `code` is the package the result
/// references (new one, or the old one on an update without code).
pub fn build_config(
    base: Option<&FunctionConfig>,
    parsed: &ParsedInput,
    code: CodeRef,
) -> Result<FunctionConfig, FcError> {
    let i = &parsed.input;

    let runtime = match (&i.runtime, base) {
        (Some(r), _) => r.parse::<RuntimeName>().map_err(bad)?,
        (None, Some(b)) => b.runtime,
        (None, None) => return Err(bad("runtime is required")),
    };
    let handler = match (&i.handler, base) {
        (Some(h), _) => h.clone(),
        (None, Some(b)) => b.handler.clone(),
        (None, None) => return Err(bad("handler is required")),
    };
    if handler.is_empty() || handler.len() > HANDLER_MAX {
        return Err(bad(format!(
            "handler must be 1 to {HANDLER_MAX} characters"
        )));
    }
    if handler.chars().any(char::is_control) {
        return Err(bad("handler must not contain control characters"));
    }
    if let Some(language) = runtime.handler_language() {
        check_builtin_handler("handler", &handler, runtime, language)?;
    }

    let memory_mb = match i.memory_size {
        Some(m) => check_memory(m)?,
        None => base.map_or(DEFAULT_MEMORY_MB, |b| b.memory_mb),
    };
    let (cpu_milli, cpu_explicit) = match i.cpu {
        Some(c) => (check_cpu(c)?, true),
        None => match base {
            Some(b) if b.cpu_explicit => (b.cpu_milli, true),
            _ => (default_cpu_milli(memory_mb), false),
        },
    };
    if !cpu_fits_memory(cpu_milli, memory_mb) {
        return Err(bad(format!(
            "cpu {} and memorySize {memory_mb} do not fit: vCPU to memory (GB) must be between 1:1 and 1:4",
            f64::from(cpu_milli) / 1000.0
        )));
    }
    let disk_mb = match i.disk_size {
        Some(d) => {
            let d = u32::try_from(d)
                .ok()
                .filter(|d| limits::DISK_SIZES_MB.contains(d));
            d.ok_or_else(|| bad("diskSize must be 512 or 10240"))?
        }
        None => base.map_or(DEFAULT_DISK_MB, |b| b.disk_mb),
    };
    let timeout_s = match i.timeout {
        Some(t) => in_range("timeout", t, limits::TIMEOUT_MIN_S, limits::TIMEOUT_MAX_S)?,
        None => base.map_or(DEFAULT_TIMEOUT_S, |b| b.timeout_s),
    };
    let concurrency = match i.instance_concurrency {
        Some(c) => in_range(
            "instanceConcurrency",
            c,
            limits::CONCURRENCY_MIN,
            limits::CONCURRENCY_MAX,
        )?,
        None => base.map_or(1, |b| b.concurrency),
    };
    let environment = match &i.environment_variables {
        Some(env) => check_environment(env)?,
        None => base.map(|b| b.environment.clone()).unwrap_or_default(),
    };
    let container = if runtime.is_container_image() {
        if parsed.zip.is_some() {
            return Err(bad(
                "code does not apply to runtime custom-container: its image (customContainerConfig.image) is its code",
            ));
        }
        if i.custom_runtime_config.is_some() {
            return Err(bad(
                "customRuntimeConfig does not apply to runtime custom-container: give its command, entrypoint and port in customContainerConfig",
            ));
        }
        if i.layers.as_ref().is_some_and(|l| !l.is_empty()) {
            return Err(bad(
                "layers do not apply to runtime custom-container: put what they hold into the image",
            ));
        }
        let base_container = base.and_then(|b| b.container.as_ref());
        Some(check_container(
            i.custom_container_config.as_ref(),
            base_container,
        )?)
    } else {
        if i.custom_container_config.is_some() {
            return Err(bad(format!(
                "customContainerConfig applies to runtime custom-container only, not {runtime}"
            )));
        }
        if code.sha256 == EMPTY_SHA256 && code.size == 0 {
            return Err(bad(format!(
                "code is required for runtime {runtime}: give code.zipFile"
            )));
        }
        None
    };
    let (command, args, port) = match &i.custom_runtime_config {
        _ if container.is_some() => {
            let port = match container.as_ref().and_then(|c| c.1) {
                Some(p) => check_container_port(p)?,
                None => match base {
                    Some(b) if b.container.is_some() => b.port,
                    _ => limits::DEFAULT_PORT,
                },
            };
            (Vec::new(), Vec::new(), port)
        }
        Some(c) if runtime.handler_language().is_some() => {
            if c.command.as_ref().is_some_and(|v| !v.is_empty())
                || c.args.as_ref().is_some_and(|v| !v.is_empty())
            {
                return Err(bad(format!(
                    "customRuntimeConfig.command and args do not apply to runtime {runtime}: it runs the handler {handler:?} with Kiln's bootstrap; use runtime custom or custom.debian12 to run your own command"
                )));
            }
            (Vec::new(), Vec::new(), check_port(c.port)?)
        }
        Some(c) => {
            let port = check_port(c.port)?;
            let command = c.command.clone().unwrap_or_default();
            let args = c.args.clone().unwrap_or_default();
            check_argv("customRuntimeConfig.command", &command)?;
            check_argv("customRuntimeConfig.args", &args)?;
            (command, args, port)
        }
        // A function moved onto a built-in runtime leaves its command.
        None => match base {
            Some(b) if runtime.handler_language().is_some() => (Vec::new(), Vec::new(), b.port),
            Some(b) => (b.command.clone(), b.args.clone(), b.port),
            None => (Vec::new(), Vec::new(), limits::DEFAULT_PORT),
        },
    };
    let description = match &i.description {
        Some(d) if d.len() > DESCRIPTION_MAX => {
            return Err(bad(format!(
                "description must be at most {DESCRIPTION_MAX} bytes"
            )))
        }
        Some(d) => d.clone(),
        None => base.map(|b| b.description.clone()).unwrap_or_default(),
    };
    let (mut initializer, mut pre_stop) = match base {
        Some(b) => (b.initializer.clone(), b.pre_stop.clone()),
        None => (None, None),
    };
    if let Some(l) = &i.instance_lifecycle_config {
        if let Some(h) = &l.initializer {
            initializer = check_hook("instanceLifecycleConfig.initializer", h)?;
        }
        if let Some(h) = &l.pre_stop {
            pre_stop = check_hook("instanceLifecycleConfig.preStop", h)?;
        }
    }
    if let Some(language) = runtime.handler_language() {
        if let Some(h) = &initializer {
            check_builtin_handler(
                "instanceLifecycleConfig.initializer.handler",
                &h.handler,
                runtime,
                language,
            )?;
        }
        if let Some(h) = &pre_stop {
            check_builtin_handler(
                "instanceLifecycleConfig.preStop.handler",
                &h.handler,
                runtime,
                language,
            )?;
        }
    }
    let mut extras = base.map(|b| b.extras.clone()).unwrap_or_default();
    extras.extend(parsed.extras.clone());
    check_network(&mut extras)?;
    // `layers` are resolved against the layer catalog by the caller
    // (`Catalog::resolve_layers`); here an update keeps the current ones.
    let layers = match base {
        Some(b) if !runtime.is_container_image() => b.layers.clone(),
        _ => Vec::new(),
    };

    Ok(FunctionConfig {
        runtime,
        handler,
        memory_mb,
        cpu_milli,
        cpu_explicit,
        disk_mb,
        timeout_s,
        concurrency,
        environment,
        command,
        args,
        port,
        description,
        code,
        initializer,
        pre_stop,
        layers,
        extras,
        invocation_restriction: base.and_then(|b| b.invocation_restriction.clone()),
        container: container.map(|c| c.0),
    })
}

fn check_container_port(p: i64) -> Result<u16, FcError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("customContainerConfig.port must be 1 to 65535"))
}

fn check_port(port: Option<i64>) -> Result<u16, FcError> {
    match port {
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("customRuntimeConfig.port must be 1 to 65535")),
        None => Ok(limits::DEFAULT_PORT),
    }
}

/// A built-in runtime's handler: FC's `module.function`, where the module
/// is a file under the code's root without its extension (`index`,
/// `src/app`; Python also takes packages, `pkg.mod`) and the function an
/// identifier of the language.
fn check_builtin_handler(
    field: &str,
    handler: &str,
    runtime: RuntimeName,
    language: HandlerLanguage,
) -> Result<(), FcError> {
    let (ext, example) = match language {
        HandlerLanguage::Python => (".py", "def handler(event, context)"),
        HandlerLanguage::Nodejs => (".js", "exports.handler = async (event, context) => ..."),
    };
    let refuse = |why: &str| {
        bad(format!(
            "{field} {handler:?} is not valid for runtime {runtime}: {why}; give it as module.function, e.g. \"index.handler\" for {example} in index{ext}"
        ))
    };
    let Some((module, function)) = handler.rsplit_once('.') else {
        return Err(refuse("it has no '.' between module and function"));
    };
    let ident_start = |c: char| {
        c.is_ascii_alphabetic() || c == '_' || (c == '$' && language == HandlerLanguage::Nodejs)
    };
    let ident = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(ident_start) && chars.all(|c| ident_start(c) || c.is_ascii_digit())
    };
    if !ident(function) {
        return Err(refuse(&format!("{function:?} is not a function name")));
    }
    let segments: Vec<&str> = module.split(['/', '.']).collect();
    let segment_ok = |s: &&str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if module.starts_with('/') || !segments.iter().all(segment_ok) {
        return Err(refuse(&format!(
            "{module:?} is not a module path (letters, digits, '_', '-', separated by '/')"
        )));
    }
    if language == HandlerLanguage::Python && !segments.iter().all(|s| ident(s)) {
        return Err(refuse(&format!(
            "{module:?} is not an importable Python module"
        )));
    }
    Ok(())
}

/// Longest VPC, vSwitch or security group id.
pub const NETWORK_ID_MAX: usize = 64;
/// Most vSwitches a `vpcConfig` may name.
pub const VSWITCHES_MAX: usize = 10;

/// FC's `VPCConfig`, as a function stores and returns it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VpcConfig {
    #[serde(default)]
    pub vpc_id: String,
    #[serde(default, rename = "vSwitchIds")]
    pub v_switch_ids: Vec<String>,
    #[serde(default)]
    pub security_group_id: String,
    /// FC's role for VPC access; Kiln attaches without one, and echoes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A VPC resource id: its kind's prefix (`vpc-`, `vsw-`, `sg-`), then
/// letters, digits, '-' or '_', at most [`NETWORK_ID_MAX`] in all.
pub(crate) fn check_network_id(field: &str, prefix: &str, id: &str) -> Result<(), FcError> {
    let ok = id.len() <= NETWORK_ID_MAX
        && id.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{field} {id:?} is not a valid id: {prefix} followed by letters, digits, '-' or '_', at most {NETWORK_ID_MAX} characters"
        )))
    }
}

/// Check and normalise `internetAccess` (a boolean, FC's default true) and
/// `vpcConfig` (vpcId, 1 to 10 distinct vSwitchIds and securityGroupId,
/// all or nothing; an empty `vpcConfig` removes the VPC) in a function's
/// merged fields.
fn check_network(extras: &mut BTreeMap<String, Value>) -> Result<(), FcError> {
    if let Some(v) = extras.get("internetAccess") {
        if !v.is_boolean() {
            return Err(bad("internetAccess must be a boolean"));
        }
    }
    match extras.get(crate::model::DISABLE_INTERNET_KEY) {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            if !extras.contains_key(crate::model::BINDINGS_KEY) {
                return Err(bad(
                    "disableURLInternet needs a VPC binding first (CreateVpcBinding): a function takes calls either from the internet or only from its VPCs",
                ));
            }
        }
        Some(_) => return Err(bad("disableURLInternet must be a boolean")),
    }
    let Some(v) = extras.get("vpcConfig") else {
        return Ok(());
    };
    let vpc: VpcConfig =
        serde_json::from_value(v.clone()).map_err(|e| bad(format!("invalid vpcConfig: {e}")))?;
    if vpc.vpc_id.is_empty() && vpc.v_switch_ids.is_empty() && vpc.security_group_id.is_empty() {
        extras.remove("vpcConfig");
        return Ok(());
    }
    check_network_id("vpcConfig.vpcId", "vpc-", &vpc.vpc_id)?;
    if vpc.v_switch_ids.is_empty() || vpc.v_switch_ids.len() > VSWITCHES_MAX {
        return Err(bad(format!(
            "vpcConfig.vSwitchIds must name 1 to {VSWITCHES_MAX} vSwitches"
        )));
    }
    for (i, id) in vpc.v_switch_ids.iter().enumerate() {
        check_network_id("vpcConfig.vSwitchIds", "vsw-", id)?;
        if vpc.v_switch_ids[..i].contains(id) {
            return Err(bad(format!("vpcConfig.vSwitchIds names {id} twice")));
        }
    }
    check_network_id("vpcConfig.securityGroupId", "sg-", &vpc.security_group_id)?;
    if let Some(role) = &vpc.role {
        if role.len() > 256 || role.chars().any(char::is_control) {
            return Err(bad(
                "vpcConfig.role must be at most 256 printable characters",
            ));
        }
    }
    let normalised = serde_json::to_value(&vpc).expect("vpcConfig serialises");
    extras.insert("vpcConfig".into(), normalised);
    Ok(())
}

/// A function's egress as the agent applies it: `None` for FC's default
/// (internet access, no VPC), so the instance spec's revision is unchanged.
pub fn function_network(config: &FunctionConfig) -> Option<kiln_core::NetworkSpec> {
    let internet_access = config
        .extras
        .get("internetAccess")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let vpc = config
        .extras
        .get("vpcConfig")
        .and_then(|v| serde_json::from_value::<VpcConfig>(v.clone()).ok())
        .map(|v| kiln_core::VpcAttachment {
            vpc_id: v.vpc_id,
            vswitch_ids: v.v_switch_ids,
            security_group_id: v.security_group_id,
        });
    (!internet_access || vpc.is_some()).then_some(kiln_core::NetworkSpec {
        internet_access,
        vpc,
    })
}

/// One hook of `instanceLifecycleConfig`. An empty or missing handler turns
/// the hook off (as FC's console does); otherwise the handler is checked like
/// the function's and the timeout defaults to 3 s within FC's range.
fn check_hook(field: &str, h: &LifecycleHook) -> Result<Option<kiln_core::LifecycleHook>, FcError> {
    if h.command.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(bad(format!(
            "{field}.command is not supported by this Function Compute endpoint: give a handler"
        )));
    }
    let handler = match h.handler.as_deref() {
        None | Some("") => return Ok(None),
        Some(handler) => handler,
    };
    if handler.len() > HANDLER_MAX {
        return Err(bad(format!(
            "{field}.handler must be 1 to {HANDLER_MAX} characters"
        )));
    }
    if handler.chars().any(char::is_control) {
        return Err(bad(format!(
            "{field}.handler must not contain control characters"
        )));
    }
    let timeout_s = match h.timeout {
        Some(t) => in_range(
            &format!("{field}.timeout"),
            t,
            HOOK_TIMEOUT_MIN_S,
            HOOK_TIMEOUT_MAX_S,
        )?,
        None => HOOK_TIMEOUT_DEFAULT_S,
    };
    Ok(Some(kiln_core::LifecycleHook {
        handler: handler.to_owned(),
        timeout_s,
    }))
}

fn in_range(field: &str, v: i64, min: u32, max: u32) -> Result<u32, FcError> {
    u32::try_from(v)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| bad(format!("{field} must be between {min} and {max}, got {v}")))
}

fn check_memory(m: i64) -> Result<u32, FcError> {
    let m = in_range(
        "memorySize",
        m,
        limits::MEMORY_MIN_MB,
        limits::MEMORY_MAX_MB,
    )?;
    if m % limits::MEMORY_STEP_MB != 0 {
        return Err(bad(format!(
            "memorySize must be a multiple of {} MB, got {m}",
            limits::MEMORY_STEP_MB
        )));
    }
    Ok(m)
}

fn check_cpu(c: f64) -> Result<u32, FcError> {
    let milli = (c * 1000.0).round();
    let ok = c.is_finite()
        && (milli - c * 1000.0).abs() < 1e-6
        && milli >= f64::from(limits::CPU_MIN_MILLI)
        && milli <= f64::from(limits::CPU_MAX_MILLI)
        && (milli as u32) / limits::CPU_STEP_MILLI * limits::CPU_STEP_MILLI == milli as u32;
    if !ok {
        return Err(bad(format!(
            "cpu must be between 0.05 and 16 in steps of 0.05, got {c}"
        )));
    }
    Ok(milli as u32)
}

fn check_environment(env: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, FcError> {
    let mut total = 0usize;
    for (k, v) in env {
        let mut bytes = k.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad(format!(
                "environment variable name {k:?} must be letters, digits and '_', not starting with a digit"
            )));
        }
        if v.contains('\0') {
            return Err(bad(format!("environment variable {k} contains a NUL byte")));
        }
        total += k.len() + v.len();
    }
    if total > limits::ENV_TOTAL_MAX {
        return Err(bad(format!(
            "environmentVariables total {total} bytes, more than the limit of {} bytes",
            limits::ENV_TOTAL_MAX
        )));
    }
    Ok(env.clone())
}

fn check_argv(field: &str, argv: &[String]) -> Result<(), FcError> {
    if argv.len() > 64 || argv.iter().map(String::len).sum::<usize>() > 16 * 1024 {
        return Err(bad(format!("{field} is too long")));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(bad(format!("{field} contains a NUL byte")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code() -> CodeRef {
        CodeRef {
            sha256: "00".repeat(32),
            size: 1,
            checksum: "1".into(),
        }
    }

    fn create(v: Value) -> Result<FunctionConfig, FcError> {
        let p = parse_input(v.to_string().as_bytes())?;
        function_name(&p.input)?;
        require_code(&p)?;
        build_config(None, &p, code())
    }

    fn base() -> Value {
        json!({"functionName": "f", "runtime": "custom", "handler": "h",
               "code": {"zipFile": "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="}})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b[k] = v;
        b
    }

    fn err_of(v: Value) -> String {
        let e = create(v).unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument, "{e}");
        e.message
    }

    #[test]
    fn defaults_follow_fc() {
        let c = create(base()).unwrap();
        assert_eq!(c.memory_mb, 512);
        assert_eq!(c.cpu_milli, default_cpu_milli(512));
        assert!(!c.cpu_explicit);
        assert_eq!(c.timeout_s, 3);
        assert_eq!(c.disk_mb, 512);
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.port, 9000);
    }

    #[test]
    fn memory_limits() {
        assert!(create(with("memorySize", json!(128))).is_ok());
        assert!(create(with("memorySize", json!(32768))).is_ok());
        assert!(err_of(with("memorySize", json!(64))).contains("memorySize"));
        assert!(err_of(with("memorySize", json!(32832))).contains("memorySize"));
        assert!(err_of(with("memorySize", json!(200))).contains("multiple of 64"));
        assert!(err_of(with("memorySize", json!(-128))).contains("memorySize"));
        assert!(err_of(with("memorySize", json!("512"))).contains("invalid type"));
        assert!(err_of(with("memorySize", json!(512.5))).contains("invalid type"));
    }

    #[test]
    fn cpu_limits_and_ratio() {
        let mut v = with("memorySize", json!(2048));
        v["cpu"] = json!(1.05);
        assert_eq!(create(v).unwrap().cpu_milli, 1050);
        let mut v = with("memorySize", json!(2048));
        v["cpu"] = json!(1.03);
        assert!(err_of(v).contains("steps of 0.05"));
        let mut v = with("memorySize", json!(1024));
        v["cpu"] = json!(2);
        assert!(err_of(v).contains("1:1 and 1:4"));
        let mut v = with("memorySize", json!(4096));
        v["cpu"] = json!(0.5);
        assert!(err_of(v).contains("1:1 and 1:4"));
        assert!(err_of(with("cpu", json!(0.0))).contains("cpu"));
        assert!(err_of(with("cpu", json!(16.05))).contains("cpu"));
        assert!(err_of(with("cpu", json!("1"))).contains("invalid type"));
    }

    #[test]
    fn other_limits() {
        assert!(create(with("diskSize", json!(10240))).is_ok());
        assert!(err_of(with("diskSize", json!(1024))).contains("diskSize"));
        assert!(create(with("timeout", json!(86400))).is_ok());
        assert!(err_of(with("timeout", json!(0))).contains("timeout"));
        assert!(err_of(with("timeout", json!(86401))).contains("timeout"));
        assert!(create(with("instanceConcurrency", json!(200))).is_ok());
        assert!(err_of(with("instanceConcurrency", json!(0))).contains("instanceConcurrency"));
        assert!(err_of(with("instanceConcurrency", json!(201))).contains("instanceConcurrency"));
        assert!(err_of(with("handler", json!(""))).contains("handler"));
        assert!(err_of(with("handler", json!("h".repeat(129)))).contains("handler"));
        assert!(err_of(with("description", json!("d".repeat(257)))).contains("description"));
        let crc = json!({"port": 0});
        assert!(err_of(with("customRuntimeConfig", crc)).contains("port"));
        let crc = json!({"port": 70000});
        assert!(err_of(with("customRuntimeConfig", crc)).contains("port"));
        let crc = json!({"command": ["/code/app"], "args": ["-x"], "port": 8080});
        let c = create(with("customRuntimeConfig", crc)).unwrap();
        assert_eq!(
            (c.command, c.args, c.port),
            (vec!["/code/app".to_owned()], vec!["-x".to_owned()], 8080)
        );
        let crc = json!({"command": "/code/app"});
        assert!(err_of(with("customRuntimeConfig", crc)).contains("invalid type"));
    }

    #[test]
    fn environment_limits() {
        assert!(create(with("environmentVariables", json!({"A_1": "x"}))).is_ok());
        assert!(err_of(with("environmentVariables", json!({"1A": "x"}))).contains("name"));
        assert!(err_of(with("environmentVariables", json!({"A-B": "x"}))).contains("name"));
        let big = json!({"A": "x".repeat(4096)});
        assert!(err_of(with("environmentVariables", big)).contains("limit"));
        let ok = json!({"A": "x".repeat(4095)});
        assert!(create(with("environmentVariables", ok)).is_ok());
        assert!(err_of(with("environmentVariables", json!({"A": 1}))).contains("invalid type"));
    }

    #[test]
    fn names_and_runtimes() {
        assert!(err_of(with("functionName", json!("9abc"))).contains("functionName"));
        assert!(err_of(with("functionName", json!("a/b"))).contains("functionName"));
        assert!(err_of(with("functionName", json!("a".repeat(65)))).contains("functionName"));
        assert!(err_of(with("functionName", json!(12))).contains("invalid type"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("functionName");
        assert!(err_of(v).contains("functionName is required"));
        assert!(err_of(with("runtime", json!("python3.10"))).contains("not supported"));
        assert!(create(with("runtime", json!("custom.debian12"))).is_ok());
        let mut v = base();
        v.as_object_mut().unwrap().remove("code");
        assert!(err_of(v).contains("code is required"));
    }

    #[test]
    fn refused_and_echoed_fields() {
        for f in [
            "nasConfig",
            "ossMountConfig",
            "gpuConfig",
            "customContainerConfig",
        ] {
            assert!(err_of(with(f, json!({}))).contains(f), "{f}");
        }
        let c = create(with("role", json!("acs:ram::1:role/x"))).unwrap();
        assert_eq!(c.extras["role"], json!("acs:ram::1:role/x"));
        assert!(create(with("vpcConfig", Value::Null)).is_ok());
        let oss = json!({"ossBucketName": "b", "ossObjectName": "o"});
        assert!(err_of(with("code", oss)).contains("ossBucketName"));
        assert!(err_of(with("code", json!({"zipFile": "%%%"}))).contains("base64"));
    }

    fn container(ccc: Value) -> Result<FunctionConfig, FcError> {
        let v = json!({"functionName": "f", "runtime": "custom-container", "handler": "h",
                       "customContainerConfig": ccc});
        let p = parse_input(v.to_string().as_bytes())?;
        require_code(&p)?;
        build_config(None, &p, no_code())
    }

    fn container_err(ccc: Value) -> String {
        let e = container(ccc).unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument, "{e}");
        e.message
    }

    #[test]
    fn custom_container_functions_take_fcs_container_config() {
        let auth = json!({"authConfig": {"userName": "u", "password": "p4ss"}});
        let c = container(json!({"image": "registry.example:5000/team/app:v1",
            "entrypoint": ["/app/server"], "command": ["--port", "8080"], "port": 8080,
            "healthCheckConfig": {"httpGetUrl": "/ready"}, "accelerationType": "Default",
            "resolvedImageUri": "ignored@sha256:00", "registryConfig": auth}))
        .unwrap();
        let cc = c.container.clone().unwrap();
        assert_eq!(cc.image, "registry.example:5000/team/app:v1");
        assert_eq!(cc.entrypoint, ["/app/server"]);
        assert_eq!(cc.command, ["--port", "8080"]);
        assert_eq!(c.port, 8080);
        assert_eq!(cc.registry_password.as_deref(), Some("p4ss"));
        assert_eq!(c.code, no_code());
        // FC's default port.
        assert_eq!(
            container(json!({"image": "r.example/a:1"})).unwrap().port,
            9000
        );
        // GetFunction shows the user, never the password.
        let shown = cc.to_fc(c.port).to_string();
        assert!(
            shown.contains("\"userName\":\"u\"") && !shown.contains("p4ss"),
            "{shown}"
        );
        // The stored document holds no password; the sealed values do.
        let (secrets, doc) = c.take_secrets();
        assert!(!doc.to_string().contains("p4ss"));
        assert_eq!(secrets[kiln_core::REGISTRY_PASSWORD_KEY], "p4ss");
        let mut back: FunctionConfig = serde_json::from_value(doc).unwrap();
        back.put_secrets(secrets);
        assert_eq!(back, c);

        // An update naming the same user without a password keeps it; a
        // new user needs one.
        let p = parse_input(
            json!({"customContainerConfig": {"image": "r.example/a:2",
                   "registryConfig": {"authConfig": {"userName": "u"}}}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let up = build_config(Some(&c), &p, no_code()).unwrap();
        let ucc = up.container.unwrap();
        assert_eq!(
            (ucc.image.as_str(), ucc.registry_password.as_deref()),
            ("r.example/a:2", Some("p4ss"))
        );
        assert_eq!(ucc.entrypoint, ["/app/server"], "what is not given is kept");
        let p = parse_input(
            json!({"customContainerConfig": {"registryConfig": {"authConfig": {"userName": "v"}}}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert!(build_config(Some(&c), &p, no_code())
            .unwrap_err()
            .message
            .contains("both"));
    }

    #[test]
    fn unsupported_container_fields_are_refused_by_name() {
        for (ccc, says) in [
            (json!({}), "image is required"),
            (
                json!({"image": "a:1", "acrInstanceId": "cri-x"}),
                "acrInstanceId",
            ),
            (
                json!({"image": "a:1", "registryConfig": {"networkConfig": {"vpcId": "v"}}}),
                "networkConfig",
            ),
            (
                json!({"image": "a:1", "registryConfig": {"certConfig": {"insecure": true}}}),
                "insecure",
            ),
            (
                json!({"image": "a:1", "registryConfig": {"certConfig": {"rootCaCertBase64": "eA=="}}}),
                "rootCaCertBase64",
            ),
            (
                json!({"image": "a:1", "accelerationType": "Fast"}),
                "accelerationType",
            ),
            (json!({"image": "a:1", "port": 0}), "port"),
            (
                json!({"image": "https://r.example/a:1"}),
                "not an image reference",
            ),
            (json!({"image": "r.example/a b"}), "not an image reference"),
            (json!({"image": "a:1", "somethingElse": 1}), "unknown field"),
            (
                json!({"image": "a:1", "registryConfig": {"authConfig": {"password": "p"}}}),
                "both",
            ),
        ] {
            let m = container_err(ccc.clone());
            assert!(m.contains(says), "{ccc}: {m}");
        }
        // No code package, no customRuntimeConfig, no layers.
        let v = json!({"functionName": "f", "runtime": "custom-container", "handler": "h",
                       "customContainerConfig": {"image": "a:1"},
                       "code": {"zipFile": "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="}});
        let p = parse_input(v.to_string().as_bytes()).unwrap();
        assert!(require_code(&p)
            .unwrap_err()
            .message
            .contains("custom-container"));
        let v = json!({"functionName": "f", "runtime": "custom-container", "handler": "h",
                       "customContainerConfig": {"image": "a:1"}, "customRuntimeConfig": {"port": 9000}});
        let p = parse_input(v.to_string().as_bytes()).unwrap();
        assert!(build_config(None, &p, no_code())
            .unwrap_err()
            .message
            .contains("customRuntimeConfig"));
        // Other runtimes: no container config, and code is still required.
        assert!(
            err_of(with("customContainerConfig", json!({"image": "a:1"})))
                .contains("custom-container only")
        );
        let p = parse_input(json!({"runtime": "custom"}).to_string().as_bytes()).unwrap();
        let c = container(json!({"image": "a:1"})).unwrap();
        assert!(build_config(Some(&c), &p, no_code())
            .unwrap_err()
            .message
            .contains("code is required"));
    }

    #[test]
    fn internet_access_and_vpc_config_become_the_instance_network() {
        let c = create(base()).unwrap();
        assert_eq!(function_network(&c), None);
        let c = create(with("internetAccess", json!(true))).unwrap();
        assert_eq!(function_network(&c), None);
        let c = create(with("internetAccess", json!(false))).unwrap();
        assert_eq!(
            function_network(&c),
            Some(kiln_core::NetworkSpec {
                internet_access: false,
                vpc: None
            })
        );
        let vpc = json!({"vpcId": "vpc-a1", "vSwitchIds": ["vsw-a1", "vsw-b2"],
            "securityGroupId": "sg-x"});
        let c = create(with("vpcConfig", vpc.clone())).unwrap();
        assert_eq!(c.extras["vpcConfig"], vpc, "returned in FC's shape");
        let n = function_network(&c).unwrap();
        assert!(n.internet_access);
        let att = n.vpc.unwrap();
        assert_eq!(
            (att.vpc_id.as_str(), att.security_group_id.as_str()),
            ("vpc-a1", "sg-x")
        );
        assert_eq!(att.vswitch_ids, ["vsw-a1", "vsw-b2"]);

        // An update keeps the VPC unless it says otherwise; `{}` removes it.
        let p = parse_input(json!({"internetAccess": false}).to_string().as_bytes()).unwrap();
        let u = build_config(Some(&c), &p, code()).unwrap();
        let n = function_network(&u).unwrap();
        assert!(!n.internet_access && n.vpc.is_some());
        let p = parse_input(json!({"vpcConfig": {}}).to_string().as_bytes()).unwrap();
        let u = build_config(Some(&c), &p, code()).unwrap();
        assert!(!u.extras.contains_key("vpcConfig"));
        assert_eq!(function_network(&u), None);
    }

    #[test]
    fn bad_network_fields_are_invalid_arguments() {
        let vpc = |v: Value| with("vpcConfig", v);
        assert!(err_of(with("internetAccess", json!("yes"))).contains("internetAccess"));
        assert!(err_of(vpc(json!("vpc-a"))).contains("vpcConfig"));
        assert!(err_of(vpc(json!({"vpcId": "vpc-a", "vSwitchIds": ["vsw-a"],
            "securityGroupId": "sg-a", "zone": "x"})))
        .contains("vpcConfig"));
        for (v, field) in [
            (
                json!({"vpcId": "a", "vSwitchIds": ["vsw-a"], "securityGroupId": "sg-a"}),
                "vpcId",
            ),
            (
                json!({"vpcId": "vpc-", "vSwitchIds": ["vsw-a"], "securityGroupId": "sg-a"}),
                "vpcId",
            ),
            (
                json!({"vpcId": "vpc-a b", "vSwitchIds": ["vsw-a"], "securityGroupId": "sg-a"}),
                "vpcId",
            ),
            (
                json!({"vpcId": "vpc-a", "vSwitchIds": [], "securityGroupId": "sg-a"}),
                "vSwitchIds",
            ),
            (
                json!({"vpcId": "vpc-a", "vSwitchIds": ["sg-a"], "securityGroupId": "sg-a"}),
                "vSwitchIds",
            ),
            (
                json!({"vpcId": "vpc-a", "vSwitchIds": ["vsw-a", "vsw-a"], "securityGroupId": "sg-a"}),
                "twice",
            ),
            (
                json!({"vpcId": "vpc-a", "vSwitchIds": ["vsw-a"]}),
                "securityGroupId",
            ),
            (
                json!({"vpcId": format!("vpc-{}", "a".repeat(64)), "vSwitchIds": ["vsw-a"], "securityGroupId": "sg-a"}),
                "vpcId",
            ),
        ] {
            assert!(err_of(vpc(v.clone())).contains(field), "{v}");
        }
        let many: Vec<String> = (0..11).map(|i| format!("vsw-{i}")).collect();
        assert!(err_of(vpc(
            json!({"vpcId": "vpc-a", "vSwitchIds": many, "securityGroupId": "sg-a"})
        ))
        .contains("vSwitchIds"));
    }

    #[test]
    fn oversized_packages_are_entity_too_large() {
        let b64 = "A".repeat(limits::CODE_ZIP_MAX.div_ceil(3) * 4 + 8);
        let body = with("code", json!({ "zipFile": b64 })).to_string();
        let e = parse_input(body.as_bytes()).unwrap_err();
        assert_eq!(e.code, FcErrorCode::EntityTooLarge);
        assert_eq!(e.code.http_status(), 400);
    }

    #[test]
    fn lifecycle_hooks() {
        let l = json!({"initializer": {"handler": "index.init", "timeout": 600},
                       "preStop": {"handler": "index.stop"}});
        let c = create(with("instanceLifecycleConfig", l)).unwrap();
        let init = c.initializer.clone().unwrap();
        assert_eq!((init.handler.as_str(), init.timeout_s), ("index.init", 600));
        let stop = c.pre_stop.clone().unwrap();
        assert_eq!((stop.handler.as_str(), stop.timeout_s), ("index.stop", 3));
        // Echoed in FC's shape.
        let r = crate::model::FunctionRecord {
            account_id: "1".parse().unwrap(),
            name: "f".parse().unwrap(),
            function_id: "id".into(),
            created_ms: 0,
            modified_ms: 0,
            config: c.clone(),
        };
        let out = serde_json::to_value(crate::model::Function::from_record(&r, "r")).unwrap();
        assert_eq!(
            out["instanceLifecycleConfig"],
            json!({"initializer": {"handler": "index.init", "timeout": 600},
                   "preStop": {"handler": "index.stop", "timeout": 3}})
        );
        // ... and carried into the instance spec, changing its revision.
        let spec = crate::catalog::instance_spec(&r, None);
        assert_eq!(spec.initializer, c.initializer);
        assert_eq!(spec.pre_stop, c.pre_stop);
        let mut plain = r.clone();
        plain.config.initializer = None;
        assert_ne!(
            crate::catalog::instance_spec(&plain, None).revision,
            spec.revision
        );
        assert!(
            serde_json::to_value(crate::model::Function::from_record(&plain, "r")).unwrap()
                ["instanceLifecycleConfig"]
                .get("initializer")
                .is_none()
        );

        // An update touching only preStop keeps the initializer; an empty
        // handler turns a hook off.
        let p = parse_input(
            json!({"instanceLifecycleConfig": {"preStop": {"handler": ""}}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let u = build_config(Some(&c), &p, c.code.clone()).unwrap();
        assert_eq!(u.initializer, c.initializer);
        assert_eq!(u.pre_stop, None);

        for (bad_cfg, needle) in [
            (
                json!({"initializer": {"handler": "i", "timeout": 0}}),
                "initializer.timeout",
            ),
            (
                json!({"initializer": {"handler": "i", "timeout": 601}}),
                "initializer.timeout",
            ),
            (
                json!({"preStop": {"handler": "s", "timeout": -1}}),
                "preStop.timeout",
            ),
            (
                json!({"preStop": {"handler": "s", "timeout": "3"}}),
                "invalid type",
            ),
            (
                json!({"preStop": {"handler": "h".repeat(129)}}),
                "preStop.handler",
            ),
            (
                json!({"initializer": {"command": ["curl", "x"]}}),
                "command",
            ),
            (json!({"preFreeze": {"handler": "x"}}), "unknown field"),
            (
                json!({"initializer": {"handler": "i", "timeot": 3}}),
                "unknown field",
            ),
            (json!([1]), "invalid type"),
        ] {
            let msg = err_of(with("instanceLifecycleConfig", bad_cfg.clone()));
            assert!(msg.contains(needle), "{bad_cfg}: {msg}");
            // Refused on update too, leaving the base untouched.
            let body = json!({ "instanceLifecycleConfig": bad_cfg }).to_string();
            let refused = parse_input(body.as_bytes())
                .and_then(|p| build_config(Some(&c), &p, c.code.clone()));
            assert_eq!(refused.unwrap_err().code, FcErrorCode::InvalidArgument);
        }
    }

    #[test]
    fn malformed_bodies() {
        let e = parse_input(b"{not json").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
        assert!(e.message.contains("malformed JSON"));
        assert!(parse_input(b"[1,2]")
            .unwrap_err()
            .message
            .contains("JSON object"));
    }

    #[test]
    fn update_merges_and_cpu_follows_memory_unless_explicit() {
        let c = create(base()).unwrap();
        let p = parse_input(json!({"memorySize": 4096}).to_string().as_bytes()).unwrap();
        let u = build_config(Some(&c), &p, c.code.clone()).unwrap();
        assert_eq!(u.cpu_milli, default_cpu_milli(4096));
        assert_eq!(u.handler, "h");
        let mut v = with("cpu", json!(0.5));
        v["memorySize"] = json!(1024);
        let c = create(v).unwrap();
        let p = parse_input(json!({"memorySize": 4096}).to_string().as_bytes()).unwrap();
        assert!(build_config(Some(&c), &p, c.code.clone()).is_err());
    }

    #[test]
    fn built_in_runtimes_take_module_function_handlers() {
        let builtin = |runtime: &str, handler: &str| {
            let mut v = with("runtime", json!(runtime));
            v["handler"] = json!(handler);
            v
        };
        for rt in ["python3.11", "nodejs18"] {
            for ok in ["index.handler", "src/app.main", "my_mod.handler_2"] {
                let c = create(builtin(rt, ok)).unwrap();
                assert!(c.command.is_empty() && c.args.is_empty(), "{rt} {ok}");
            }
            for bad in [
                "index",
                "index.",
                ".handler",
                "/etc/passwd.x",
                "../up.handler",
                "a//b.handler",
                "index.2fast",
                "in dex.handler",
            ] {
                let msg = err_of(builtin(rt, bad));
                assert!(
                    msg.contains("module.function") && msg.contains(rt),
                    "{rt} {bad}: {msg}"
                );
            }
        }
        // Python modules are importable names; Node's may have '-' and '$'.
        assert!(err_of(builtin("python3.11", "my-mod.handler")).contains("Python module"));
        assert!(create(builtin("nodejs18", "my-mod.$handler")).is_ok());
        // The bootstrap is the command: the function cannot name another.
        let mut v = builtin("python3.11", "index.handler");
        v["customRuntimeConfig"] = json!({"command": ["/code/server"]});
        assert!(err_of(v).contains("customRuntimeConfig.command"));
        let mut v = builtin("nodejs18", "index.handler");
        v["customRuntimeConfig"] = json!({"port": 9001});
        assert_eq!(create(v).unwrap().port, 9001);
        // Hooks name handlers the same way.
        let mut v = builtin("python3.11", "index.handler");
        v["instanceLifecycleConfig"] = json!({"initializer": {"handler": "initialize"}});
        assert!(err_of(v).contains("instanceLifecycleConfig.initializer.handler"));
        let mut v = builtin("nodejs18", "index.handler");
        v["instanceLifecycleConfig"] = json!({"preStop": {"handler": "index.preStop"}});
        assert!(create(v).is_ok());
        // The custom runtimes keep their free-form handlers.
        assert!(create(with("handler", json!("anything at all"))).is_ok());
        assert!(err_of(with("runtime", json!("python3.10")))
            .contains("python3.11, nodejs18, python3.13, nodejs20"));
    }

    #[test]
    fn moving_onto_a_built_in_runtime_drops_the_command() {
        let mut v = base();
        v["customRuntimeConfig"] = json!({"command": ["/code/server"], "args": ["-v"]});
        let c = create(v).unwrap();
        assert_eq!(c.command, vec!["/code/server"]);
        let p = parse_input(
            json!({"runtime": "python3.11", "handler": "index.handler"})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let moved = build_config(Some(&c), &p, c.code.clone()).unwrap();
        assert!(moved.command.is_empty() && moved.args.is_empty());
        // The old free-form handler is checked against the new runtime.
        let p = parse_input(json!({"runtime": "nodejs18"}).to_string().as_bytes()).unwrap();
        let e = build_config(Some(&c), &p, c.code.clone()).unwrap_err();
        assert!(e.message.contains("module.function"), "{e}");
    }
}
