//! `retoucher`: the command line (design §4.1). Subcommands: `worker`, `run`, `enqueue`,
//! `migrate`, `bench`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use retoucher::config::{parse_override, Settings};
use retoucher::execute::Executor;
use retoucher::job::{JobMessage, JobOptions};
use retoucher::{bench, broker, enqueue, run, worker};

/// Automatic post-generation correction of text-to-image output (Agentic Retoucher).
#[derive(Parser)]
#[command(name = "retoucher", version, about, long_about = None)]
struct Cli {
    /// Configuration file (layered over config/default.toml) [env: RETOUCHER_CONFIG]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Override any configuration key, e.g. --set broker.prefetch=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true, value_parser = parse_override)]
    overrides: Vec<(String, String)>,
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "RETOUCHER_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume jobs from RabbitMQ until SIGTERM/SIGINT, then drain.
    Worker {
        /// Queue to consume (broker.queue).
        #[arg(long)]
        queue: Option<String>,
        /// Model bundle folder (models.bundle).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// cpu, cuda or cuda:N (models.device).
        #[arg(long)]
        device: Option<String>,
    },
    /// Retouch local images, folders or JSONL job files without broker or S3.
    Run {
        /// Images, folders of images, or .jsonl files of v1 jobs (image paths relative to the file).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder: one result set per job, plus index.html.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Prompt for plain image inputs.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Jobs in flight at once (they share the model batchers).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Override every job's options.max_iterations.
        #[arg(long)]
        max_iterations: Option<u32>,
        /// Override every job's options.saliency_threshold.
        #[arg(long)]
        saliency_threshold: Option<f32>,
        /// Model bundle folder (models.bundle).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// cpu, cuda or cuda:N (models.device).
        #[arg(long)]
        device: Option<String>,
    },
    /// Publish jobs to the queue with publisher confirms.
    Enqueue {
        /// Job messages as JSON strings, or @FILE.jsonl for one job per line (- for stdin).
        #[arg(required = true)]
        jobs: Vec<String>,
        /// Queue to publish to (broker.queue).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Measure throughput and latency of the real pipeline on generated jobs, and the
    /// model-only throughput of the same sessions.
    Bench {
        /// Jobs to run.
        #[arg(long, default_value_t = 200)]
        jobs: usize,
        /// Jobs in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Override every model's max_batch_size.
        #[arg(long)]
        max_batch_size: Option<usize>,
        /// Override every model's max_delay_ms.
        #[arg(long)]
        max_delay_ms: Option<u64>,
        /// Run the same load again with max_batch_size = 1 and report the ratio.
        #[arg(long)]
        compare_batch_1: bool,
        /// Side of the generated square images, in pixels.
        #[arg(long, default_value_t = 512)]
        image_size: u32,
        /// Share of generated images with magenta blemishes (0..1).
        #[arg(long, default_value_t = 0.5)]
        blemished: f32,
        /// Batches per model in the model-only phase.
        #[arg(long, default_value_t = 30)]
        model_only_batches: usize,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Go through the real broker and S3 (broker.*, s3.*: inputs go to the first allowed
        /// bucket, results to s3.output) with an in-process worker, instead of local files.
        #[arg(long)]
        through_broker: bool,
        /// Model bundle folder (models.bundle).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// cpu, cuda or cuda:N (models.device).
        #[arg(long)]
        device: Option<String>,
    },
    /// Move dead letters back to the jobs queue (all, or by error class or job id), attempts reset.
    Replay {
        /// Only dead letters of these error classes (repeatable), e.g. storage_unavailable,
        /// image_not_found, delivery_limit.
        #[arg(long = "class")]
        classes: Vec<String>,
        /// Only these job ids (repeatable).
        #[arg(long = "job-id")]
        job_ids: Vec<String>,
        /// Move at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// List what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Jobs queue whose dead letters to replay (broker.queue).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Apply the broker topology (queues, exchanges) kept in migrations/.
    Migrate {
        /// Jobs queue whose topology to apply (broker.queue).
        #[arg(long)]
        queue: Option<String>,
        /// Show the current version and what would be applied, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,lapin::channel=off,aws=warn,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Stop the batching tasks, then let the model threads finish and free their sessions
    // before ONNX Runtime is torn down with the process.
    runtime.shutdown_timeout(Duration::from_secs(10));
    if !retoucher::engine::batcher::join_model_threads(Duration::from_secs(30)) {
        tracing::warn!("model threads still running at exit");
    }
    code
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut overrides = cli.overrides.clone();
    let mut set = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            overrides.push((key.to_string(), value));
        }
    };
    let path = |p: Option<PathBuf>| p.map(|p| p.to_string_lossy().into_owned());
    match &cli.command {
        Command::Worker {
            queue,
            bundle,
            device,
        } => {
            set("broker.queue", queue.clone());
            set("models.bundle", path(bundle.clone()));
            set("models.device", device.clone());
        }
        Command::Run { bundle, device, .. } | Command::Bench { bundle, device, .. } => {
            set("models.bundle", path(bundle.clone()));
            set("models.device", device.clone());
        }
        Command::Enqueue { queue, .. }
        | Command::Migrate { queue, .. }
        | Command::Replay { queue, .. } => {
            set("broker.queue", queue.clone());
        }
    }
    let settings = Settings::load(cli.config.as_deref(), &overrides)?;

    match cli.command {
        Command::Worker { .. } => {
            worker::run(settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            inputs,
            out,
            prompt,
            concurrency,
            max_iterations,
            saliency_threshold,
            ..
        } => {
            let options = JobOptions {
                max_iterations,
                saliency_threshold,
            };
            if let Some(n) = max_iterations {
                anyhow::ensure!(
                    n <= retoucher::job::MAX_ITERATIONS_LIMIT,
                    "--max-iterations must be at most {}",
                    retoucher::job::MAX_ITERATIONS_LIMIT
                );
            }
            if let Some(t) = saliency_threshold {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&t),
                    "--saliency-threshold must be in 0..1"
                );
            }
            let agents = worker::load_agents(&settings)
                .await
                .context("loading the model bundle")?;
            let executor = Executor {
                agents,
                storage: retoucher::storage::Storage::local(),
                limits: settings.limits.clone(),
            };
            let summary = run::run(
                &settings,
                executor,
                run::RunOptions {
                    inputs,
                    out,
                    prompt,
                    concurrency,
                    options,
                },
            )
            .await?;
            Ok(if summary.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("{} jobs failed", summary.failed());
                ExitCode::from(1)
            })
        }
        Command::Bench {
            jobs,
            concurrency,
            max_batch_size,
            max_delay_ms,
            compare_batch_1,
            image_size,
            blemished,
            model_only_batches,
            json,
            through_broker,
            ..
        } => {
            anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
            anyhow::ensure!(image_size >= 64, "--image-size must be at least 64");
            let options = bench::BenchOptions {
                jobs,
                concurrency,
                max_batch_size,
                max_delay_ms,
                compare_batch_1,
                image_size,
                blemished: blemished.clamp(0.0, 1.0),
                seed: 42,
                model_only_batches,
                through_broker,
            };
            let report = bench::bench(&settings, &options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue { jobs, .. } => {
            let bodies = read_jobs(&jobs)?;
            let mut valid = Vec::with_capacity(bodies.len());
            let mut invalid = 0;
            for (source, body) in bodies {
                match JobMessage::parse(&body, &settings.limits) {
                    Ok(_) => valid.push(body),
                    Err(e) => {
                        invalid += 1;
                        eprintln!("not enqueued: {source}: {e}");
                    }
                }
            }
            let report =
                enqueue::enqueue(&settings.broker.url, &settings.broker.queue, valid, true).await?;
            for failure in &report.failed {
                eprintln!("job #{} not confirmed: {}", failure.index, failure.reason);
            }
            eprintln!(
                "published {} jobs to {} ({} invalid, {} unconfirmed) in {:.1} s",
                report.published,
                report.queue,
                invalid,
                report.failed.len(),
                report.elapsed.as_secs_f64()
            );
            Ok(if invalid == 0 && report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Replay {
            classes,
            job_ids,
            limit,
            dry_run,
            ..
        } => {
            let conn = broker::connect(&settings.broker.url, "retoucher-replay").await?;
            let filter = retoucher::replay::ReplayFilter {
                classes,
                job_ids,
                limit,
            };
            let queue = &settings.broker.queue;
            let report = retoucher::replay::replay(&conn, queue, &filter, dry_run).await?;
            for letter in &report.matched {
                println!(
                    "{}\t{}\t{}\t{}",
                    if dry_run { "would move" } else { "moved" },
                    letter.job_id.as_deref().unwrap_or("-"),
                    letter.class,
                    letter.reason
                );
            }
            eprintln!(
                "{} {} dead letters to {queue}, {} left in {queue}.dead",
                if dry_run { "would move" } else { "moved" },
                report.matched.len(),
                report.kept + if dry_run { report.matched.len() } else { 0 }
            );
            broker::close(&conn, "done").await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { dry_run, .. } => {
            let conn = broker::connect(&settings.broker.url, "retoucher-migrate").await?;
            let queue = &settings.broker.queue;
            if dry_run {
                let current = broker::topology::current_version(&conn, queue).await?;
                println!(
                    "broker topology for {queue} is at version {current}; this binary knows {}",
                    broker::topology::latest_version()
                );
                for m in broker::topology::plan(queue)? {
                    if m.version > current {
                        println!("would apply {:04} {}", m.version, m.name);
                    }
                }
            } else {
                let report = broker::migrate(&conn, queue).await?;
                println!("{report}");
            }
            broker::close(&conn, "done").await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads job bodies: inline JSON, `@file.jsonl`, or `-` / `@-` for stdin.
fn read_jobs(args: &[String]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut bodies = Vec::new();
    for arg in args {
        let from_lines = |source: &str, text: &str, bodies: &mut Vec<(String, Vec<u8>)>| {
            for (n, line) in text.lines().enumerate() {
                if !line.trim().is_empty() {
                    bodies.push((format!("{source}:{}", n + 1), line.as_bytes().to_vec()));
                }
            }
        };
        if arg == "-" || arg == "@-" {
            let text = std::io::read_to_string(std::io::stdin()).context("reading stdin")?;
            from_lines("stdin", &text, &mut bodies);
        } else if let Some(file) = arg.strip_prefix('@') {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
            from_lines(file, &text, &mut bodies);
        } else {
            bodies.push((
                format!("argument {}", bodies.len() + 1),
                arg.as_bytes().to_vec(),
            ));
        }
    }
    Ok(bodies)
}
