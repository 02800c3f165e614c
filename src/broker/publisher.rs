//! Publishing with publisher confirms: every publish returns only once the broker has taken
//! responsibility for the message (acked it), so the worker acks a job only after its event or
//! dead letter is safe (design §7). A nack, an unroutable message or a missing confirm is an
//! error.
//!
//! Publishes are serialised on the publisher's channel: RabbitMQ reports an unroutable message
//! with a `basic.return` that lapin hands to whichever confirm completes next, so with several
//! publishes in flight a return could be blamed on the wrong caller. One at a time costs one
//! round-trip per publish, which is small next to a job; create more publishers (each has its
//! own channel) for more throughput, or use [`crate::enqueue`] for bulk loads.

use std::{sync::Arc, time::Duration};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Channel, Confirmation, Connection,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::retry::{retry_headers, ATTEMPT_HEADER, DELIVERY_COUNT_HEADER};
use super::{
    dead_letter_queue, short_string, BrokerError, ERROR_CLASS_HEADER, ERROR_HEADER, EVENTS_EXCHANGE,
};
use crate::diagnostics::JobStatus;
use crate::error::{ErrorClass, JobError};

/// AMQP delivery mode that makes the broker write the message to disk.
const PERSISTENT: u8 = 2;
const JSON: &str = "application/json";
/// The reason header of a dead letter is cut to about this many bytes: headers travel with
/// every delivery and are shown in the management UI.
const MAX_ERROR_HEADER_BYTES: usize = 1024;
const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A job lifecycle event, published to `retoucher.events` (design §4.5).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Event {
    pub job_id: String,
    pub status: EventStatus,
    /// Where the results are (`s3://bucket/prefix/job_id/`), when there are any.
    pub output: Option<String>,
    pub attempt: u32,
    pub iterations: u32,
    pub regions: u32,
    pub duration_ms: u64,
    pub error: Option<EventError>,
    /// The job's `metadata`, echoed.
    pub metadata: Option<serde_json::Value>,
}

/// Why a job is retrying or failed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EventError {
    /// An [`ErrorClass::as_str`] name.
    pub class: String,
    pub message: String,
}

/// What an event reports: a success ([`JobStatus`]), a retry or a final failure.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    Retouched,
    Clean,
    Retrying,
    Failed,
}

impl From<JobStatus> for EventStatus {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Retouched => EventStatus::Retouched,
            JobStatus::Clean => EventStatus::Clean,
        }
    }
}

impl Event {
    /// `job.succeeded` for `retouched` and `clean`, `job.retrying` for `retrying`, and
    /// `job.failed` for `failed`.
    pub fn routing_key(&self) -> &'static str {
        match self.status {
            EventStatus::Retouched | EventStatus::Clean => "job.succeeded",
            EventStatus::Retrying => "job.retrying",
            EventStatus::Failed => "job.failed",
        }
    }
}

/// A confirmed publisher on its own channel. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    /// The lock is what serialises publishes (see the module documentation).
    channel: Arc<Mutex<Channel>>,
    confirm_timeout: Duration,
    routable_events: bool,
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode.
    pub async fn new(conn: &Connection) -> Result<Self, BrokerError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::amqp("opening the publisher channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| BrokerError::amqp("enabling publisher confirms", e))?;
        Ok(Publisher {
            channel: Arc::new(Mutex::new(channel)),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            routable_events: false,
        })
    }

    /// How long to wait for the broker's confirm (default 30 s). Past it the publish is an
    /// error, though the broker may still have stored the message: callers retry, and jobs are
    /// idempotent.
    #[must_use]
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Whether an event that no queue is bound to receive is an error (default: no). Events
    /// are publish/subscribe: with no subscriber, dropping them is normal, and failing would
    /// stall every job. Turn it on when some consumer must see every event.
    #[must_use]
    pub fn require_routable_events(mut self, required: bool) -> Self {
        self.routable_events = required;
        self
    }

    /// Whether the channel is still usable. A channel dies with its connection (or if the
    /// broker closes it); the worker then reconnects and builds a new publisher.
    pub async fn is_open(&self) -> bool {
        self.channel.lock().await.status().connected()
    }

    /// Publishes a job (design §4.3): default exchange, routing key = `queue`, JSON,
    /// persistent. An unknown queue is an error (the message would be dropped otherwise).
    pub async fn publish_job(&self, queue: &str, body: &[u8]) -> Result<(), BrokerError> {
        let properties = BasicProperties::default()
            .with_content_type(JSON.into())
            .with_delivery_mode(PERSISTENT);
        self.publish("", queue, body, properties, true).await
    }

    /// Publishes `event` to `retoucher.events` with its [`Event::routing_key`].
    pub async fn publish_event(&self, event: &Event) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(event)?;
        let properties = BasicProperties::default()
            .with_content_type(JSON.into())
            .with_delivery_mode(PERSISTENT)
            .with_timestamp(unix_now());
        self.publish(
            EVENTS_EXCHANGE,
            event.routing_key(),
            &body,
            properties,
            self.routable_events,
        )
        .await
    }

    /// Sends a job that failed for good to `{queue}.dead` (design §4.5): the original body
    /// byte for byte and the original properties and headers, plus `x-retoucher-error-class`
    /// and `x-retoucher-error` (one line, about 1 KiB at most), less the attempt counters
    /// (`x-retoucher-attempt`, `x-delivery-count`), so that a replayed dead letter gets a
    /// full set of attempts again. Persistent whatever the original was.
    pub async fn dead_letter(
        &self,
        queue: &str,
        body: &[u8],
        original: &BasicProperties,
        class: ErrorClass,
        message: &str,
    ) -> Result<(), BrokerError> {
        // A dead letter starts a fresh count of attempts when it is replayed: the reason says
        // how many it took, and the broker's delivery count belongs to the copy being acked.
        let mut headers = FieldTable::default();
        for (key, value) in original.headers().clone().unwrap_or_default().inner() {
            if key.as_str() != ATTEMPT_HEADER && key.as_str() != DELIVERY_COUNT_HEADER {
                headers.insert(key.clone(), value.clone());
            }
        }
        insert_error(&mut headers, class, message);
        let properties = dead_letter_properties(original)
            .with_headers(headers)
            .with_delivery_mode(PERSISTENT);
        self.publish("", &dead_letter_queue(queue), body, properties, true)
            .await
    }

    /// Schedules a job's next attempt (design §4.5): the original body byte for byte, the
    /// original properties and headers, plus `x-retoucher-attempt = next_attempt` and the
    /// `x-retoucher-error-class` / `x-retoucher-error` of the failure, to the delay queue
    /// `delay_queue` with a per-message TTL of `expiration` (see [`super::retry`]). Mandatory
    /// and confirmed: only once this returns `Ok` may the worker ack the failed delivery.
    pub async fn retry(
        &self,
        delay_queue: &str,
        body: &[u8],
        original: &BasicProperties,
        next_attempt: u32,
        error: &JobError,
        expiration: Duration,
    ) -> Result<(), BrokerError> {
        let mut headers = retry_headers(original, next_attempt);
        insert_error(&mut headers, error.class, &error.message);
        let properties = dead_letter_properties(original)
            .with_headers(headers)
            .with_delivery_mode(PERSISTENT)
            .with_expiration(expiration.as_millis().to_string().into());
        self.publish("", delay_queue, body, properties, true).await
    }

    /// Publishes one message and waits for its confirm. `mandatory` makes a message that no
    /// queue receives an error instead of silently dropped.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        let target = describe_target(exchange, routing_key);
        let exchange_name = short_string(exchange)?;
        let routing_key = short_string(routing_key)?;
        let channel = self.channel.lock().await;
        let confirm = channel
            .basic_publish(
                exchange_name,
                routing_key,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                properties,
            )
            .await
            .map_err(|e| BrokerError::amqp(format!("publishing to {target}"), e))?;
        let confirmation = match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Ok(confirmation) => confirmation.map_err(|e| {
                BrokerError::amqp(format!("waiting for the confirm of {target}"), e)
            })?,
            Err(_) => {
                return Err(BrokerError::ConfirmTimeout {
                    target,
                    seconds: self.confirm_timeout.as_secs(),
                })
            }
        };
        drop(channel);
        check_confirmation(confirmation, target)
    }
}

/// Adds `x-retoucher-error-class` and `x-retoucher-error` (one line, about 1 KiB at most).
fn insert_error(headers: &mut FieldTable, class: ErrorClass, message: &str) {
    headers.insert(
        ERROR_CLASS_HEADER.into(),
        AMQPValue::LongString(LongString::from(class.as_str())),
    );
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(one_line(message, MAX_ERROR_HEADER_BYTES))),
    );
}

/// Turns a confirm into a result: only a plain ack means the broker has the message.
pub(crate) fn check_confirmation(
    confirmation: Confirmation,
    target: String,
) -> Result<(), BrokerError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        // RabbitMQ acks a returned message (it was handled: by dropping it), so the return,
        // not the ack, is what counts.
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(BrokerError::Unroutable {
                target,
                reply_code: returned.reply_code,
                reply_text: returned.reply_text.to_string(),
            })
        }
        Confirmation::Nack(None) => Err(BrokerError::Nacked { target }),
        // Only possible if confirm mode were off, which would silently void every guarantee.
        Confirmation::NotRequested => Err(BrokerError::Nacked { target }),
    }
}

pub(crate) fn describe_target(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!("queue `{routing_key}`")
    } else {
        format!("exchange `{exchange}` with routing key `{routing_key}`")
    }
}

/// The original properties minus two that must not be carried over, as RabbitMQ's own
/// dead-lettering does: `expiration` (the dead letter would expire in the dead-letter queue)
/// and `user_id` (the broker rejects a `user_id` other than the publishing connection's user,
/// and closes the channel doing so).
fn dead_letter_properties(original: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! keep {
        ($($getter:ident => $setter:ident),* $(,)?) => {
            $(if let Some(value) = original.$getter().clone() {
                out = out.$setter(value);
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    out
}

/// `message` on one line, cut at a character boundary to at most `max` bytes (with `…`).
fn one_line(message: &str, max: usize) -> String {
    let line = message.replace(['\n', '\r'], " ");
    if line.len() <= max {
        return line;
    }
    let ellipsis = '…';
    let mut cut = max - ellipsis.len_utf8();
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = line[..cut].to_owned();
    out.push(ellipsis);
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_flattens_and_truncates_on_char_boundaries() {
        assert_eq!(one_line("a\nb\r\nc", 100), "a b  c");
        let long = "é".repeat(1000); // 2000 bytes
        let cut = one_line(&long, 1024);
        assert!(cut.len() <= 1024);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn routing_keys_follow_status() {
        let mut event = Event {
            job_id: "j".into(),
            status: EventStatus::Clean,
            output: None,
            attempt: 1,
            iterations: 0,
            regions: 0,
            duration_ms: 1,
            error: None,
            metadata: None,
        };
        assert_eq!(event.routing_key(), "job.succeeded");
        event.status = EventStatus::Retouched;
        assert_eq!(event.routing_key(), "job.succeeded");
        event.status = EventStatus::Retrying;
        assert_eq!(event.routing_key(), "job.retrying");
        event.status = EventStatus::Failed;
        assert_eq!(event.routing_key(), "job.failed");
    }
}
