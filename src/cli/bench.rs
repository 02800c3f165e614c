//! `retoucher bench`: throughput and latency of the real pipeline (see [`crate::bench`]).

use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::bench::{self, BenchOptions};
use crate::config::Settings;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub options: BenchOptions,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub models: ModelArgs,
}

pub async fn run(args: BenchArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let options = args.options.checked()?;
    let report = bench::bench(&settings, &options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
