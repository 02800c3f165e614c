//! S3 backend on `aws-sdk-s3`: AWS or any S3-compatible server (SeaweedFS, MinIO).
//!
//! The SDK does the retrying (standard strategy: backoff with jitter on throttling, 5xx,
//! timeouts and connection errors); this module bounds each call, streams bodies against a size
//! limit, and turns every SDK error into a [`JobError`] whose class says whether the job should be
//! retried. Credentials come from the AWS chain and never appear in messages or logs.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{quote, RequestObserver, S3Settings, S3Tuning};
use crate::error::{ErrorClass, JobError};

/// Region used when neither the settings nor the AWS chain name one: self-hosted servers ignore
/// it, but SigV4 needs some region to sign with.
const FALLBACK_REGION: &str = "us-east-1";

#[derive(Clone)]
pub(super) struct S3Backend {
    client: aws_sdk_s3::Client,
    /// Bounds a whole `get`, body included: the SDK's operation timeout ends when the response
    /// headers arrive, and a body can then stall or trickle.
    get_timeout: Duration,
    observer: Option<RequestObserver>,
}

/// How an S3 call ended, for the observer and for choosing the error class.
enum Failure {
    NotFound(JobError),
    Other(JobError),
}

impl Failure {
    fn into_error(self) -> JobError {
        match self {
            Failure::NotFound(e) | Failure::Other(e) => e,
        }
    }
}

impl S3Backend {
    pub(super) async fn connect(
        settings: &S3Settings,
        tuning: &S3Tuning,
    ) -> Result<S3Backend, JobError> {
        let endpoint = settings.endpoint.trim();
        // Without a scheme the SDK fails on every request instead; say so once, at startup.
        let has_scheme = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !(endpoint.is_empty() || has_scheme) {
            return Err(JobError::new(
                ErrorClass::StorageUnavailable,
                format!(
                    "s3.endpoint '{}' must start with http:// or https://",
                    quote(endpoint)
                ),
            ));
        }

        let timeouts = TimeoutConfig::builder()
            .connect_timeout(tuning.connect_timeout)
            .operation_attempt_timeout(tuning.attempt_timeout)
            .operation_timeout(tuning.operation_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(tuning.max_attempts.max(1)));
        if !settings.region.trim().is_empty() {
            loader = loader.region(Region::new(settings.region.trim().to_owned()));
        }
        let shared = loader.load().await;

        let mut config =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.force_path_style);
        if shared.region().is_none() {
            tracing::warn!(
                region = FALLBACK_REGION,
                "no S3 region configured (s3.region, AWS_REGION or profile); using the fallback"
            );
            config = config.region(Region::new(FALLBACK_REGION));
        }
        if !endpoint.is_empty() {
            config = config.endpoint_url(endpoint);
        }
        tracing::info!(
            endpoint = if endpoint.is_empty() { "aws" } else { endpoint },
            force_path_style = settings.force_path_style,
            allowed_buckets = ?settings.allowed_buckets,
            "S3 storage configured"
        );
        let client = aws_sdk_s3::Client::from_conf(config.build());
        Ok(S3Backend::new(client, tuning.operation_timeout))
    }

    pub(super) fn new(client: aws_sdk_s3::Client, get_timeout: Duration) -> S3Backend {
        S3Backend {
            client,
            get_timeout,
            observer: None,
        }
    }

    pub(super) fn with_observer(&self, observer: RequestObserver) -> S3Backend {
        S3Backend {
            observer: Some(observer),
            ..self.clone()
        }
    }

    fn observe<T>(&self, op: &'static str, result: &Result<T, Failure>) {
        if let Some(observer) = &self.observer {
            let outcome = match result {
                Ok(_) => "ok",
                Err(Failure::NotFound(_)) => "not_found",
                Err(Failure::Other(_)) => "error",
            };
            observer(op, outcome);
        }
    }

    pub(super) async fn get(
        &self,
        bucket: &str,
        key: &str,
        max_bytes: u64,
    ) -> Result<Bytes, JobError> {
        let uri = ObjectUri { bucket, key };
        // One deadline for the whole read, so a slow body cannot double the operation timeout.
        let deadline = tokio::time::Instant::now() + self.get_timeout;
        let response = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &uri));
        self.observe("get", &response);
        let response = response.map_err(Failure::into_error)?;

        // Refuse before reading when the server announces the size.
        if let Some(len) = response.content_length() {
            let len = u64::try_from(len).unwrap_or(0);
            if len > max_bytes {
                return Err(too_large(&uri, &format!("{len} bytes"), max_bytes));
            }
        }
        let capacity = response
            .content_length()
            .and_then(|len| usize::try_from(len).ok())
            .unwrap_or(0)
            .min(usize::try_from(max_bytes).unwrap_or(usize::MAX));
        let read = read_body(response.body, &uri, max_bytes, capacity);
        match tokio::time::timeout_at(deadline, read).await {
            Ok(result) => result,
            Err(_) => Err(JobError::new(
                ErrorClass::StorageUnavailable,
                format!("reading {uri} did not finish within {:?}", self.get_timeout),
            )),
        }
    }

    pub(super) async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<(), JobError> {
        let uri = ObjectUri { bucket, key };
        let len = i64::try_from(body.len()).unwrap_or(i64::MAX);
        let result = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .content_length(len)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(e, &uri));
        self.observe("put", &result);
        result.map_err(Failure::into_error)
    }

    pub(super) async fn exists(&self, bucket: &str, key: &str) -> Result<bool, JobError> {
        let uri = ObjectUri { bucket, key };
        let result = self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &uri));
        self.observe("head", &result);
        match result {
            Ok(_) => Ok(true),
            Err(Failure::NotFound(_)) => Ok(false),
            Err(Failure::Other(e)) => Err(e),
        }
    }

    pub(super) async fn check(&self, bucket: &str) -> Result<(), JobError> {
        let result = self
            .client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify_bucket(e, bucket));
        self.observe("check", &result);
        // For readiness every failure means "not ready", a missing bucket included.
        result.map_err(|f| match f {
            Failure::NotFound(e) | Failure::Other(e) => {
                JobError::new(ErrorClass::StorageUnavailable, e.message)
            }
        })
    }
}

/// `s3://bucket/key` for messages, without allocating up front.
struct ObjectUri<'a> {
    bucket: &'a str,
    key: &'a str,
}

impl fmt::Display for ObjectUri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", quote(self.bucket), quote(self.key))
    }
}

async fn read_body(
    mut body: ByteStream,
    uri: &ObjectUri<'_>,
    max_bytes: u64,
    capacity: usize,
) -> Result<Bytes, JobError> {
    // Enforced while streaming too: the announced length may be missing or wrong.
    let mut buf = Vec::with_capacity(capacity);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            JobError::new(
                ErrorClass::StorageUnavailable,
                format!("reading the body of {uri} failed: {}", error_chain(&e)),
            )
        })?;
        let total = buf.len() as u64 + chunk.len() as u64;
        if total > max_bytes {
            return Err(too_large(uri, "larger", max_bytes));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// `size` is "N bytes" when the server announced it, else just "larger" (streaming stopped
/// at the limit, so the real size is unknown).
fn too_large(uri: &ObjectUri<'_>, size: &str, max_bytes: u64) -> JobError {
    JobError::new(
        ErrorClass::ImageTooLarge,
        format!("object {uri} is {size}, over the limit of {max_bytes} bytes"),
    )
}

/// Maps an object operation's error. Only a missing object or bucket is permanent.
fn classify<E>(err: SdkError<E>, uri: &ObjectUri<'_>) -> Failure
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let bucket = quote(uri.bucket);
    classify_with(err, &uri.to_string(), |code| {
        if code == Some("NoSuchBucket") {
            format!("bucket '{bucket}' does not exist (object {uri})")
        } else {
            format!("object {uri} does not exist")
        }
    })
}

fn classify_bucket<E>(err: SdkError<E>, bucket: &str) -> Failure
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let bucket = quote(bucket);
    classify_with(err, &format!("bucket '{bucket}'"), |_| {
        format!("bucket '{bucket}' does not exist")
    })
}

fn classify_with<E>(
    err: SdkError<E>,
    what: &str,
    not_found: impl FnOnce(Option<&str>) -> String,
) -> Failure
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let unavailable =
        |message: String| Failure::Other(JobError::new(ErrorClass::StorageUnavailable, message));
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code();
            // HEAD responses have no body, hence no code: the status is what counts.
            if status == 404 || matches!(code, Some("NoSuchKey" | "NoSuchBucket" | "NotFound")) {
                return Failure::NotFound(JobError::new(
                    ErrorClass::ImageNotFound,
                    not_found(code),
                ));
            }
            // "HTTP 503, SlowDown: Please reduce your request rate"; HEAD answers have no code.
            let mut answer = format!("HTTP {status}");
            if let Some(code) = code {
                answer.push_str(&format!(", {}", quote(code)));
            }
            if let Some(message) = service.err().message() {
                answer.push_str(&format!(": {}", quote(message)));
            }
            if status == 403 {
                // Transient on purpose: permissions and credentials get fixed or rotated, and a
                // job should not be dead-lettered for an operator's mistake.
                unavailable(format!(
                    "access to {what} denied ({answer}); check the credentials and the bucket policy"
                ))
            } else {
                unavailable(format!("S3 request for {what} failed ({answer})"))
            }
        }
        SdkError::TimeoutError(_) => unavailable(format!(
            "S3 request for {what} timed out: {}",
            error_chain(&err)
        )),
        SdkError::DispatchFailure(_) => unavailable(format!(
            "S3 request for {what} could not be sent: {}",
            error_chain(&err)
        )),
        _ => unavailable(format!(
            "S3 request for {what} failed: {}",
            error_chain(&err)
        )),
    }
}

/// "dispatch failure: io error: tcp connect error: Connection refused (os error 111)".
///
/// The SDK's own `DisplayErrorContext` appends the whole `Debug` form, far too long for an AMQP
/// header; the `Display` chain says the same in one short line.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Wrappers often repeat their source's text; say it once.
        if !text.is_empty() && !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}
