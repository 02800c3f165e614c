//! `retoucher enqueue`: publishes a batch of job messages with publisher confirms, pipelined
//! (up to [`WINDOW`] confirms in flight rather than one round-trip per job), and reports every
//! job that the broker did not confirm instead of stopping at the first.
//!
//! Bodies are opaque here; the caller has already validated them as v1 jobs.

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::{
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, Confirmation,
};

use crate::broker::{self, BrokerError};

/// Confirms kept in flight: enough to hide the round-trip (and the quorum queue's replication)
/// behind the publishing, bounded so a dead broker is noticed after a window, not a whole batch.
pub const WINDOW: usize = 256;
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What happened to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueueReport {
    pub queue: String,
    /// Jobs the broker confirmed.
    pub published: usize,
    /// Jobs it did not, in index order.
    pub failed: Vec<EnqueueFailure>,
    pub elapsed: Duration,
}

/// One job that was not confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueueFailure {
    /// Its position in the batch, from 0.
    pub index: usize,
    pub reason: String,
}

/// Publishes every body to `queue` (default exchange, routing key = queue, JSON, persistent,
/// mandatory) and waits for the broker's confirms. Fails as a whole only when it cannot start
/// (connection, missing queue); per-job failures are in the report. With `progress`, prints a
/// rate line to stderr about once a second.
pub async fn enqueue(
    endpoint: &broker::Endpoint,
    queue: &str,
    jobs: Vec<Vec<u8>>,
    progress: bool,
) -> anyhow::Result<EnqueueReport> {
    let started = Instant::now();
    let conn = broker::connect(endpoint, "retoucher-enqueue").await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| BrokerError::amqp("opening a channel", e))?;
    // Every message to a missing queue would come back unroutable: say why once, up front.
    channel
        .queue_declare(
            broker::short_string(queue)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|error| {
            if broker::is_not_found(&error) {
                anyhow::anyhow!("queue `{queue}` does not exist: run `retoucher migrate` first")
            } else {
                BrokerError::amqp(format!("checking queue `{queue}`"), error).into()
            }
        })?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| BrokerError::amqp("enabling publisher confirms", e))?;

    let mut outcomes: Vec<Option<String>> = vec![None; jobs.len()];
    let mut returned: Vec<(usize, BasicReturnMessage)> = Vec::new();
    let mut meter = Progress::new(progress, jobs.len());
    let mut in_flight = FuturesUnordered::new();
    let routing_key = broker::short_string(queue)?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);

    for (index, body) in jobs.iter().enumerate() {
        if in_flight.len() >= WINDOW {
            if let Some(done) = in_flight.next().await {
                settle(done, &mut outcomes, &mut returned);
                meter.tick();
            }
        }
        let published = channel
            .basic_publish(
                "".into(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties.clone(),
            )
            .await;
        match published {
            Ok(confirm) => in_flight.push(async move { (index, confirm.await) }),
            Err(error) => {
                outcomes[index] = Some(format!("not published: {error}"));
                meter.tick();
                if !channel.status().connected() {
                    // Nothing more will get through this channel; say so for each job left.
                    for outcome in &mut outcomes[index + 1..] {
                        *outcome = Some(format!("not published: {error}"));
                    }
                    break;
                }
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(done, &mut outcomes, &mut returned);
        meter.tick();
    }
    attribute_returns(&jobs, returned, &mut outcomes);

    crate::broker::close(&conn, "enqueue done").await;
    let failed: Vec<EnqueueFailure> = outcomes
        .into_iter()
        .enumerate()
        .filter_map(|(index, outcome)| outcome.map(|reason| EnqueueFailure { index, reason }))
        .collect();
    let report = EnqueueReport {
        queue: queue.to_owned(),
        published: jobs.len() - failed.len(),
        failed,
        elapsed: started.elapsed(),
    };
    meter.finish(&report);
    Ok(report)
}

/// Records the outcome of one confirm. A returned message is kept aside: it is not
/// necessarily this job's (see [`attribute_returns`]).
fn settle(
    (index, confirmation): (usize, Result<Confirmation, lapin::Error>),
    outcomes: &mut [Option<String>],
    returned: &mut Vec<(usize, BasicReturnMessage)>,
) {
    match confirmation {
        Ok(Confirmation::Ack(None)) => {}
        Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) => {
            returned.push((index, message));
        }
        Ok(Confirmation::Nack(None)) => {
            outcomes[index] = Some("refused by the broker (nack)".to_owned());
        }
        Ok(Confirmation::NotRequested) => {
            outcomes[index] = Some("no confirm requested".to_owned());
        }
        Err(error) => {
            outcomes[index] = Some(format!("unconfirmed, may or may not be queued: {error}"));
        }
    }
}

/// lapin attaches each `basic.return` to whichever confirm it completes next, and with
/// multiple-acks that may be another job of the same window. The returned message carries
/// the body, so the job it belongs to is the one with that body nearest the confirm (identical
/// bodies are interchangeable anyway).
fn attribute_returns(
    jobs: &[Vec<u8>],
    returned: Vec<(usize, BasicReturnMessage)>,
    outcomes: &mut [Option<String>],
) {
    for (index, message) in returned {
        let reason = format!("unroutable: {} {}", message.reply_code, message.reply_text);
        let low = index.saturating_sub(WINDOW);
        let high = (index + WINDOW).min(jobs.len().saturating_sub(1));
        let owner = std::iter::once(index)
            .chain(low..=high)
            .find(|&i| outcomes[i].is_none() && jobs[i] == message.delivery.data)
            .unwrap_or(index);
        outcomes[owner] = Some(reason);
    }
}

/// Rate lines on stderr, at most one per [`PROGRESS_EVERY`].
struct Progress {
    enabled: bool,
    total: usize,
    done: usize,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(enabled: bool, total: usize) -> Self {
        let now = Instant::now();
        Progress {
            enabled,
            total,
            done: 0,
            started: now,
            last: now,
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        if self.enabled && self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            let seconds = self.started.elapsed().as_secs_f64();
            eprintln!(
                "enqueue: {}/{} confirmed ({:.0} jobs/s)",
                self.done,
                self.total,
                self.done as f64 / seconds
            );
        }
    }

    fn finish(&self, report: &EnqueueReport) {
        if self.enabled {
            let seconds = report.elapsed.as_secs_f64();
            eprintln!(
                "enqueue: {} published to `{}`, {} failed, in {:.1}s ({:.0} jobs/s)",
                report.published,
                report.queue,
                report.failed.len(),
                seconds,
                report.published as f64 / seconds.max(1e-9)
            );
        }
    }
}
