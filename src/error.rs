//! Job failure taxonomy: every way a job can fail, and whether a retry can help.
//!
//! The worker maps a [`JobError`] to an outcome: transient errors are retried, permanent ones
//! go to the dead-letter queue with `x-retoucher-error-class` = [`ErrorClass::as_str`] and
//! `x-retoucher-error` = the one-line message.

use std::fmt;

/// Why a job failed. The string form is part of the contract (dead-letter header, events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The message is not a valid v1 job (JSON, types, required fields, limits).
    InvalidMessage,
    /// The job names a bucket outside `s3.allowed_buckets`.
    BucketNotAllowed,
    /// The input object does not exist.
    ImageNotFound,
    /// The input is not a decodable PNG/JPEG, or is truncated.
    UndecodableImage,
    /// The input is over the byte or pixel limit.
    ImageTooLarge,
    /// S3 could not be reached or answered with a server error / throttling.
    StorageUnavailable,
    /// The broker could not be reached (publishing events, dead letters).
    BrokerUnavailable,
    /// A deadline was exceeded.
    Timeout,
    /// A model cannot run this input (it fails alone, whatever its batch), or the bundle is
    /// broken.
    ModelError,
    /// A model could not run for a reason that is not the input's (out of device memory, device
    /// busy or lost, the worker shutting down), retries in the worker included.
    ModelUnavailable,
    /// A bug: a panic or an invariant broken inside the worker.
    Internal,
}

impl ErrorClass {
    /// The stable name used in headers, events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidMessage => "invalid_message",
            ErrorClass::BucketNotAllowed => "bucket_not_allowed",
            ErrorClass::ImageNotFound => "image_not_found",
            ErrorClass::UndecodableImage => "undecodable_image",
            ErrorClass::ImageTooLarge => "image_too_large",
            ErrorClass::StorageUnavailable => "storage_unavailable",
            ErrorClass::BrokerUnavailable => "broker_unavailable",
            ErrorClass::Timeout => "timeout",
            ErrorClass::ModelError => "model_error",
            ErrorClass::ModelUnavailable => "model_unavailable",
            ErrorClass::Internal => "internal",
        }
    }

    /// Whether retrying the same job later can succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorClass::StorageUnavailable
                | ErrorClass::BrokerUnavailable
                | ErrorClass::Timeout
                | ErrorClass::ModelUnavailable
        )
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's failure: its class and a one-line, human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct JobError {
    pub class: ErrorClass,
    pub message: String,
}

impl JobError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        // Headers and logs want one line.
        let message = message.into().replace(['\n', '\r'], " ");
        JobError { class, message }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        JobError::new(ErrorClass::InvalidMessage, message)
    }

    pub fn is_transient(&self) -> bool {
        self.class.is_transient()
    }
}
