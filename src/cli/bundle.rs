//! `retoucher bundle`: checks a model bundle before it is deployed (`check`) and writes the
//! checksums of a bundle edited by hand (`lock`). See [`crate::bundle::check`] and
//! [`crate::bundle::lock`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Settings;

#[derive(Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    pub command: BundleCommand,
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Check a bundle: manifest, checksums, every model against its agent's contract (with one
    /// warm-up request each), tokenizers, taxonomy and routing. Reports every problem; exits 1
    /// if there is any.
    Check(CheckArgs),
    /// Write the sha256 of every file the manifest refers to into [files] of bundle.toml,
    /// keeping the rest of the file (comments included).
    Lock(LockArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The bundle folder (holding bundle.toml).
    pub dir: PathBuf,
    /// Where the models run: cpu, cuda or cuda:N (models.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct LockArgs {
    /// The bundle folder (holding bundle.toml).
    pub dir: PathBuf,
    /// Print what was written as one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl BundleArgs {
    /// The configuration keys this command's flags set.
    pub fn device(&self) -> Option<String> {
        match &self.command {
            BundleCommand::Check(args) => args.device.clone(),
            BundleCommand::Lock(_) => None,
        }
    }
}

pub async fn run(args: BundleArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    match args.command {
        BundleCommand::Check(args) => {
            let engine = settings.models.engine_options()?;
            let report = crate::bundle::check::check(&args.dir, &engine, &settings.batching).await;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        BundleCommand::Lock(args) => {
            let report = crate::bundle::lock::lock(&args.dir)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
