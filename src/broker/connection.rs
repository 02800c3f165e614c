//! Opening AMQP connections: one attempt ([`connect`]) or retried with exponential backoff and
//! jitter until a deadline ([`connect_with_retry`]), for a worker that starts before its broker
//! or outlives a broker restart. An [`Endpoint`] is the URL plus, for `amqps://`, the TLS files
//! (see [`super::tls`]).
//!
//! The URL carries the password, so it only ever reaches logs and errors through [`redact`].

use std::time::{Duration, Instant};

use lapin::{uri::AMQPUri, Connection, ConnectionProperties};
use rand::Rng;

use super::{tls, BrokerError, TlsFiles};

/// Where and how to reach the broker: `broker.url` and `broker.tls.*`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// `amqp://` or `amqps://` URL; it carries the password.
    pub url: String,
    /// Used with `amqps://` only.
    pub tls: TlsFiles,
}

impl Endpoint {
    /// A URL with no TLS files (system roots only, for `amqps://`).
    pub fn new(url: impl Into<String>) -> Endpoint {
        Endpoint {
            url: url.into(),
            tls: TlsFiles::default(),
        }
    }

    pub fn with_tls(mut self, tls: TlsFiles) -> Endpoint {
        self.tls = tls;
        self
    }
}

/// Debug without the password.
impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &redact(&self.url))
            .field("tls", &self.tls)
            .finish()
    }
}

/// How long one connection attempt (TCP + AMQP handshake) may take: a black-holed host would
/// otherwise hang on the kernel's SYN retries for minutes.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`close`] waits for the broker to confirm.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Closes a connection, waiting at most a few seconds for the broker's close-ok. Nothing after
/// a close needs the answer, and lapin can leave a close pending forever when the socket goes
/// away first (seen as a `retoucher replay` that never exited).
pub async fn close(conn: &Connection, reason: &str) {
    match tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, reason.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "closing the broker connection"),
        Err(_) => tracing::warn!(
            seconds = CLOSE_TIMEOUT.as_secs(),
            "the broker did not confirm closing the connection; going on"
        ),
    }
}

/// Opens one connection, named `name` in the management UI (and `rabbitmqctl list_connections
/// client_properties`), so an operator can tell workers from enqueuers.
pub async fn connect(endpoint: &Endpoint, name: &str) -> Result<Connection, BrokerError> {
    let url = endpoint.url.as_str();
    // Parse here rather than in lapin: its parse error quotes the whole URL, password included.
    let uri: AMQPUri = url
        .parse()
        .map_err(|reason: String| BrokerError::InvalidUrl {
            url: redact(url),
            reason: reason.replace(url, &redact(url)),
        })?;
    endpoint.tls.check_against(url)?;
    let tls = endpoint.tls.load()?;
    let host = uri.authority.host.clone();
    let runtime = lapin::runtime::default_runtime().map_err(|error| BrokerError::Connect {
        url: redact(url),
        error,
    })?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = Connection::connect_uri_with_config(uri, properties, tls, runtime);
    match tokio::time::timeout(ATTEMPT_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(match tls::explain(&error, &host, &endpoint.tls) {
            Some(reason) => BrokerError::Tls {
                url: redact(url),
                reason,
            },
            None => BrokerError::Connect {
                url: redact(url),
                error,
            },
        }),
        Err(_) => Err(BrokerError::ConnectTimeout {
            url: redact(url),
            seconds: ATTEMPT_TIMEOUT.as_secs(),
        }),
    }
}

/// Like [`connect`], but keeps trying for up to `max_wait`, sleeping 0.25 s, 0.5 s, 1 s, …
/// (capped at 30 s) between attempts, each delay jittered to 50–100 % so that a fleet of
/// workers restarted together does not hammer the broker in lock-step. Every failed attempt
/// is logged with the redacted URL. An invalid URL, TLS settings or files that cannot be used,
/// and a certificate refused in the TLS handshake fail at once: waiting will not fix them.
pub async fn connect_with_retry(
    endpoint: &Endpoint,
    name: &str,
    max_wait: Duration,
) -> Result<Connection, BrokerError> {
    let url = endpoint.url.as_str();
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let error = match connect(endpoint, name).await {
            Ok(connection) => {
                if attempt > 1 {
                    tracing::info!(url = %redact(url), attempt, "connected to the broker");
                }
                return Ok(connection);
            }
            Err(
                error @ (BrokerError::InvalidUrl { .. }
                | BrokerError::Tls { .. }
                | BrokerError::TlsSettings { .. }
                | BrokerError::TlsFile { .. }),
            ) => return Err(error),
            Err(error) => error,
        };
        let remaining = max_wait.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Err(BrokerError::RetriesExhausted {
                url: redact(url),
                attempts: attempt,
                last: Box::new(error),
            });
        }
        let delay = jittered(backoff).min(remaining);
        tracing::warn!(
            url = %redact(url),
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            %error,
            "broker connection failed"
        );
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A random delay between half and all of `backoff` ("equal jitter": never zero, so a
/// refused connection is not retried in a tight loop, yet spread enough to de-synchronise).
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// The URL with its password replaced by `***`, safe to log:
/// `amqp://worker:s3cret@mq:5672/%2f` → `amqp://worker:***@mq:5672/%2f`.
///
/// Works on the raw text rather than a parsed URL so that even a URL too broken to parse is
/// redacted, and errs towards hiding too much: the user info ends at the *last* `@`, since an
/// unescaped password may contain `@`, `/`, `?` or `#`.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..rest_start],
        &rest[..colon],
        &rest[at..]
    )
}
