//! What the function's process is, for every backend: the checks a spec
//! must pass before anything is created, its CPU, and its environment.

use std::collections::BTreeMap;

use kiln_core::{InstanceId, InstanceSpec};

/// Where the function's code appears inside the sandbox.
pub const CODE_MOUNT: &str = "/code";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a spec cannot become a process definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    #[error("The function has no command to run")]
    NoCommand,
    #[error("Command and arguments must not contain NUL bytes")]
    NulInArgs,
    #[error("Invalid environment variable name {0:?}")]
    EnvName(String),
    #[error("Environment variable {0} has a NUL byte in its value")]
    EnvValue(String),
    #[error("The function's port must not be 0")]
    Port,
}

/// Check what a spec asks the process to be before anything is created.
pub fn check_spec(spec: &InstanceSpec) -> Result<(), ProcessError> {
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err(ProcessError::NoCommand);
    }
    if spec
        .command
        .iter()
        .chain(&spec.args)
        .any(|a| a.contains('\0'))
    {
        return Err(ProcessError::NulInArgs);
    }
    if spec.port == 0 {
        return Err(ProcessError::Port);
    }
    Ok(())
}

/// The instance's CPU in thousandths: the spec's, or FC's default for its
/// memory size when the spec has none.
pub fn instance_cpu_milli(spec: &InstanceSpec) -> u32 {
    if spec.cpu_milli == 0 {
        kiln_core::limits::default_cpu_milli(spec.memory_mb)
    } else {
        spec.cpu_milli
    }
}

/// The process environment: the function's variables, then FC's own (which
/// the function cannot override), then a default PATH if none was given.
pub fn process_env(
    instance_id: &InstanceId,
    spec: &InstanceSpec,
    region: Option<&str>,
) -> Result<Vec<String>, ProcessError> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &spec.environment {
        let name_ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(ProcessError::EnvName(k.clone()));
        }
        if v.contains('\0') {
            return Err(ProcessError::EnvValue(k.clone()));
        }
        env.insert(k.clone(), v.clone());
    }
    let fc = [
        ("FC_FUNCTION_NAME", spec.function_name.to_string()),
        ("FC_FUNCTION_HANDLER", spec.handler.clone()),
        ("FC_FUNCTION_MEMORY_SIZE", spec.memory_mb.to_string()),
        ("FC_FUNC_CODE_PATH", CODE_MOUNT.to_owned()),
        ("FC_INSTANCE_ID", instance_id.to_string()),
        ("FC_ACCOUNT_ID", spec.account_id.to_string()),
        ("FC_CUSTOM_LISTEN_PORT", spec.port.to_string()),
    ];
    for (k, v) in fc {
        env.insert(k.to_owned(), v);
    }
    if let Some(region) = region {
        env.insert("FC_REGION".into(), region.to_owned());
    }
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample_spec() -> InstanceSpec {
        InstanceSpec {
            account_id: "1234".parse().unwrap(),
            function_name: "hello".parse().unwrap(),
            revision: String::new(),
            version: None,
            runtime: kiln_core::RuntimeName::CustomDebian12,
            handler: "index.handler".into(),
            command: vec!["python3".into()],
            args: vec!["-m".into(), "http.server".into(), "9000".into()],
            port: 9000,
            environment: [("GREETING".to_owned(), "hi".to_owned())].into(),
            memory_mb: 512,
            cpu_milli: 350,
            disk_mb: 512,
            timeout_s: 3,
            concurrency: 1,
            code_digest: "00".repeat(32),
            code_size: 10,
            initializer: None,
            pre_stop: None,
            layers: Vec::new(),
            role: None,
            network: None,
            image: None,
        }
        .seal()
    }

    #[test]
    fn environment_has_fc_variables_that_functions_cannot_override() {
        let id = InstanceId::generate();
        let mut spec = sample_spec();
        spec.environment
            .insert("FC_FUNCTION_NAME".into(), "spoofed".into());
        let env = process_env(&id, &spec, Some("cn-hangzhou")).unwrap();
        assert!(env.contains(&"GREETING=hi".to_owned()));
        assert!(env.contains(&"FC_FUNCTION_NAME=hello".to_owned()));
        assert!(env.contains(&"FC_FUNCTION_MEMORY_SIZE=512".to_owned()));
        assert!(env.contains(&"FC_FUNC_CODE_PATH=/code".to_owned()));
        assert!(env.contains(&format!("FC_INSTANCE_ID={id}")));
        assert!(env.contains(&"FC_REGION=cn-hangzhou".to_owned()));
        assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin")));
        assert!(!env.iter().any(|e| e.contains("spoofed")));

        spec.environment.insert("PATH".into(), "/code/bin".into());
        let env = process_env(&id, &spec, None).unwrap();
        assert!(env.contains(&"PATH=/code/bin".to_owned()));
        assert!(!env.iter().any(|e| e.starts_with("FC_REGION=")));
    }

    #[test]
    fn specs_without_a_command_or_port_or_with_nul_bytes_are_refused() {
        let mut spec = sample_spec();
        spec.command.clear();
        assert_eq!(check_spec(&spec).unwrap_err(), ProcessError::NoCommand);
        let mut spec = sample_spec();
        spec.args.push("a\0b".into());
        assert_eq!(check_spec(&spec).unwrap_err(), ProcessError::NulInArgs);
        let mut spec = sample_spec();
        spec.port = 0;
        assert_eq!(check_spec(&spec).unwrap_err(), ProcessError::Port);
        assert_eq!(check_spec(&sample_spec()), Ok(()));
    }
}
