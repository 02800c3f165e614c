//! The RabbitMQ side of the worker: connecting ([`connection`]), the versioned topology that
//! `retoucher migrate` applies and the worker verifies at start ([`topology`]), TLS for
//! `amqps://` URLs ([`tls`]), the confirmed
//! publisher for jobs, events, retries and dead letters ([`publisher`]), and the retry policy
//! that counts attempts and picks the delay queue ([`retry`]).
//!
//! Names shared by every module live here so that the contract (design §4.3, §4.5) is written
//! down once.

pub mod connection;
pub mod publisher;
pub mod retry;
pub mod tls;
pub mod topology;

pub use connection::{close, connect, connect_with_retry, redact, Endpoint};
pub use publisher::{Event, EventError, EventStatus, Publisher};
pub use retry::{attempt_of, RetryDecision, RetryPolicy, ATTEMPT_HEADER};
pub use tls::TlsFiles;
pub use topology::{migrate, migrate_to, verify, MigrationReport, Migrations};

use crate::error::{ErrorClass, JobError};

/// The jobs queue when `broker.queue` is not set.
pub const DEFAULT_QUEUE: &str = "retoucher.jobs";
/// Topic exchange that carries job lifecycle events.
pub const EVENTS_EXCHANGE: &str = "retoucher.events";
/// Direct exchange the jobs queue dead-letters into when its delivery limit is hit.
pub const DEAD_LETTER_EXCHANGE: &str = "retoucher.dlx";
/// Header naming the [`ErrorClass`] of a dead-lettered job.
pub const ERROR_CLASS_HEADER: &str = "x-retoucher-error-class";
/// Header carrying the one-line reason of a dead-lettered job.
pub const ERROR_HEADER: &str = "x-retoucher-error";

/// The dead-letter queue that belongs to a jobs queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The retry delay queue of step `step` (1-based) of a jobs queue (topology v2).
pub fn delay_queue(queue: &str, step: usize) -> String {
    format!("{queue}.retry.{step}")
}

/// Everything that can go wrong talking to RabbitMQ.
///
/// Messages carry the broker's own reason (they are shown to operators and end up in job
/// errors), and never a password: URLs are always [`redact`]ed first.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error("cannot connect to the broker at {url}: {error}")]
    Connect { url: String, error: lapin::Error },

    /// The TLS handshake failed: `reason` says whose certificate was refused and what to set.
    #[error("cannot connect to the broker at {url}: {reason}")]
    Tls { url: String, reason: String },

    /// `broker.tls.*` do not fit together or with `broker.url`.
    #[error("invalid TLS settings for the broker: {reason}")]
    TlsSettings { reason: String },

    /// A file named by `broker.tls.*` cannot be used.
    #[error("{key} = {}: {reason}", path.display())]
    TlsFile {
        key: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },

    #[error("timed out after {seconds}s connecting to the broker at {url}")]
    ConnectTimeout { url: String, seconds: u64 },

    #[error("gave up connecting to the broker at {url} after {attempts} attempts: {last}")]
    RetriesExhausted {
        url: String,
        attempts: u32,
        last: Box<BrokerError>,
    },

    /// An AMQP operation failed; `operation` says which (e.g. "declaring queue `x`").
    #[error("{operation}: {error}")]
    Amqp {
        operation: String,
        error: lapin::Error,
    },

    #[error("the broker refused (nack) the message published to {target}")]
    Nacked { target: String },

    #[error(
        "the broker could not route the message published to {target}: {reply_code} {reply_text}"
    )]
    Unroutable {
        target: String,
        reply_code: u16,
        reply_text: String,
    },

    #[error("no confirm from the broker within {seconds}s for the message published to {target}")]
    ConfirmTimeout { target: String, seconds: u64 },

    #[error("invalid name `{name}`: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("broker topology for `{queue}` is at version {current}, this worker needs {needed}: run `retoucher migrate`")]
    TopologyBehind {
        queue: String,
        current: u32,
        needed: u32,
    },

    /// The broker is past every version this binary knows, and version `needed` among them is
    /// not additive: what it changed, this binary cannot follow.
    #[error("broker topology for `{queue}` is at version {current}, and version {needed} of it is not additive, while this binary knows versions up to {known} only: upgrade the worker (deploy one built with topology version {needed} or later)")]
    TopologyAhead {
        queue: String,
        current: u32,
        known: u32,
        needed: u32,
    },

    #[error("broker topology for `{queue}` is at version {version} but {what} is missing: run `retoucher migrate`")]
    TopologyIncomplete {
        queue: String,
        version: u32,
        what: String,
    },

    #[error("migration {name} is invalid: {reason}")]
    InvalidMigration { name: String, reason: String },

    #[error("cannot serialise the event: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl BrokerError {
    /// Wraps a lapin error with what we were doing when it happened.
    pub(crate) fn amqp(operation: impl Into<String>, error: lapin::Error) -> Self {
        BrokerError::Amqp {
            operation: operation.into(),
            error,
        }
    }
}

impl From<BrokerError> for JobError {
    fn from(error: BrokerError) -> Self {
        // Whatever went wrong on the broker side, the job itself may well succeed later.
        JobError::new(ErrorClass::BrokerUnavailable, error.to_string())
    }
}

/// Whether a lapin error is the broker saying "no such exchange/queue" (404 NOT_FOUND).
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
    )
}

/// An AMQP short string (exchange, queue, routing key): at most 255 bytes. lapin's `From`
/// conversions panic past that, so every name that comes from configuration or a caller
/// goes through here.
pub(crate) fn short_string(name: &str) -> Result<lapin::types::ShortString, BrokerError> {
    lapin::types::ShortString::try_new(name).map_err(|_| BrokerError::InvalidName {
        name: name.chars().take(64).collect::<String>() + "…",
        reason: format!("{} bytes, AMQP names are at most 255", name.len()),
    })
}
