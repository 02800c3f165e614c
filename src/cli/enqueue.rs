//! `retoucher enqueue`: validate jobs against the v1 contract and publish them with publisher
//! confirms (see [`crate::enqueue`]), reporting every job that was invalid or not confirmed.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::QueueArgs;
use crate::config::Settings;
use crate::enqueue::enqueue;
use crate::job::JobMessage;

#[derive(Args)]
pub struct EnqueueArgs {
    /// Job messages as JSON strings, or @FILE.jsonl for one job per line (- for stdin).
    #[arg(required = true)]
    pub jobs: Vec<String>,
    #[command(flatten)]
    pub queue: QueueArgs,
}

pub async fn run(args: EnqueueArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let bodies = read_jobs(&args.jobs)?;
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
    let report = enqueue(
        &settings.broker.endpoint(),
        &settings.broker.queue,
        valid,
        true,
    )
    .await?;
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

/// Reads job bodies: inline JSON, `@file.jsonl`, or `-` / `@-` for stdin.
fn read_jobs(args: &[String]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut bodies = Vec::new();
    let from_lines = |source: &str, text: &str, bodies: &mut Vec<(String, Vec<u8>)>| {
        for (n, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                bodies.push((format!("{source}:{}", n + 1), line.as_bytes().to_vec()));
            }
        }
    };
    for arg in args {
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
