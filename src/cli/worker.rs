//! `retoucher worker`: consume jobs until SIGTERM/SIGINT, then drain (see [`crate::worker`]).

use std::process::ExitCode;

use clap::Args;

use super::{ModelArgs, QueueArgs};
use crate::config::Settings;

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub models: ModelArgs,
}

pub async fn run(_args: WorkerArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    crate::worker::run(settings).await?;
    Ok(ExitCode::SUCCESS)
}
