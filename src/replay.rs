//! `retoucher replay`: moves dead letters back to the jobs queue, all of them or those matching
//! an error class or job id, with a dry run that only lists what would move.
//!
//! Messages are taken with `basic.get` and kept unacknowledged while the queue is scanned, so
//! none is seen twice; a match is republished to the jobs queue (body untouched, retry and
//! error headers removed, so its attempts start again at 1) and acknowledged only once the
//! broker confirmed the copy; everything else is returned to the dead queue at the end.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};

use crate::broker::{dead_letter_queue, Publisher, ERROR_CLASS_HEADER, ERROR_HEADER};
use crate::job::JobMessage;

/// Headers that describe a past life in the queues; dropped so the replayed job starts afresh.
const RESET_HEADERS: &[&str] = &[
    ERROR_CLASS_HEADER,
    ERROR_HEADER,
    "x-retoucher-attempt",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];

/// Which dead letters to move.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Error classes (`x-retoucher-error-class`; `delivery_limit` for messages the broker
    /// dead-lettered after too many deliveries). Empty = any.
    pub classes: Vec<String>,
    /// Job ids. Empty = any.
    pub job_ids: Vec<String>,
    /// Move at most this many.
    pub limit: Option<usize>,
}

/// One dead letter as listed by `replay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub job_id: Option<String>,
    pub class: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Dead letters that matched (moved, or would move in a dry run).
    pub matched: Vec<DeadLetter>,
    /// Dead letters left where they were.
    pub kept: usize,
}

fn header_string(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The class of a dead letter: the worker's header, or the broker's own reason.
fn class_of(properties: &BasicProperties) -> (String, String) {
    if let Some(class) = header_string(properties, ERROR_CLASS_HEADER) {
        let reason = header_string(properties, ERROR_HEADER).unwrap_or_default();
        return (class, reason);
    }
    let reason = header_string(properties, "x-first-death-reason").unwrap_or_default();
    match reason.as_str() {
        "delivery_limit" => (
            "delivery_limit".to_string(),
            "the broker dead-lettered it after too many deliveries (workers crashed on it?)"
                .to_string(),
        ),
        "" => ("unknown".to_string(), String::new()),
        other => (
            other.to_string(),
            format!("dead-lettered by the broker: {other}"),
        ),
    }
}

fn reset(properties: &BasicProperties) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(k, _)| !RESET_HEADERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers = FieldTable::from(kept);
    properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
}

/// Scans `<queue>.dead` and moves (or, with `dry_run`, lists) the matching dead letters.
pub async fn replay(
    conn: &Connection,
    queue: &str,
    filter: &ReplayFilter,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    let dead = dead_letter_queue(queue);
    let channel = conn.create_channel().await?;
    let declared = channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the dead-letter queue {dead} is not there ({e}): run `retoucher migrate`"
            )
        })?;
    let total = declared.message_count() as usize;
    let publisher = Publisher::new(conn).await?;
    let mut report = ReplayReport::default();
    let mut held = Vec::new();
    for _ in 0..total {
        let Some(message) = channel
            .basic_get(dead.as_str().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let (class, reason) = class_of(&delivery.properties);
        let job_id = JobMessage::sniff_job_id(&delivery.data);
        let limit_reached = filter.limit.is_some_and(|n| report.matched.len() >= n);
        let matches = !limit_reached
            && (filter.classes.is_empty() || filter.classes.contains(&class))
            && (filter.job_ids.is_empty()
                || job_id
                    .as_ref()
                    .is_some_and(|id| filter.job_ids.contains(id)));
        if !matches || dry_run {
            if matches {
                report.matched.push(DeadLetter {
                    job_id,
                    class,
                    reason,
                });
            } else {
                report.kept += 1;
            }
            // Held unacknowledged so basic.get moves on; returned at the end.
            held.push(delivery);
            continue;
        }
        publisher
            .publish("", queue, &delivery.data, reset(&delivery.properties), true)
            .await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        report.matched.push(DeadLetter {
            job_id,
            class,
            reason,
        });
    }
    for delivery in held {
        delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
    }
    let _ = channel.close(200, "replay done".into()).await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{LongString, ShortString};

    fn props(headers: &[(&str, &str)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(
                ShortString::from(*k),
                AMQPValue::LongString(LongString::from(*v)),
            );
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn classes_come_from_the_worker_or_the_broker() {
        let p = props(&[
            (ERROR_CLASS_HEADER, "image_not_found"),
            (ERROR_HEADER, "gone"),
        ]);
        assert_eq!(class_of(&p), ("image_not_found".into(), "gone".into()));
        let p = props(&[("x-first-death-reason", "delivery_limit")]);
        assert_eq!(class_of(&p).0, "delivery_limit");
        assert_eq!(class_of(&props(&[])).0, "unknown");
    }

    #[test]
    fn reset_drops_retry_and_error_headers_only() {
        let p = props(&[
            (ERROR_CLASS_HEADER, "timeout"),
            ("x-retoucher-attempt", "4"),
            ("x-custom", "kept"),
        ]);
        let headers = reset(&p).headers().clone().unwrap();
        let names: Vec<_> = headers.inner().keys().map(|k| k.to_string()).collect();
        assert_eq!(names, vec!["x-custom".to_string()]);
    }
}
