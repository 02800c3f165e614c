//! The command line (design §4.1): one module per subcommand, each with its clap arguments and
//! what it does. The flags that name configuration keys (`--queue`, `--bundle`, `--device`, and
//! `--set` for any key) are layered over the configuration here, once, for every command.

pub mod bench;
pub mod bundle;
pub mod enqueue;
pub mod eval;
pub mod migrate;
pub mod replay;
pub mod run;
pub mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_override, Settings};

/// Automatic post-generation correction of text-to-image output (Agentic Retoucher).
#[derive(Parser)]
#[command(name = "retoucher", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (layered over config/default.toml) [env: RETOUCHER_CONFIG]
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Override any configuration key, e.g. --set broker.prefetch=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true, value_parser = parse_override)]
    pub overrides: Vec<(String, String)>,
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "RETOUCHER_LOG_FORMAT")]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Consume jobs from RabbitMQ until SIGTERM/SIGINT, then drain.
    Worker(worker::WorkerArgs),
    /// Retouch local images, folders, JSONL job files or evaluation manifests without broker or S3.
    Run(run::RunArgs),
    /// Publish jobs to the queue with publisher confirms.
    Enqueue(enqueue::EnqueueArgs),
    /// Measure throughput and latency of the real pipeline on generated jobs, and the
    /// model-only throughput of the same sessions.
    Bench(bench::BenchArgs),
    /// Measure quality on a manifest of images with known defects: localisation, restoration,
    /// harm and the loop, overall and per class (report.json, report.html).
    Eval(eval::EvalArgs),
    /// Move dead letters back to the jobs queue (all, or by error class or job id), attempts reset.
    Replay(replay::ReplayArgs),
    /// Apply the broker topology (queues, exchanges) kept in migrations/.
    Migrate(migrate::MigrateArgs),
    /// Check a model bundle before it is deployed, or write its checksums.
    Bundle(bundle::BundleArgs),
}

/// The model flags of the commands that load a bundle.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// Model bundle folder (models.bundle).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// cpu, cuda or cuda:N (models.device).
    #[arg(long)]
    pub device: Option<String>,
}

/// The queue flag of the commands that talk to the broker.
#[derive(Args, Debug, Clone, Default)]
pub struct QueueArgs {
    /// Jobs queue (broker.queue).
    #[arg(long)]
    pub queue: Option<String>,
}

/// Configuration keys set by a command's flags.
#[derive(Default)]
struct Overrides(Vec<(String, String)>);

impl Overrides {
    fn set(&mut self, key: &str, value: Option<String>) {
        if let Some(value) = value {
            self.0.push((key.to_string(), value));
        }
    }

    fn models(&mut self, args: &ModelArgs) {
        let bundle = args
            .bundle
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        self.set("models.bundle", bundle);
        self.set("models.device", args.device.clone());
    }

    fn queue(&mut self, args: &QueueArgs) {
        self.set("broker.queue", args.queue.clone());
    }
}

impl Cli {
    /// Reads the settings (every layer, this command's flags last) and runs the command.
    pub async fn dispatch(self) -> anyhow::Result<ExitCode> {
        let mut overrides = Overrides(self.overrides);
        match &self.command {
            Command::Worker(args) => {
                overrides.queue(&args.queue);
                overrides.models(&args.models);
            }
            Command::Run(args) => overrides.models(&args.models),
            Command::Bench(args) => overrides.models(&args.models),
            Command::Eval(args) => overrides.models(&args.models),
            Command::Enqueue(args) => overrides.queue(&args.queue),
            Command::Replay(args) => overrides.queue(&args.queue),
            Command::Migrate(args) => overrides.queue(&args.queue),
            Command::Bundle(args) => overrides.set("models.device", args.device()),
        }
        let settings = Settings::load(self.config.as_deref(), &overrides.0)?;
        match self.command {
            Command::Worker(args) => worker::run(args, settings).await,
            Command::Run(args) => run::run(args, settings).await,
            Command::Bench(args) => bench::run(args, settings).await,
            Command::Eval(args) => eval::run(args, settings).await,
            Command::Enqueue(args) => enqueue::run(args, settings).await,
            Command::Replay(args) => replay::run(args, settings).await,
            Command::Migrate(args) => migrate::run(args, settings).await,
            Command::Bundle(args) => bundle::run(args, settings).await,
        }
    }
}
