//! `retoucher run`: the embedded default, local images or JSONL job files through the same
//! pipeline without broker or S3 (see [`crate::run`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::app::{self, StorageKind};
use crate::config::Settings;
use crate::job::{JobOptions, MAX_DIFFUSION_STEPS_LIMIT, MAX_ITERATIONS_LIMIT};

#[derive(Args)]
pub struct RunArgs {
    /// Images, folders of images, or .jsonl files of v1 jobs (image paths relative to the file).
    #[arg(required_unless_present = "manifest")]
    pub inputs: Vec<PathBuf>,
    /// Evaluation manifest (design §4.8; repeatable): each line runs as a job with its id,
    /// image and prompt, and the contact sheet shows its ground truth.
    #[arg(long)]
    pub manifest: Vec<PathBuf>,
    /// Output folder: one result set per job, plus index.html.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Prompt for plain image inputs.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Jobs in flight at once (they share the model batchers).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Override every job's options.max_iterations.
    #[arg(long)]
    pub max_iterations: Option<u32>,
    /// Override every job's options.saliency_threshold.
    #[arg(long)]
    pub saliency_threshold: Option<f32>,
    /// Override every job's options.diffusion_steps (denoising steps of diffusion repairs,
    /// clamped to the bundle's max_steps).
    #[arg(long)]
    pub diffusion_steps: Option<u32>,
    #[command(flatten)]
    pub models: ModelArgs,
}

impl RunArgs {
    /// The per-job option overrides the flags ask for, checked against the job contract.
    pub fn options(&self) -> anyhow::Result<JobOptions> {
        if let Some(n) = self.max_iterations {
            anyhow::ensure!(
                n <= MAX_ITERATIONS_LIMIT,
                "--max-iterations must be at most {MAX_ITERATIONS_LIMIT}"
            );
        }
        if let Some(t) = self.saliency_threshold {
            anyhow::ensure!(
                (0.0..=1.0).contains(&t),
                "--saliency-threshold must be in 0..1"
            );
        }
        if let Some(n) = self.diffusion_steps {
            anyhow::ensure!(
                (1..=MAX_DIFFUSION_STEPS_LIMIT).contains(&n),
                "--diffusion-steps must be in 1..={MAX_DIFFUSION_STEPS_LIMIT}"
            );
        }
        Ok(JobOptions {
            max_iterations: self.max_iterations,
            saliency_threshold: self.saliency_threshold,
            diffusion_steps: self.diffusion_steps,
        })
    }
}

pub async fn run(args: RunArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let options = args.options()?;
    let executor = app::executor(&settings, StorageKind::Local).await?;
    let summary = crate::run::run(
        &settings,
        executor,
        crate::run::RunOptions {
            inputs: args.inputs,
            manifests: args.manifest,
            out: args.out,
            prompt: args.prompt,
            concurrency: args.concurrency,
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
