//! Command-line definitions and dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};

use crate::client::FcClient;
use crate::commands::configs::{self, Kind};
use crate::commands::domains::{self, DomainFields};
use crate::commands::triggers::{self, TriggerFields};
use crate::commands::versions::{self, AliasFields};
use crate::commands::{bench, dev, functions, keys, nodes, observe, runtimes, tasks};
use crate::credentials::{self, Credentials};
use crate::output::Output;

/// `-o table|json` on the commands that list or show things (the
/// older `--json` is the same as `-o json`).
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// How to print the answer: aligned columns or the gateway's JSON.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The same as `-o json`.
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    pub fn json(&self) -> bool {
        self.json || self.output == Output::Json
    }
}

/// `-o json|table` on the commands that print one object (`get`, `put`):
/// JSON unless asked for a table, as they printed before `-o` existed.
#[derive(Debug, Clone, Copy, Args)]
pub struct ObjectOutputArgs {
    /// How to print the answer: the gateway's JSON or `KEY VALUE` lines.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Json)]
    output: Output,
}

impl ObjectOutputArgs {
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a self-hosted Function Compute data plane"
)]
pub struct Cli {
    /// Credentials file (else $KILN_CREDENTIALS, else ~/.kiln/credentials.json).
    #[arg(long, global = true)]
    pub credentials: Option<PathBuf>,
    #[command(flatten)]
    pub log: kiln_service::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run gateway, scheduler and agent on this machine (needs root).
    Dev(DevArgs),
    /// Print a shell completion script (`source <(kiln completions bash)`).
    Completions { shell: clap_complete::Shell },
    /// Zip a folder and create or update a function from it.
    Deploy(DeployArgs),
    /// Invoke a function synchronously and print its answer (or, with
    /// --async, enqueue the call and print its request and task ids).
    Invoke(InvokeArgs),
    /// List, show or stop a function's async tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// List, show or delete functions.
    #[command(subcommand)]
    Functions(FunctionsCommand),
    /// Publish, list or delete a function's versions (immutable snapshots
    /// of its code and configuration).
    #[command(subcommand)]
    Versions(VersionsCommand),
    /// Create, show, update, delete or list a function's aliases (a
    /// version, and optionally a share of calls for canary versions).
    #[command(subcommand)]
    Aliases(AliasesCommand),
    /// Create, show, update, delete or list a function's triggers: HTTP
    /// triggers (the function answers at its own URL) and timer triggers.
    #[command(subcommand)]
    Triggers(TriggersCommand),
    /// Create, show, update, delete or list custom domains: a domain's
    /// certificate, minimum TLS version and routes from paths to functions.
    #[command(subcommand)]
    Domains(DomainsCommand),
    /// Set, show, list or delete a function's provisioned instances (FC's
    /// provision configs).
    #[command(subcommand)]
    Provision(ProvisionCommand),
    /// Set, show, list or delete a function's reserved concurrency (FC's
    /// concurrency configs).
    #[command(subcommand)]
    Concurrency(ConcurrencyCommand),
    /// Measure Kiln against baselines on this machine and print the ratios.
    Bench(bench::BenchArgs),
    /// List compute nodes, or cordon, drain or uncordon one (needs the
    /// cluster's certificates: `kiln dev`'s state directory).
    Nodes(NodesArgs),
    /// Show or change an account's quotas and throttles (needs the
    /// cluster's certificates: `kiln dev`'s state directory).
    Limits(LimitsArgs),
    /// Create, list, disable, enable or delete access keys (operator: needs
    /// the cluster's certificates, `kiln dev`'s state directory).
    Keys(KeysArgs),
    /// Print a function's logs (each line with its instance and request id).
    Logs {
        function: String,
        /// Only the lines of this call.
        #[arg(long)]
        request_id: Option<String>,
        /// Keep printing new lines as they come.
        #[arg(long, short)]
        follow: bool,
        /// At most this many lines (the last ones; default 1000).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// List a function's live instances (FC's ListInstances).
    Instances {
        function: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Run a command inside a live instance (FC's InstanceExec); with -t,
    /// in a terminal (an interactive shell: `kiln exec -t F I -- /bin/sh`).
    Exec {
        function: String,
        instance: String,
        /// Give the command a terminal.
        #[arg(long, short)]
        tty: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Move state between stores (stop the service first).
    #[command(subcommand)]
    Store(StoreCommand),
    /// List the runtimes and where each is in its end of support.
    Runtimes {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Run one service of `kiln dev --postgres`'s cluster as this process
    /// (started by `kiln dev`, not by hand).
    #[command(subcommand, hide = true)]
    Serve(crate::serve::ServeCommand),
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a stopped one-box scheduler's or gateway's state (its SQLite
    /// files; a gateway's code packages and async queue too) into the
    /// empty PostgreSQL database a cluster will share (docs/ha.md).
    Copy {
        /// The scheduler's state directory (holds scheduler.db) or the
        /// gateway's (gateway.db, queue.db and code/).
        #[arg(long)]
        from: PathBuf,
        /// The cluster's database: a `postgresql://` URL or `key=value`
        /// string (a unix socket or loopback address).
        #[arg(long)]
        to: String,
        /// The key the one-box service sealed with (its `[secrets]
        /// key_file`); default FROM/secrets.key.
        #[arg(long)]
        from_key_file: Option<PathBuf>,
        /// The cluster's sealing key (every clustered service's
        /// `[secrets] key_file`); default the source's.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A file holding the database password.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// State directory of `kiln dev` (cluster.json, pki/); default ~/.kiln.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: LimitsCommand,
}

#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Print the limits in force (JSON by default: the shape `set` takes).
    Get {
        account: String,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// Replace the account's limits with a JSON file's (`-` for stdin).
    Set {
        account: String,
        file: PathBuf,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// Back to the scheduler's defaults.
    Reset {
        account: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// State directory of `kiln dev` (cluster.json, pki/); default ~/.kiln.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// A new key for the account; its secret is printed this once.
    Create {
        #[arg(long)]
        account: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Every key with its account and status (never a secret).
    List {
        /// Only this account's keys.
        #[arg(long)]
        account: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The key stops signing requests at once (it can be enabled again).
    Disable {
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The key signs requests again.
    Enable {
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove the key for good.
    Delete {
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Args)]
pub struct NodesArgs {
    /// State directory of `kiln dev` (cluster.json, pki/); default ~/.kiln.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: NodesCommand,
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    List {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// No new instances on the node; its instances keep serving.
    Cordon {
        node: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// No new instances and no new calls; instances go once idle.
    Drain {
        node: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Take new instances again.
    Uncordon {
        node: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Revoke every certificate of the node, cluster-wide within seconds,
    /// for good: every service refuses it and drops its connections, and
    /// its instances are replaced on other nodes.
    Revoke {
        node: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A single-use token a new node joins with (`kiln-agent` redeems it
    /// on the scheduler's bootstrap listener for its first certificate).
    BootstrapToken {
        /// How long the token stays usable: seconds, or with a unit
        /// (`90s`, `30m`, `12h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// The node id to join as; generated when absent.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
}

/// `90`, `90s`, `30m`, `12h`, `7d`.
fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 12h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// State directory (certificates, databases, instances); default ~/.kiln.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Public HTTPS address of the gateway.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Prefix of every network namespace, veth, container and cgroup.
    #[arg(long, default_value = "kiln")]
    pub sandbox_prefix: String,
    /// Addresses for instances (one /30 each).
    #[arg(long, default_value = "10.213.0.0/16")]
    pub instance_subnet: String,
    /// Where runtime root filesystems are built and cached
    /// (default $KILN_ROOTFS_CACHE, else STATE_DIR/agent/rootfs).
    #[arg(long)]
    pub rootfs_dir: Option<PathBuf>,
    /// Seconds an idle on-demand instance is kept.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout: u64,
    /// Seconds the temporary credentials of functions with a role last.
    #[arg(long, default_value_t = 3600)]
    pub credentials_lifetime: u64,
    /// Run instances WITHOUT network isolation (for a machine without
    /// nftables): they reach this machine's ports and private network;
    /// functions with internetAccess: false or a vpcConfig are refused.
    #[arg(long)]
    pub insecure_no_network_isolation: bool,
    /// PEM file of the CAs that custom-container images' registries are
    /// verified against (default: the system's roots).
    #[arg(long)]
    pub registry_ca_bundle: Option<PathBuf>,
    /// The largest custom-container image, in MB (default FC's 10 GB).
    #[arg(long)]
    pub max_image_mb: Option<u64>,
    /// Unpacked image layers kept, in MB (default 40 GB).
    #[arg(long)]
    pub image_budget_mb: Option<u64>,
    /// Run a cluster on this machine instead of one box on SQLite: the
    /// gateways and two schedulers (leader and standby) as processes of
    /// their own on this PostgreSQL database (a `postgresql://` URL or
    /// `key=value` string, unix socket or loopback), HAProxy in front of
    /// the gateways on --listen (docs/ha.md).
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// A file holding the database password, when the URL has none.
    #[arg(long, requires = "postgres")]
    pub postgres_password_file: Option<PathBuf>,
    /// How many gateways run behind HAProxy (with --postgres).
    #[arg(long, requires = "postgres", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub gateways: u16,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Folder holding the function's code.
    #[arg(required_unless_present = "file")]
    pub path: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    pub name: Option<String>,
    /// Deploy a Serverless Devs project instead (`s.yaml`, edition 3.0.0,
    /// fc3 resources): every function with its async invoke, concurrency
    /// and provision configs and VPC bindings. Properties Kiln does not
    /// support are listed and nothing is deployed.
    #[arg(
        short = 'f',
        long = "file",
        conflicts_with_all = ["path", "name", "runtime", "command", "args", "memory", "concurrency", "timeout", "port", "env"]
    )]
    pub file: Option<PathBuf>,
    /// custom (static binaries), custom.debian12 (default on create), or a
    /// built-in runtime calling index.handler: python3.11, nodejs18,
    /// python3.13, nodejs20.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Command that starts the runtime, split on whitespace
    /// (default: `python3 server.py` if there is a server.py).
    #[arg(long)]
    pub command: Option<String>,
    /// An argument for the command (repeatable).
    #[arg(long = "arg")]
    pub args: Vec<String>,
    /// Memory in MB (128 to 32768, steps of 64).
    #[arg(long)]
    pub memory: Option<u32>,
    /// Concurrent calls per instance (1 to 200).
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Per-call timeout in seconds.
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Port the runtime listens on (default 9000).
    #[arg(long)]
    pub port: Option<u16>,
    /// Environment variable NAME=VALUE (repeatable).
    #[arg(long)]
    pub env: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    pub name: String,
    /// Payload as a string.
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Payload from a file (`-` for stdin).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Enqueue the call (202 once durable) instead of waiting for it.
    #[arg(long = "async")]
    pub asynchronous: bool,
    /// LATEST (the default), a version id or an alias name.
    #[arg(long, short)]
    pub qualifier: Option<String>,
    /// Name the async task (the same id twice is one task).
    #[arg(long, requires = "asynchronous")]
    pub task_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    List {
        function: String,
        /// Enqueued, Running, Retrying, Succeeded, Failed, Stopping,
        /// Stopped, Expired or Invalid.
        #[arg(long)]
        status: Option<String>,
        /// Task ids starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Enqueued at or after this time (ms since the epoch).
        #[arg(long)]
        since_ms: Option<u64>,
        /// Enqueued at or before this time (ms since the epoch).
        #[arg(long)]
        until_ms: Option<u64>,
        /// At most this many tasks.
        #[arg(long)]
        limit: Option<u32>,
        /// Newest first.
        #[arg(long)]
        desc: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Print one task with its event history.
    Get {
        function: String,
        task: String,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// Stop a queued task (it will not run) or a running one (its call is aborted).
    Stop {
        function: String,
        task: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProvisionCommand {
    /// Keep provisioned instances of FUNCTION started (PutProvisionConfig).
    Put {
        function: String,
        /// How many (defaultTarget).
        #[arg(long)]
        target: Option<u32>,
        /// false: FC's idle mode, instances are frozen between calls; true
        /// (FC's default): they keep their CPU for background work.
        #[arg(long)]
        always_allocate_cpu: Option<bool>,
        /// FC's PutProvisionConfigInput as JSON (scheduledActions,
        /// targetTrackingPolicies...; `-` for stdin); the flags go on top.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// Print FUNCTION's provision config with its current instances.
    Get {
        function: String,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// The account's provision configs.
    List {
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove FUNCTION's provision config: its instances become on-demand.
    Delete {
        function: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConcurrencyCommand {
    /// Reserve concurrency for FUNCTION, also its maximum (PutConcurrencyConfig).
    Put {
        function: String,
        #[arg(long)]
        reserved: u32,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// Print FUNCTION's concurrency config.
    Get {
        function: String,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// The account's concurrency configs.
    List {
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove FUNCTION's concurrency config.
    Delete {
        function: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum VersionsCommand {
    /// Snapshot the function's current code and configuration as its next
    /// version (refused when nothing changed since the last one).
    Publish {
        function: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// The function's versions, newest first.
    List {
        function: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a version no alias points at.
    Delete {
        function: String,
        version: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AliasesCommand {
    /// Point a new alias at a version.
    Create {
        function: String,
        alias: String,
        /// The version the alias serves.
        #[arg(long)]
        version: String,
        /// VERSION=FRACTION: send that share of calls to another version
        /// (canary), e.g. --weight 2=0.1; repeatable.
        #[arg(long = "weight")]
        weights: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one alias.
    Get {
        function: String,
        alias: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Change an alias: roll it to another version, change or clear its
    /// canary weights; what is not given stays.
    Update {
        function: String,
        alias: String,
        #[arg(long)]
        version: Option<String>,
        /// VERSION=FRACTION, repeatable; replaces the alias's weights.
        #[arg(long = "weight", conflicts_with = "no_weights")]
        weights: Vec<String>,
        /// Send every call to the alias's version (clear its weights).
        #[arg(long)]
        no_weights: bool,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    Delete {
        function: String,
        alias: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The function's aliases.
    List {
        function: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

/// What kind of trigger `kiln triggers create` makes, and its settings.
#[derive(Debug, Args)]
pub struct TriggerConfigArgs {
    /// http or timer.
    #[arg(long = "type", value_parser = ["http", "timer"])]
    pub trigger_type: Option<String>,
    /// HTTP: a method the trigger accepts (repeatable).
    #[arg(long = "method")]
    pub methods: Vec<String>,
    /// HTTP: anonymous (no signature) or function (ACS3-signed requests
    /// of the function's account only).
    #[arg(long, value_parser = ["anonymous", "function"], default_value = "anonymous")]
    pub auth: String,
    /// HTTP: refuse calls on the internet URL.
    #[arg(long)]
    pub disable_url_internet: bool,
    /// Timer: FC's cronExpression (`@every 5m`, six cron fields, or
    /// `CRON_TZ=Zone ...`).
    #[arg(long)]
    pub cron: Option<String>,
    /// Timer: the payload each firing passes to the function.
    #[arg(long)]
    pub payload: Option<String>,
    /// Timer: create it disabled.
    #[arg(long)]
    pub disabled: bool,
    /// The whole triggerConfig as FC's JSON, instead of the flags above.
    #[arg(long, conflicts_with_all = ["methods", "cron", "payload"])]
    pub config: Option<String>,
}

impl TriggerConfigArgs {
    /// The triggerConfig the flags describe, if they describe one.
    fn config(&self, trigger_type: &str) -> Result<Option<String>> {
        if let Some(c) = &self.config {
            triggers::check_json(c)?;
            return Ok(Some(c.clone()));
        }
        Ok(match trigger_type {
            "http" if !self.methods.is_empty() => Some(triggers::http_config(
                &self.methods,
                &self.auth,
                self.disable_url_internet,
            )?),
            "timer" => self
                .cron
                .as_deref()
                .map(|c| triggers::timer_config(c, self.payload.as_deref(), !self.disabled)),
            _ => None,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum TriggersCommand {
    /// Create a trigger: `--type http --method GET --method POST [--auth
    /// function]` or `--type timer --cron '@every 5m' [--payload ..]`.
    Create {
        function: String,
        trigger: String,
        #[command(flatten)]
        settings: TriggerConfigArgs,
        /// LATEST (the default), a version or an alias.
        #[arg(long)]
        qualifier: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one trigger (an HTTP trigger's URL with it).
    Get {
        function: String,
        trigger: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Change a trigger's configuration, qualifier or description; what is
    /// not given stays (a new configuration replaces the whole one).
    Update {
        function: String,
        trigger: String,
        #[command(flatten)]
        settings: TriggerConfigArgs,
        #[arg(long)]
        qualifier: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    Delete {
        function: String,
        trigger: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The function's triggers.
    List {
        function: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

/// A custom domain's settings for `kiln domains create|update`.
#[derive(Debug, Args)]
pub struct DomainArgs {
    /// The domain's certificate chain (PEM file); with --key.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM file); sent once, sealed by the
    /// gateway and never shown again.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// A name for the certificate (FC's certName).
    #[arg(long)]
    pub cert_name: Option<String>,
    /// A route, repeatable: PATH=FUNCTION[:QUALIFIER][@METHOD,...], e.g.
    /// `--route '/api/*=api:prod@GET,POST' --route '/*=web'`. On update
    /// the routes given replace all the domain's routes.
    #[arg(long = "route")]
    pub routes: Vec<String>,
    /// Remove every route (update).
    #[arg(long, conflicts_with = "routes")]
    pub no_routes: bool,
    /// The lowest TLS version the domain accepts.
    #[arg(long, value_parser = ["TLSv1.2", "TLSv1.3"])]
    pub min_tls: Option<String>,
}

impl DomainArgs {
    fn fields(&self) -> Result<DomainFields> {
        let cert = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some(DomainFields::read_cert(c, k, self.cert_name.clone())?),
            _ => None,
        };
        let routes = if self.no_routes {
            Some(Vec::new())
        } else if self.routes.is_empty() {
            None
        } else {
            Some(
                self.routes
                    .iter()
                    .map(|r| domains::parse_route(r))
                    .collect::<Result<_>>()?,
            )
        };
        Ok(DomainFields {
            cert,
            routes,
            min_tls: self.min_tls.clone(),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum DomainsCommand {
    /// Create a custom domain: `kiln domains create shop.example.com
    /// --cert shop.pem --key shop.key --route '/*=web'`. Point the domain's
    /// DNS at the gateway's public listener.
    Create {
        domain: String,
        #[command(flatten)]
        settings: DomainArgs,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one custom domain (never its private key).
    Get {
        domain: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Change a domain's certificate, routes or minimum TLS version; what
    /// is not given stays.
    Update {
        domain: String,
        #[command(flatten)]
        settings: DomainArgs,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    Delete {
        domain: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The account's custom domains.
    List {
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum FunctionsCommand {
    /// The account's functions.
    List {
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Print one function.
    Get {
        name: String,
        #[command(flatten)]
        out: ObjectOutputArgs,
    },
    /// Delete a function (its triggers, versions and aliases first).
    Delete {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

impl Cli {
    /// Whether this command runs the sandboxes itself (and so must enter a
    /// private mount namespace before any thread starts).
    pub fn runs_agent(&self) -> bool {
        matches!(self.command, Command::Dev(_) | Command::Bench(_))
    }

    /// The log filter when `RUST_LOG` does not set one. `kiln bench` runs
    /// its services without their per-request access lines, as its nginx
    /// peers run with `access_log off`: both sides of every ratio then do
    /// the same work, and the bench's output is not buried under a line per
    /// call.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Bench(_) => "info,kiln::access=off",
            _ => "info",
        }
    }
}

fn client(cli: &Cli) -> Result<FcClient> {
    let path = credentials::resolve_path(cli.credentials.as_deref())?;
    let creds = Credentials::load(&path)?.with_env(|k| std::env::var(k).ok())?;
    Ok(FcClient::new(creds)?)
}

pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Dev(args) => {
            let state_dir = match &args.state_dir {
                Some(d) => d.clone(),
                None => credentials::default_dir()?,
            };
            let rootfs_dir = args
                .rootfs_dir
                .clone()
                .or_else(|| std::env::var_os("KILN_ROOTFS_CACHE").map(PathBuf::from));
            let opts = dev::DevOptions {
                state_dir,
                listen: args.listen,
                sandbox_prefix: args.sandbox_prefix.clone(),
                instance_subnet: args.instance_subnet.clone(),
                rootfs_dir,
                idle_timeout_s: args.idle_timeout,
                credentials_lifetime_s: args.credentials_lifetime,
                insecure_no_network_isolation: args.insecure_no_network_isolation,
                signature_skew_s: None,
                premade: true,
                registry_ca_bundle: args.registry_ca_bundle.clone(),
                max_image_mb: args.max_image_mb,
                image_budget_mb: args.image_budget_mb,
            };
            match &args.postgres {
                Some(url) => {
                    crate::cluster::run(
                        opts,
                        crate::cluster::ClusterOptions {
                            database: crate::dev_config::ClusterDatabase {
                                url: url.clone(),
                                password_file: args.postgres_password_file.clone(),
                            },
                            gateways: args.gateways.into(),
                        },
                    )
                    .await
                }
                None => dev::run(opts).await,
            }
        }
        Command::Deploy(a) => {
            if let Some(file) = &a.file {
                // Checked whole before the first call.
                let project = crate::project::load(file, &|k| std::env::var(k).ok())?;
                let client = client(&cli)?;
                return crate::commands::project::deploy(&client, &project).await;
            }
            let (Some(path), Some(name)) = (&a.path, &a.name) else {
                anyhow::bail!("kiln deploy takes a folder and --name, or -f s.yaml");
            };
            let client = client(&cli)?;
            let f = functions::deploy(
                &client,
                &functions::DeployOptions {
                    path: path.clone(),
                    name: name.clone(),
                    runtime: a.runtime.clone(),
                    command: a.command.clone(),
                    args: a.args.clone(),
                    memory_mb: a.memory,
                    concurrency: a.concurrency,
                    timeout_s: a.timeout,
                    port: a.port,
                    env: a.env.clone(),
                },
            )
            .await?;
            println!(
                "deployed {} (codeChecksum {}, codeSize {})",
                name,
                f.get("codeChecksum")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?"),
                f.get("codeSize").map(|v| v.to_string()).unwrap_or_default()
            );
            Ok(())
        }
        Command::Invoke(a) => {
            let client = client(&cli)?;
            let payload = match (&a.data, &a.file) {
                (Some(d), _) => Bytes::from(d.clone()),
                (None, Some(f)) if f.as_os_str() == "-" => {
                    use std::io::Read;
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    Bytes::from(buf)
                }
                (None, Some(f)) => Bytes::from(
                    std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?,
                ),
                (None, None) => Bytes::new(),
            };
            let q = a.qualifier.as_deref();
            if a.asynchronous {
                tasks::invoke_async(&client, &a.name, q, payload, a.task_id.as_deref()).await
            } else {
                functions::invoke(&client, &a.name, q, payload).await
            }
        }
        Command::Tasks(cmd) => {
            let client = client(&cli)?;
            match cmd {
                TasksCommand::List {
                    function,
                    status,
                    prefix,
                    since_ms,
                    until_ms,
                    limit,
                    desc,
                    out,
                } => {
                    let opts = tasks::ListOptions {
                        status: status.clone(),
                        prefix: prefix.clone(),
                        since_ms: *since_ms,
                        until_ms: *until_ms,
                        limit: *limit,
                        descending: *desc,
                    };
                    let all = tasks::list(&client, function, &opts).await?;
                    if out.json() {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                    } else {
                        print!("{}", tasks::table(&all));
                    }
                }
                TasksCommand::Get {
                    function,
                    task,
                    out,
                } => {
                    let t = tasks::get(&client, function, task).await?;
                    crate::output::object(&serde_json::to_value(&t)?, out.json())?;
                }
                TasksCommand::Stop {
                    function,
                    task,
                    out,
                } => {
                    tasks::stop(&client, function, task).await?;
                    let v = serde_json::json!({"functionName": function, "taskId": task, "stopping": true});
                    crate::output::done(&v, out.json(), &format!("stopped {task}"))?;
                }
            }
            Ok(())
        }
        Command::Versions(cmd) => {
            let client = client(&cli)?;
            match cmd {
                VersionsCommand::Publish {
                    function,
                    description,
                    output,
                } => {
                    let v = versions::publish(&client, function, description.as_deref()).await?;
                    crate::output::print_one(*output, &v, versions::versions_table)?;
                }
                VersionsCommand::List { function, output } => {
                    let all = versions::list(&client, function).await?;
                    crate::output::print(*output, &all, versions::versions_table)?;
                }
                VersionsCommand::Delete {
                    function,
                    version,
                    out,
                } => {
                    versions::delete(&client, function, version).await?;
                    let v = serde_json::json!({"functionName": function, "versionId": version, "deleted": true});
                    let text = format!("deleted version {version} of {function}");
                    crate::output::done(&v, out.json(), &text)?;
                }
            }
            Ok(())
        }
        Command::Aliases(cmd) => {
            let client = client(&cli)?;
            match cmd {
                AliasesCommand::Create {
                    function,
                    alias,
                    version,
                    weights,
                    description,
                    output,
                } => {
                    let fields = AliasFields {
                        version: Some(version.clone()),
                        description: description.clone(),
                        weights: Some(versions::parse_weights(weights)?),
                    };
                    let a = versions::create_alias(&client, function, alias, &fields).await?;
                    crate::output::print_one(*output, &a, versions::aliases_table)?;
                }
                AliasesCommand::Get {
                    function,
                    alias,
                    output,
                } => {
                    let a = versions::get_alias(&client, function, alias).await?;
                    crate::output::print_one(*output, &a, versions::aliases_table)?;
                }
                AliasesCommand::Update {
                    function,
                    alias,
                    version,
                    weights,
                    no_weights,
                    description,
                    output,
                } => {
                    let fields = AliasFields {
                        version: version.clone(),
                        description: description.clone(),
                        weights: if *no_weights {
                            Some(Default::default())
                        } else if weights.is_empty() {
                            None
                        } else {
                            Some(versions::parse_weights(weights)?)
                        },
                    };
                    let a = versions::update_alias(&client, function, alias, &fields).await?;
                    crate::output::print_one(*output, &a, versions::aliases_table)?;
                }
                AliasesCommand::Delete {
                    function,
                    alias,
                    out,
                } => {
                    versions::delete_alias(&client, function, alias).await?;
                    let v = serde_json::json!({"functionName": function, "aliasName": alias, "deleted": true});
                    let text = format!("deleted alias {alias} of {function}");
                    crate::output::done(&v, out.json(), &text)?;
                }
                AliasesCommand::List {
                    function,
                    prefix,
                    output,
                } => {
                    let all = versions::list_aliases(&client, function, prefix.as_deref()).await?;
                    crate::output::print(*output, &all, versions::aliases_table)?;
                }
            }
            Ok(())
        }
        Command::Triggers(cmd) => {
            let client = client(&cli)?;
            match cmd {
                TriggersCommand::Create {
                    function,
                    trigger,
                    settings,
                    qualifier,
                    description,
                    output,
                } => {
                    let Some(kind) = settings.trigger_type.clone() else {
                        anyhow::bail!("kiln triggers create needs --type http or --type timer");
                    };
                    let config = settings.config(&kind)?.with_context(|| {
                        format!("a {kind} trigger needs its settings: --method for http, --cron for timer, or --config JSON")
                    })?;
                    let fields = TriggerFields {
                        trigger_type: Some(kind),
                        config: Some(config),
                        qualifier: qualifier.clone(),
                        description: description.clone(),
                    };
                    let t = triggers::create(&client, function, trigger, &fields).await?;
                    crate::output::print_one(*output, &t, triggers::table)?;
                }
                TriggersCommand::Get {
                    function,
                    trigger,
                    output,
                } => {
                    let t = triggers::get(&client, function, trigger).await?;
                    crate::output::print_one(*output, &t, triggers::table)?;
                }
                TriggersCommand::Update {
                    function,
                    trigger,
                    settings,
                    qualifier,
                    description,
                    output,
                } => {
                    let config = match &settings.trigger_type {
                        Some(kind) => settings.config(kind)?,
                        None if settings.config.is_some() => settings.config("")?,
                        None => {
                            // The type is the trigger's own.
                            let current = triggers::get(&client, function, trigger).await?;
                            let kind = current
                                .get("triggerType")
                                .and_then(serde_json::Value::as_str)
                                .unwrap_or_default()
                                .to_owned();
                            settings.config(&kind)?
                        }
                    };
                    let fields = TriggerFields {
                        trigger_type: None,
                        config,
                        qualifier: qualifier.clone(),
                        description: description.clone(),
                    };
                    let t = triggers::update(&client, function, trigger, &fields).await?;
                    crate::output::print_one(*output, &t, triggers::table)?;
                }
                TriggersCommand::Delete {
                    function,
                    trigger,
                    out,
                } => {
                    triggers::delete(&client, function, trigger).await?;
                    let v = serde_json::json!({"functionName": function, "triggerName": trigger, "deleted": true});
                    let text = format!("deleted trigger {trigger} of {function}");
                    crate::output::done(&v, out.json(), &text)?;
                }
                TriggersCommand::List {
                    function,
                    prefix,
                    output,
                } => {
                    let all = triggers::list(&client, function, prefix.as_deref()).await?;
                    crate::output::print(*output, &all, triggers::table)?;
                }
            }
            Ok(())
        }
        Command::Domains(cmd) => {
            let client = client(&cli)?;
            match cmd {
                DomainsCommand::Create {
                    domain,
                    settings,
                    output,
                } => {
                    let d = domains::create(&client, domain, &settings.fields()?).await?;
                    crate::output::print_one(*output, &d, domains::table)?;
                }
                DomainsCommand::Get { domain, output } => {
                    let d = domains::get(&client, domain).await?;
                    crate::output::print_one(*output, &d, domains::table)?;
                }
                DomainsCommand::Update {
                    domain,
                    settings,
                    output,
                } => {
                    let d = domains::update(&client, domain, &settings.fields()?).await?;
                    crate::output::print_one(*output, &d, domains::table)?;
                }
                DomainsCommand::Delete { domain, out } => {
                    domains::delete(&client, domain).await?;
                    let v = serde_json::json!({"domainName": domain, "deleted": true});
                    crate::output::done(
                        &v,
                        out.json(),
                        &format!("deleted custom domain {domain}"),
                    )?;
                }
                DomainsCommand::List { prefix, output } => {
                    let all = domains::list(&client, prefix.as_deref()).await?;
                    crate::output::print(*output, &all, domains::table)?;
                }
            }
            Ok(())
        }
        Command::Functions(cmd) => {
            let client = client(&cli)?;
            match cmd {
                FunctionsCommand::List { prefix, out } => {
                    let fs = client.list_functions(prefix.as_deref()).await?;
                    if out.json() {
                        println!("{}", serde_json::to_string_pretty(&fs)?);
                    } else {
                        functions::print_table(&fs);
                    }
                }
                FunctionsCommand::Get { name, out } => {
                    let f = client.get_function(name).await?;
                    crate::output::object(&serde_json::to_value(&f)?, out.json())?;
                }
                FunctionsCommand::Delete { name, out } => {
                    client.delete_function(name).await?;
                    let v = serde_json::json!({"functionName": name, "deleted": true});
                    crate::output::done(&v, out.json(), &format!("deleted {name}"))?;
                }
            }
            Ok(())
        }
        Command::Provision(cmd) => {
            let action = match cmd {
                ProvisionCommand::Put {
                    function,
                    target,
                    always_allocate_cpu,
                    file,
                    out,
                } => configs::Action::Put {
                    function,
                    body: configs::provision_body(&configs::ProvisionOptions {
                        file: file.clone(),
                        target: *target,
                        always_allocate_cpu: *always_allocate_cpu,
                    })?,
                    json: out.json(),
                },
                ProvisionCommand::Get { function, out } => configs::Action::Get {
                    function,
                    json: out.json(),
                },
                ProvisionCommand::List { function, out } => configs::Action::List {
                    function: function.as_deref(),
                    json: out.json(),
                },
                ProvisionCommand::Delete { function, out } => configs::Action::Delete {
                    function,
                    json: out.json(),
                },
            };
            configs::run(&client(&cli)?, Kind::Provision, action).await
        }
        Command::Concurrency(cmd) => {
            let action = match cmd {
                ConcurrencyCommand::Put {
                    function,
                    reserved,
                    out,
                } => configs::Action::Put {
                    function,
                    body: configs::concurrency_body(*reserved),
                    json: out.json(),
                },
                ConcurrencyCommand::Get { function, out } => configs::Action::Get {
                    function,
                    json: out.json(),
                },
                ConcurrencyCommand::List { function, out } => configs::Action::List {
                    function: function.as_deref(),
                    json: out.json(),
                },
                ConcurrencyCommand::Delete { function, out } => configs::Action::Delete {
                    function,
                    json: out.json(),
                },
            };
            configs::run(&client(&cli)?, Kind::Concurrency, action).await
        }
        Command::Bench(args) => bench::run(args).await,
        // main() runs it before any runtime or logging exists.
        Command::Serve(_) => anyhow::bail!("`kiln serve` runs from main, not here"),
        Command::Runtimes { out } => runtimes::run(&client(&cli)?, out.json()).await,
        Command::Store(StoreCommand::Copy {
            from,
            to,
            from_key_file,
            key_file,
            password_file,
        }) => crate::commands::store::copy(&crate::commands::store::CopyArgs {
            from,
            to,
            from_key_file: from_key_file.as_deref(),
            key_file: key_file.as_deref(),
            password_file: password_file.as_deref(),
        }),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "kiln", &mut std::io::stdout());
            Ok(())
        }
        Command::Logs {
            function,
            request_id,
            follow,
            limit,
        } => {
            observe::logs(
                &client(&cli)?,
                function,
                request_id.as_deref(),
                *follow,
                *limit,
            )
            .await
        }
        Command::Instances { function, out } => {
            observe::instances(&client(&cli)?, function, out.json()).await
        }
        Command::Exec {
            function,
            instance,
            tty,
            command,
        } => {
            let code = observe::exec(&client(&cli)?, function, instance, command, *tty).await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Limits(args) => {
            let state_dir = match &args.state_dir {
                Some(d) => d.clone(),
                None => credentials::default_dir()?,
            };
            let s = nodes::Scheduler::from_state_dir(&state_dir)?;
            match &args.command {
                LimitsCommand::Get { account, out } => {
                    let l = s.limits(account).await?;
                    crate::output::object(&serde_json::to_value(&l)?, out.json())?;
                }
                LimitsCommand::Set { account, file, out } => {
                    let l = s.set_limits(account, &nodes::read_limits(file)?).await?;
                    crate::output::object(&serde_json::to_value(&l)?, out.json())?;
                }
                LimitsCommand::Reset { account, out } => {
                    s.reset_limits(account).await?;
                    let v = serde_json::json!({"accountId": account, "limits": "default"});
                    let text = format!("account {account} is back to the default limits");
                    crate::output::done(&v, out.json(), &text)?;
                }
            }
            Ok(())
        }
        Command::Keys(args) => {
            let state_dir = match &args.state_dir {
                Some(d) => d.clone(),
                None => credentials::default_dir()?,
            };
            let g = keys::Gateway::from_state_dir(&state_dir)?;
            run_keys(&g, &args.command).await
        }
        Command::Nodes(args) => {
            let state_dir = match &args.state_dir {
                Some(d) => d.clone(),
                None => credentials::default_dir()?,
            };
            let s = nodes::Scheduler::from_state_dir(&state_dir)?;
            let (node, action, out) = match &args.command {
                NodesCommand::List { out } => {
                    let all = s.list().await?;
                    if out.json() {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                    } else {
                        nodes::print_table(&all);
                    }
                    return Ok(());
                }
                NodesCommand::Revoke { node, out } => {
                    let r = s.revoke(node).await?;
                    let text = format!(
                        "node {} is revoked; {} of its instances were written off and are replaced elsewhere",
                        r.node_id, r.instances_written_off
                    );
                    return crate::output::done(&serde_json::to_value(&r)?, out.json(), &text);
                }
                NodesCommand::BootstrapToken { ttl, node, out } => {
                    let t = s.bootstrap_token(*ttl, node.as_deref()).await?;
                    return crate::output::object(&serde_json::to_value(&t)?, out.json());
                }
                NodesCommand::Cordon { node, out } => (node, "cordon", out),
                NodesCommand::Drain { node, out } => (node, "drain", out),
                NodesCommand::Uncordon { node, out } => (node, "uncordon", out),
            };
            let n = s.act(node, action).await?;
            let text = format!("node {} is {}", n.node_id, n.state);
            crate::output::done(&serde_json::to_value(&n)?, out.json(), &text)
        }
    }
}

async fn run_keys(g: &keys::Gateway, command: &KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Create { account, out } => {
            let k = g.create(account).await?;
            if out.json() {
                println!("{}", serde_json::to_string_pretty(&k)?);
            } else {
                keys::print_created(&k);
            }
        }
        KeysCommand::List { account, out } => {
            let mut all = g.list().await?;
            if let Some(a) = account {
                all.retain(|k| k.account_id.as_str() == a);
            }
            if out.json() {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                keys::print_table(&all);
            }
        }
        KeysCommand::Disable { id, out } | KeysCommand::Enable { id, out } => {
            let enable = matches!(command, KeysCommand::Enable { .. });
            let k = g.set_enabled(id, enable).await?;
            let text = format!("access key {} is {}", k.access_key_id, k.status);
            crate::output::done(&serde_json::to_value(&k)?, out.json(), &text)?;
        }
        KeysCommand::Delete { id, out } => {
            g.delete(id).await?;
            let v = serde_json::json!({"accessKeyId": id, "deleted": true});
            crate::output::done(&v, out.json(), &format!("access key {id} is deleted"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln_service::LogFormat;

    use super::*;

    #[test]
    fn bootstrap_token_ttls_take_units() {
        let secs = |s: &str| parse_ttl(s).map(|d| d.as_secs());
        assert_eq!(secs("90"), Ok(90));
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(secs("30m"), Ok(1800));
        assert_eq!(secs("12h"), Ok(43_200));
        assert_eq!(secs("7d"), Ok(604_800));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("-1h").is_err());
    }

    #[test]
    fn log_format_is_text_unless_asked_and_works_after_the_subcommand() {
        let cli = Cli::try_parse_from(["kiln", "dev"]).unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Text);
        let cli = Cli::try_parse_from(["kiln", "dev", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["kiln", "--log-format", "json", "dev"]).unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["kiln", "dev", "--log-format", "yaml"]).is_err());
    }

    #[test]
    fn a_cluster_needs_a_database_and_one_gateway_at_least() {
        let dev = |args: &[&str]| {
            Cli::try_parse_from(["kiln", "dev"].iter().chain(args)).map(|c| match c.command {
                Command::Dev(d) => d,
                _ => unreachable!(),
            })
        };
        let one_box = dev(&[]).unwrap();
        assert!(one_box.postgres.is_none());
        let c = dev(&[
            "--postgres",
            "host=/run/postgresql dbname=kiln",
            "--gateways",
            "3",
        ])
        .unwrap();
        assert_eq!(
            c.postgres.as_deref(),
            Some("host=/run/postgresql dbname=kiln")
        );
        assert_eq!(c.gateways, 3);
        assert_eq!(dev(&["--postgres", "x"]).unwrap().gateways, 2);
        assert!(
            dev(&["--gateways", "3"]).is_err(),
            "--gateways without --postgres"
        );
        assert!(dev(&["--postgres-password-file", "/p"]).is_err());
        assert!(dev(&["--postgres", "x", "--gateways", "0"]).is_err());
        // The services of a cluster run from this binary.
        let serve =
            Cli::try_parse_from(["kiln", "serve", "gateway", "--config", "/g.toml"]).unwrap();
        assert!(matches!(serve.command, Command::Serve(_)));
        assert!(!serve.runs_agent());
    }

    #[test]
    fn only_the_bench_leaves_the_access_lines_out() {
        let bench = Cli::try_parse_from(["kiln", "bench"]).unwrap();
        assert_eq!(bench.default_log_filter(), "info,kiln::access=off");
        let dev = Cli::try_parse_from(["kiln", "dev"]).unwrap();
        assert_eq!(dev.default_log_filter(), "info");
    }
}
