//! `retoucher eval`: measured quality of a bundle on a manifest of images with known defects
//! (design §4.8; see [`crate::eval`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::app::{self, StorageKind};
use crate::config::Settings;
use crate::eval::manifest::Manifest;
use crate::eval::EvalOptions;

#[derive(Args)]
pub struct EvalArgs {
    /// JSONL manifest, one image per line: {"id", "image", "prompt", "mask", "clean"?,
    /// "class"?}, paths relative to the manifest; mask > 127 = defect.
    pub manifest: PathBuf,
    /// Output folder: report.json, report.html, cases.jsonl, and each image's result set
    /// under jobs/.
    #[arg(long)]
    pub out: PathBuf,
    /// Also print report.json's object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Images in flight at once (they share the model batchers).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[command(flatten)]
    pub models: ModelArgs,
}

/// Exit status 0 when every line of the manifest was evaluated, 1 otherwise.
pub async fn run(args: EvalArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest, settings.limits.max_prompt_bytes)?;
    let executor = app::executor(&settings, StorageKind::Local).await?;
    let report = crate::eval::evaluate(
        &settings,
        executor,
        manifest,
        EvalOptions {
            out: args.out,
            concurrency: args.concurrency,
        },
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if report.complete() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{} manifest lines were not evaluated", report.failed);
        ExitCode::from(1)
    })
}
