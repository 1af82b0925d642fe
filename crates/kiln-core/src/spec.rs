//! What an agent needs to know to start one instance of a function.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{AccountId, FunctionName};

/// The runtimes a node offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuntimeName {
    /// An empty root filesystem: for static binaries.
    #[serde(rename = "custom")]
    Custom,
    /// A Debian 12 root filesystem with python3.
    #[serde(rename = "custom.debian12")]
    CustomDebian12,
    /// Built-in: Debian 12's Python 3.11 with Kiln's bootstrap calling
    /// FC's `handler(event, context)`. Not an FC runtime name (FC has no
    /// Python 3.11 runtime): named for what it runs.
    #[serde(rename = "python3.11")]
    Python311,
    /// Built-in: Debian 12's Node.js 18 with Kiln's bootstrap; FC's
    /// `nodejs18`.
    #[serde(rename = "nodejs18")]
    Nodejs18,
    /// Built-in: Debian 13's Python 3.13. Not an FC runtime name (FC's
    /// newest Python runtime is python3.12): named for what it runs.
    #[serde(rename = "python3.13")]
    Python313,
    /// Built-in: Debian 13's Node.js 20; FC's `nodejs20`.
    #[serde(rename = "nodejs20")]
    Nodejs20,
    /// FC's `custom-container`: the function is an OCI image the node
    /// pulls from a registry ([`InstanceSpec::image`]); no runtime tree.
    #[serde(rename = "custom-container")]
    CustomContainer,
}

/// The language of a built-in runtime (FC's event handler model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandlerLanguage {
    Python,
    Nodejs,
}

impl RuntimeName {
    pub const ALL: [RuntimeName; 7] = [
        RuntimeName::Custom,
        RuntimeName::CustomDebian12,
        RuntimeName::Python311,
        RuntimeName::Nodejs18,
        RuntimeName::Python313,
        RuntimeName::Nodejs20,
        RuntimeName::CustomContainer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Custom => "custom",
            Self::CustomDebian12 => "custom.debian12",
            Self::Python311 => "python3.11",
            Self::Nodejs18 => "nodejs18",
            Self::Python313 => "python3.13",
            Self::Nodejs20 => "nodejs20",
            Self::CustomContainer => "custom-container",
        }
    }

    /// Whether the function is an OCI image rather than a code package on
    /// one of the node's root filesystems.
    pub fn is_container_image(self) -> bool {
        self == Self::CustomContainer
    }

    /// The language whose handlers a built-in runtime calls; `None` for
    /// the custom runtimes (the function is its own HTTP server).
    pub fn handler_language(self) -> Option<HandlerLanguage> {
        match self {
            Self::Custom | Self::CustomDebian12 | Self::CustomContainer => None,
            Self::Python311 | Self::Python313 => Some(HandlerLanguage::Python),
            Self::Nodejs18 | Self::Nodejs20 => Some(HandlerLanguage::Nodejs),
        }
    }

    /// The root filesystem the runtime runs on (a directory name under the
    /// node's rootfs directory). The built-in runtimes of one Debian
    /// release share one tree: its python3, nodejs and Kiln's bootstraps.
    pub fn rootfs(self) -> &'static str {
        match self {
            Self::Custom => "custom",
            Self::CustomDebian12 => "custom.debian12",
            Self::Python311 | Self::Nodejs18 => "debian12-builtin",
            Self::Python313 | Self::Nodejs20 => "debian13-builtin",
            // Never built: the root filesystem is the function's image.
            Self::CustomContainer => "custom-container",
        }
    }

    /// The Debian release (suite) a debootstrapped tree comes from: the
    /// one whose interpreters are the versions the name says.
    pub fn debian_suite(self) -> &'static str {
        match self {
            Self::Python313 | Self::Nodejs20 => "trixie",
            Self::Custom
            | Self::CustomDebian12
            | Self::Python311
            | Self::Nodejs18
            | Self::CustomContainer => "bookworm",
        }
    }

    /// What the runtime runs when the function's own command is not used:
    /// the built-in runtimes' bootstraps (files of their root filesystem).
    pub fn bootstrap_command(self) -> Option<&'static [&'static str]> {
        match self.handler_language()? {
            HandlerLanguage::Python => Some(&["/usr/bin/python3", "-u", PYTHON_BOOTSTRAP]),
            HandlerLanguage::Nodejs => Some(&["/usr/bin/node", NODEJS_BOOTSTRAP]),
        }
    }

    /// Where the name stands against FC's runtime names: `None` when the
    /// name is FC's own, else what FC calls its nearest runtimes.
    pub fn fc_note(self) -> Option<&'static str> {
        match self {
            Self::Python311 => Some(
                "not an FC runtime name (FC has no Python 3.11 runtime); FC's nearest: python3.10, python3.12",
            ),
            Self::Python313 => Some(
                "not an FC runtime name (FC has no Python 3.13 runtime); FC's nearest: python3.12",
            ),
            Self::Custom
            | Self::CustomDebian12
            | Self::Nodejs18
            | Self::Nodejs20
            | Self::CustomContainer => None,
        }
    }
}

/// Where the Python bootstrap lives in the built-in runtimes' tree.
pub const PYTHON_BOOTSTRAP: &str = "/usr/lib/kiln/runtime/bootstrap.py";
/// Where the Node.js bootstrap lives in the built-in runtimes' tree.
pub const NODEJS_BOOTSTRAP: &str = "/usr/lib/kiln/runtime/bootstrap.js";

impl fmt::Display for RuntimeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RuntimeName {
    /// Every name, comma separated, for error messages.
    pub fn supported() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl FromStr for RuntimeName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "runtime {s:?} is not supported; supported runtimes: {}",
                    RuntimeName::supported()
                )
            })
    }
}

/// The two sandbox backends of the brief.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxKind {
    /// OCI container run by runc/crun: dedicated nodes and development.
    Container,
    /// cloud-hypervisor microVM: multi-tenant nodes.
    Microvm,
}

/// Everything that shapes an instance. Two calls whose specs have the same
/// `revision` may share an instance; a changed spec means new instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    /// Hex sha256 of the rest of this spec; see [`InstanceSpec::seal`].
    pub revision: String,
    /// The published version of the function (FC's `versionId`) this
    /// instance serves; `None` for LATEST. Part of the revision, so a
    /// version's instances never serve LATEST or another version even when
    /// their configurations match. Absent from the JSON for LATEST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub runtime: RuntimeName,
    pub handler: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub port: u16,
    pub environment: BTreeMap<String, String>,
    pub memory_mb: u32,
    pub cpu_milli: u32,
    pub disk_mb: u32,
    pub timeout_s: u32,
    pub concurrency: u32,
    /// Hex sha256 of the code zip.
    pub code_digest: String,
    pub code_size: u64,
    /// FC's `instanceLifecycleConfig.initializer`: `POST /initialize` once
    /// per instance before its first call. Absent from the JSON (and so from
    /// the revision) when not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer: Option<LifecycleHook>,
    /// FC's `instanceLifecycleConfig.preStop`: `GET /pre-stop` before the
    /// instance is destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_stop: Option<LifecycleHook>,
    /// FC's `layers`: hex sha256 digests of the function's layer zips, in
    /// the function's order (the first one wins where two hold the same
    /// file), merged read-only under `/opt`. Absent from the JSON (and so
    /// from the revision) when the function has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// FC's `role` (`acs:ram::<account>:role/<name>`): the agent fetches
    /// temporary credentials for it from the gateway (never carried here).
    /// Absent from the JSON (and so from the revision) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// FC's `internetAccess` and `vpcConfig`: the instance's egress. Absent
    /// from the JSON (and so from the revision) for FC's default, internet
    /// access without a VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// FC's `customContainerConfig` for runtime `custom-container`: the
    /// image the node pulls and how it starts. Absent from the JSON (and
    /// so from the revision) for every other runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
}

/// A custom-container function's image: FC's `customContainerConfig`
/// (`image`, `entrypoint`, `command`) and `registryConfig.authConfig`.
/// The registry password is a secret: stores keep it sealed with the
/// environment ([`InstanceSpec::take_secrets`]), never in plain JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// The image reference as given: `registry[:port]/repository[:tag|@digest]`.
    pub reference: String,
    /// FC's `entrypoint`: replaces the image's `Entrypoint` (and, as in
    /// OCI runtimes, drops its `Cmd`) when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// FC's `command`: the arguments, replacing the image's `Cmd` when not
    /// empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_password: Option<String>,
}

/// Where a custom-container function's registry password travels among the
/// sealed values of a spec: not a valid environment variable name, so it
/// never collides with one.
pub const REGISTRY_PASSWORD_KEY: &str = "kiln:registry-password";

/// Where an instance may send traffic: FC's `internetAccess` (default true)
/// and `vpcConfig`. Both false/absent means no egress at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub internet_access: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc: Option<VpcAttachment>,
}

/// FC's `vpcConfig`: the VPC, the vSwitches an instance may get its
/// address from, and the security group whose rules apply to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcAttachment {
    pub vpc_id: String,
    pub vswitch_ids: Vec<String>,
    pub security_group_id: String,
}

/// One of FC's instance lifecycle hooks (`LifecycleHook`): its handler
/// (passed to the runtime in a header) and its timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleHook {
    pub handler: String,
    pub timeout_s: u32,
}

impl InstanceSpec {
    /// Compute and store the revision from every other field.
    pub fn seal(mut self) -> Self {
        self.revision = String::new();
        let bytes = serde_json::to_vec(&self).expect("spec serialises");
        self.revision = hex::encode(Sha256::digest(&bytes));
        self
    }

    /// Move every secret out of the spec (the environment and the image's
    /// registry password) into one map, for a store to seal; the spec left
    /// holds none. [`InstanceSpec::put_secrets`] undoes it exactly.
    pub fn take_secrets(&mut self) -> BTreeMap<String, String> {
        let mut secrets = std::mem::take(&mut self.environment);
        if let Some(password) = self.image.as_mut().and_then(|i| i.registry_password.take()) {
            secrets.insert(REGISTRY_PASSWORD_KEY.to_owned(), password);
        }
        secrets
    }

    /// Put back what [`InstanceSpec::take_secrets`] took.
    pub fn put_secrets(&mut self, mut secrets: BTreeMap<String, String>) {
        let password = secrets.remove(REGISTRY_PASSWORD_KEY);
        if let (Some(image), Some(p)) = (self.image.as_mut(), password) {
            image.registry_password = Some(p);
        }
        self.environment = secrets;
    }

    /// Whether `revision` matches the content (specs from the network are
    /// checked before use).
    pub fn is_sealed(&self) -> bool {
        self.clone().seal().revision == self.revision
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> InstanceSpec {
        InstanceSpec {
            account_id: "1".parse().unwrap(),
            function_name: "hello".parse().unwrap(),
            revision: String::new(),
            version: None,
            runtime: RuntimeName::Custom,
            handler: "index.handler".into(),
            command: vec!["/code/server".into()],
            args: vec![],
            port: 9000,
            environment: BTreeMap::new(),
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
    fn secrets_leave_and_return_exactly() {
        let mut a = sample();
        a.runtime = RuntimeName::CustomContainer;
        a.environment.insert("K".into(), "v".into());
        a.image = Some(ImageSpec {
            reference: "registry.example:5000/app:v1".into(),
            entrypoint: vec![],
            command: vec!["serve".into()],
            registry_username: Some("u".into()),
            registry_password: Some("s3cret".into()),
        });
        let a = a.seal();
        let mut bare = a.clone();
        let secrets = bare.take_secrets();
        assert_eq!(secrets.len(), 2);
        let json = serde_json::to_string(&bare).unwrap();
        assert!(
            !json.contains("s3cret") && !json.contains("\"v\""),
            "{json}"
        );
        bare.put_secrets(secrets);
        assert_eq!(bare, a);
        assert!(bare.is_sealed());
        // Without an image the key never reaches the environment.
        let mut b = sample();
        b.put_secrets([(REGISTRY_PASSWORD_KEY.to_owned(), "x".to_owned())].into());
        assert!(b.environment.is_empty());
    }

    #[test]
    fn revision_changes_with_content() {
        let a = sample();
        assert!(a.is_sealed());
        let mut b = a.clone();
        b.memory_mb = 1024;
        assert!(!b.is_sealed());
        let b = b.seal();
        assert_ne!(a.revision, b.revision);
        let mut c = a.clone();
        c.pre_stop = Some(LifecycleHook {
            handler: "index.preStop".into(),
            timeout_s: 3,
        });
        let c = c.seal();
        assert_ne!(a.revision, c.revision);
    }

    #[test]
    fn specs_without_hooks_keep_their_revision_and_json() {
        let a = sample();
        let json = serde_json::to_value(&a).unwrap();
        assert!(json.get("initializer").is_none() && json.get("pre_stop").is_none());
        let back: InstanceSpec = serde_json::from_value(json).unwrap();
        assert!(back.is_sealed());
        assert_eq!(back, a);
    }

    #[test]
    fn runtime_names_round_trip() {
        for r in RuntimeName::ALL {
            assert_eq!(r.as_str().parse::<RuntimeName>().unwrap(), r);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert!("python3.10".parse::<RuntimeName>().is_err());
    }

    #[test]
    fn built_in_runtimes_share_a_tree_and_run_their_bootstrap() {
        for r in [RuntimeName::Python311, RuntimeName::Nodejs18] {
            assert_eq!(
                (r.rootfs(), r.debian_suite()),
                ("debian12-builtin", "bookworm")
            );
            assert!(r.handler_language().is_some());
        }
        for r in [RuntimeName::Python313, RuntimeName::Nodejs20] {
            assert_eq!(
                (r.rootfs(), r.debian_suite()),
                ("debian13-builtin", "trixie")
            );
            assert!(r.handler_language().is_some());
        }
        let py = RuntimeName::Python311.bootstrap_command().unwrap();
        assert_eq!(py.last(), Some(&PYTHON_BOOTSTRAP));
        let js = RuntimeName::Nodejs18.bootstrap_command().unwrap();
        assert_eq!(js.last(), Some(&NODEJS_BOOTSTRAP));
        for r in [RuntimeName::Custom, RuntimeName::CustomDebian12] {
            assert_eq!(
                r.rootfs(),
                r.as_str(),
                "custom trees keep their cache paths"
            );
            assert!(r.bootstrap_command().is_none());
        }
        // Only the name FC does not have says so.
        assert!(RuntimeName::Python311
            .fc_note()
            .unwrap()
            .contains("python3.10"));
        assert!(RuntimeName::Python313
            .fc_note()
            .unwrap()
            .contains("python3.12"));
        assert!(RuntimeName::Nodejs18.fc_note().is_none());
        assert!(RuntimeName::Nodejs20.fc_note().is_none());
        assert!(RuntimeName::supported().contains("nodejs18"));
    }
}
