//! `retoucher replay`: move dead letters back to the jobs queue (see [`crate::replay`]).

use std::process::ExitCode;

use clap::Args;

use super::QueueArgs;
use crate::broker;
use crate::config::Settings;
use crate::replay::{replay, ReplayFilter};

#[derive(Args)]
pub struct ReplayArgs {
    /// Only dead letters of these error classes (repeatable), e.g. storage_unavailable,
    /// image_not_found, delivery_limit.
    #[arg(long = "class")]
    pub classes: Vec<String>,
    /// Only these job ids (repeatable).
    #[arg(long = "job-id")]
    pub job_ids: Vec<String>,
    /// Move at most this many.
    #[arg(long)]
    pub limit: Option<usize>,
    /// List what would move; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub queue: QueueArgs,
}

pub async fn run(args: ReplayArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let conn = broker::connect(&settings.broker.endpoint(), "retoucher-replay").await?;
    let filter = ReplayFilter {
        classes: args.classes,
        job_ids: args.job_ids,
        limit: args.limit,
    };
    let queue = &settings.broker.queue;
    let dry_run = args.dry_run;
    let result = replay(&conn, queue, &filter, dry_run).await;
    broker::close(&conn, "done").await;
    let report = result?;
    let verb = if dry_run { "would move" } else { "moved" };
    for letter in &report.matched {
        println!(
            "{verb}\t{}\t{}\t{}",
            letter.job_id.as_deref().unwrap_or("-"),
            letter.class,
            letter.reason
        );
    }
    eprintln!(
        "{verb} {} dead letters to {queue}, {} left in {queue}.dead",
        report.matched.len(),
        report.kept + if dry_run { report.matched.len() } else { 0 }
    );
    Ok(ExitCode::SUCCESS)
}
