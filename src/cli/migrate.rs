//! `retoucher migrate`: apply the broker topology kept in `migrations/` (see
//! [`crate::broker::topology`]), or show what would be applied.

use std::process::ExitCode;

use clap::Args;

use super::QueueArgs;
use crate::broker;
use crate::config::Settings;

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Show the current version and what would be applied, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: MigrateArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let migrations = settings.broker.migrations()?;
    let conn = broker::connect(&settings.broker.endpoint(), "retoucher-migrate").await?;
    let queue = &settings.broker.queue;
    let result = if args.dry_run {
        plan(&conn, &migrations, queue).await
    } else {
        migrations
            .migrate(&conn, queue)
            .await
            .map(|report| println!("{report}"))
            .map_err(Into::into)
    };
    broker::close(&conn, "done").await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the broker's version and the migrations a real run would apply.
async fn plan(
    conn: &lapin::Connection,
    migrations: &broker::Migrations,
    queue: &str,
) -> anyhow::Result<()> {
    let current = broker::topology::current_version(conn, queue).await?;
    println!(
        "broker topology for {queue} is at version {current}; the {} migrations go up to {}",
        migrations.source(),
        migrations.latest()
    );
    for m in migrations.plan(queue)? {
        if m.version > current {
            let kind = if m.additive {
                "additive: running workers keep consuming"
            } else {
                "not additive: workers of earlier versions stop"
            };
            println!("would apply {:04} {} ({kind})", m.version, m.name);
        }
    }
    Ok(())
}
