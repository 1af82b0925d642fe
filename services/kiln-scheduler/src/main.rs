//! `kiln-scheduler --config FILE`, or `kiln-scheduler simulate ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_scheduler::placement::{default_account_limits, PlacementConfig};
use kiln_scheduler::simulate::{self, BenchConfig, SimConfig, Workload};
use kiln_scheduler::SchedulerConfig;
use kiln_service::{exit, LogArgs, Output, Service};

#[derive(Parser)]
#[command(version, about = "Kiln's scheduling service")]
struct Args {
    /// The TOML configuration file (to serve).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the placement core against in-process fake agents: a decision
    /// benchmark, then trace-driven simulations on a simulated clock.
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Only the decision benchmark.
    #[arg(long, conflicts_with = "no_bench")]
    bench_only: bool,
    /// Skip the decision benchmark.
    #[arg(long)]
    no_bench: bool,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 10_000)]
    functions: usize,
    #[arg(long, default_value_t = 50_000)]
    instances: usize,
    /// Acquire-and-release pairs to time.
    #[arg(long, default_value_t = 2_000_000)]
    decisions: usize,
    /// Workloads to simulate (steady, diurnal, bursty); all by default.
    #[arg(long, value_delimiter = ',')]
    workload: Vec<Workload>,
    /// Simulated hours per workload.
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// Mean calls per second over the cluster.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Instances one account may hold (the burst pool).
    #[arg(long, default_value_t = 300)]
    burst: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match (args.command, args.config) {
        (Some(Command::Simulate(s)), _) => {
            // The simulator's instances come and go by the thousand: only
            // warnings.
            kiln_service::logging::init(args.log.log_format, "warn", Output::Stdout);
            run_simulate(&s);
            ExitCode::SUCCESS
        }
        (None, Some(config)) => Service::new("kiln-scheduler", config, &args.log).run_until(
            SchedulerConfig::load,
            kiln_scheduler::start,
            |handle| handle.deposed(),
            |handle| handle.shutdown(),
        ),
        (None, None) => {
            eprintln!(
                "kiln-scheduler: say --config FILE to serve, or `simulate` to run the simulator"
            );
            ExitCode::from(exit::FAILED)
        }
    }
}

fn run_simulate(a: &SimulateArgs) {
    if !a.no_bench {
        let r = simulate::bench(&BenchConfig {
            nodes: a.nodes,
            functions: a.functions,
            instances: a.instances,
            decisions: a.decisions,
            // A tenth of the instances busy at any time.
            in_flight: (a.instances / 10).max(1),
            seed: a.seed,
            ..BenchConfig::default()
        });
        println!("{r}");
    }
    if a.bench_only {
        return;
    }
    let workloads = if a.workload.is_empty() {
        Workload::ALL.to_vec()
    } else {
        a.workload.clone()
    };
    for w in workloads {
        let r = simulate::simulate(
            &SimConfig {
                workload: w,
                hours: a.hours,
                mean_rate: a.rate,
                seed: a.seed,
                ..SimConfig::default()
            },
            PlacementConfig {
                default_limits: kiln_internal_api::AccountLimits {
                    burst_instances: a.burst,
                    ..default_account_limits()
                },
                ..PlacementConfig::default()
            },
        );
        println!("{r}");
    }
}
