//! The worker: consumes jobs from RabbitMQ, runs each through the [`Executor`], stores the
//! result set, publishes the event and only then acknowledges (at-least-once delivery with
//! idempotent results).
//!
//! Outcomes, each confirmed by the broker before the delivery is acked (never lose a job):
//! - success → `job.succeeded` + ack;
//! - permanent failure → the original message to `<queue>.dead` with the error headers +
//!   `job.failed` + ack;
//! - transient failure → the original message, with `x-retoucher-attempt` = attempt + 1 and
//!   the error headers, to the delay queue of the attempt (see [`crate::broker::retry`]), then
//!   `job.retrying` (best effort) + ack; the broker returns it to the jobs queue when its TTL
//!   runs out. Once `retry.max_attempts` attempts are spent: `<queue>.dead` with "gave up after
//!   N attempts: <last error>" + `job.failed` + ack;
//! - the retry or dead letter cannot be published → nack with requeue: the job comes straight
//!   back (counted as an attempt by the quorum queue's delivery count, which also bounds such
//!   loops with its delivery limit).
//!
//! A crash between a confirmed retry and the ack leaves two copies of the job (the retry and
//! the redelivered original); idempotent results make that harmless. A job that panics fails
//! alone (class `internal`, permanent); the worker keeps consuming.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, info_span, warn, Instrument};

use crate::app::{self, StorageKind};
use crate::broker::{self, Event, EventError, EventStatus, Publisher, RetryDecision, RetryPolicy};
use crate::config::Settings;
use crate::error::{ErrorClass, JobError};
use crate::execute::{Executor, JobReport, JobSpec};
use crate::job::JobMessage;
use crate::metrics::{self, metrics, BatchMetrics, Readiness};
use crate::storage::{Location, Storage};

/// Everything a job task needs.
struct Shared {
    executor: Executor,
    settings: Settings,
    publisher: Publisher,
    retry: RetryPolicy,
}

/// What happened to one delivery.
enum Outcome {
    Done(Box<JobReport>),
    /// The result set was already complete (a redelivery): acknowledged without recomputing,
    /// and its `job.succeeded` published again, since the first one may never have gone out.
    AlreadyDone(Box<crate::diagnostics::Diagnostics>),
    Failed(JobError),
}

/// Resolves and authorises a job's locations: the input, and `{output}{job_id}/`.
pub fn resolve(
    message: JobMessage,
    storage: &Storage,
    default_output: &str,
    attempt: u32,
    queue_ms: f64,
) -> Result<JobSpec, JobError> {
    let image = Location::parse_s3(&message.image)?;
    storage.check_allowed(&image)?;
    let output = match message.output.as_deref() {
        Some(output) => output,
        None if !default_output.is_empty() => default_output,
        None => {
            return Err(JobError::invalid(
                "the job has no 'output' and the worker has no s3.output default",
            ))
        }
    };
    let output = Location::parse_s3_prefix(output)?;
    storage.check_allowed(&output)?;
    Ok(JobSpec {
        results: output.join(&format!("{}/", message.job_id)),
        job_id: message.job_id,
        image,
        prompt: message.prompt,
        options: message.options,
        metadata: message.metadata,
        attempt,
        queue_ms,
    })
}

/// Runs the worker until SIGTERM/SIGINT, then drains.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // A mistyped fault spec must stop a test worker at start, not silently do nothing.
    crate::faults::init().map_err(|e| anyhow::anyhow!("{}: {e}", crate::faults::ENV_VAR))?;
    let readiness = Arc::new(Readiness::default());
    metrics::serve(&settings.metrics.listen, readiness.clone()).await?;

    let agents = app::agents(&settings, Arc::new(BatchMetrics)).await?;
    readiness.watch_models(agents.served().iter().map(|m| m.batcher.health()));
    readiness.models.store(true, Ordering::Relaxed);
    info!(bundle = %settings.models.bundle.display(), device = %settings.models.device, "models loaded and warmed up");

    let storage = app::storage(&settings, StorageKind::S3).await?;
    spawn_storage_probe(storage.clone(), readiness.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested: draining");
        let _ = stop_tx.send(true);
    });

    let executor = Executor::new(agents, storage, settings.limits.clone());
    let result = consume(settings, executor, readiness.clone(), stop_rx).await;
    readiness.draining.store(true, Ordering::Relaxed);
    result
}

async fn spawn_storage_probe_once(storage: &Storage, readiness: &Readiness) {
    match storage.check().await {
        Ok(()) => readiness.storage.store(true, Ordering::Relaxed),
        Err(e) => {
            if readiness.storage.swap(false, Ordering::Relaxed) {
                warn!(error = %e, "storage is not reachable");
            }
        }
    }
}

fn spawn_storage_probe(storage: Storage, readiness: Arc<Readiness>) {
    tokio::spawn(async move {
        loop {
            spawn_storage_probe_once(&storage, &readiness).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Connects (and reconnects) to the broker and consumes until asked to stop. Used by `run`
/// above and by `bench --through-broker`, which drives a worker in-process.
pub async fn consume(
    settings: Settings,
    executor: Executor,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let queue = settings.broker.queue.clone();
    let migrations = settings.broker.migrations()?;
    let retry = RetryPolicy::of(&migrations, &queue, &settings.retry)?;
    let name = format!(
        "retoucher-worker@{}",
        gethostname::gethostname().to_string_lossy()
    );
    let permits = Arc::new(Semaphore::new(settings.worker.max_inflight));
    let mut tasks = JoinSet::new();
    let mut first = true;
    // The connection in use stays open while draining, so in-flight jobs can still ack.
    // (lapin closes a channel when its last handle is dropped, which would poison the ackers
    // of every job still running, so the channel and consumer are held as well.)
    let mut held: Option<(lapin::Connection, lapin::Channel, lapin::Consumer)> = None;
    'connection: loop {
        if *stop.borrow() {
            break;
        }
        let conn = broker::connect_with_retry(
            &settings.broker.endpoint(),
            &name,
            Duration::from_secs(settings.broker.connect_timeout_secs),
        )
        .await?;
        // A topology this worker cannot work with is fatal: the operator has to run
        // `retoucher migrate`, or deploy the worker the error names. A broker ahead by
        // additive versions only (a rolling upgrade) is fine.
        migrations.verify(&conn, &queue).await?;
        let (publisher, channel, tag, mut consumer) =
            match open_consumer(&conn, &queue, &name, settings.broker.prefetch).await {
                Ok(opened) => opened,
                // Right after a broker restart a quorum queue can be briefly unavailable:
                // keep trying rather than exit (at start, a failure is reported at once).
                Err(e) if !first => {
                    warn!(error = %format!("{e:#}"), "cannot consume yet: reconnecting");
                    broker::close(&conn, "retrying").await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue 'connection;
                }
                Err(e) => return Err(e),
            };
        readiness.broker.store(true, Ordering::Relaxed);
        metrics().broker_connected.set(1);
        info!(queue = %queue, prefetch = settings.broker.prefetch, reconnect = !first, "consuming");
        first = false;
        let shared = Arc::new(Shared {
            executor: executor.clone(),
            settings: settings.clone(),
            publisher,
            retry: retry.clone(),
        });
        loop {
            // Hold a slot before taking the next delivery: a saturated worker stops pulling.
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => Some(permit.context("semaphore closed")?),
                _ = stop.changed() => None,
            };
            let delivery = match permit {
                Some(_) => tokio::select! {
                    delivery = consumer.next() => Some(delivery),
                    _ = stop.changed() => None,
                },
                None => None,
            };
            let (Some(permit), Some(delivery)) = (permit, delivery) else {
                // Stop taking messages, and hand what was prefetched but not started back
                // to the queue now rather than when the connection closes after the drain,
                // so other workers can take it at once.
                cancel(&channel, &tag).await;
                requeue_prefetched(&mut consumer).await;
                held = Some((conn, channel, consumer));
                break 'connection;
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        handle(shared, delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    warn!(error = %e, "lost the broker connection: reconnecting");
                    break;
                }
                None => {
                    warn!("the broker cancelled the consumer: reconnecting");
                    break;
                }
            }
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
        }
        readiness.broker.store(false, Ordering::Relaxed);
        metrics().broker_connected.set(0);
        broker::close(&conn, "reconnecting").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        continue 'connection;
    }
    // Draining: no new deliveries; in-flight jobs get `drain_timeout` to finish.
    readiness.draining.store(true, Ordering::Relaxed);
    let drained = tokio::time::timeout(settings.worker.drain_timeout(), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = tasks.len(),
            "drain timeout: unfinished jobs go back to the queue"
        );
        tasks.abort_all();
    }
    if let Some((conn, channel, _consumer)) = held {
        let _ = channel.close(200, "worker stopped".into()).await;
        broker::close(&conn, "worker stopped").await;
    }
    info!("worker stopped");
    metrics().broker_connected.set(0);
    Ok(())
}

/// Milliseconds the message waited, from its `timestamp` property (seconds), when set.
fn queue_ms(delivery: &Delivery) -> f64 {
    let Some(ts) = *delivery.properties.timestamp() else {
        return 0.0;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    ((now - ts as f64) * 1000.0).max(0.0)
}

async fn handle(shared: Arc<Shared>, delivery: Delivery) {
    let started = Instant::now();
    let job_id = JobMessage::sniff_job_id(&delivery.data).unwrap_or_else(|| "-".to_string());
    let attempt = broker::attempt_of(&delivery.properties);
    let span = info_span!("job", job_id = %job_id, attempt);
    async move {
        metrics().inflight_jobs.inc();
        let outcome = {
            let shared = shared.clone();
            let data = delivery.data.clone();
            let queued = queue_ms(&delivery);
            let timeout = shared.settings.worker.job_timeout();
            // Its own task: a panic fails this job only.
            let task = tokio::spawn(
                async move {
                    match tokio::time::timeout(timeout, process(&shared, &data, attempt, queued))
                        .await
                    {
                        Ok(outcome) => outcome,
                        Err(_) => Outcome::Failed(JobError::new(
                            ErrorClass::Timeout,
                            format!(
                                "the job took longer than worker.job_timeout_secs = {}",
                                timeout.as_secs()
                            ),
                        )),
                    }
                }
                .in_current_span(),
            );
            match task.await {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => Outcome::Failed(JobError::new(
                    ErrorClass::Internal,
                    format!("the job panicked: {}", panic_message(e.into_panic())),
                )),
                Err(e) => Outcome::Failed(JobError::new(ErrorClass::Internal, e.to_string())),
            }
        };
        settle(&shared, &delivery, &job_id, attempt, outcome, started).await;
        metrics().inflight_jobs.dec();
        metrics()
            .job_duration_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    .instrument(span)
    .await
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

async fn process(shared: &Shared, data: &[u8], attempt: u32, queued: f64) -> Outcome {
    let message = match JobMessage::parse(data, &shared.settings.limits) {
        Ok(m) => m,
        Err(e) => return Outcome::Failed(e),
    };
    let spec = match resolve(
        message,
        &shared.executor.storage,
        &shared.settings.s3.output,
        attempt,
        queued,
    ) {
        Ok(spec) => spec,
        Err(e) => return Outcome::Failed(e),
    };
    match shared.executor.completed(&spec).await {
        Ok(Some(done)) => return Outcome::AlreadyDone(Box::new(done)),
        Ok(None) => {}
        Err(e) => return Outcome::Failed(e),
    }
    info!(image = %spec.image, "retouching");
    match shared.executor.execute(&spec).await {
        Ok(report) => Outcome::Done(Box::new(report)),
        Err(e) => Outcome::Failed(e),
    }
}

/// Acknowledges, requeues or dead-letters the delivery according to the outcome.
async fn settle(
    shared: &Shared,
    delivery: &Delivery,
    job_id: &str,
    attempt: u32,
    outcome: Outcome,
    started: Instant,
) {
    let duration_ms = started.elapsed().as_millis() as u64;
    let metadata = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()
        .and_then(|v| v.get("metadata").cloned())
        .filter(|m| m.is_object());
    match outcome {
        Outcome::Done(report) => {
            let event = success_event(job_id, &report.diagnostics, attempt, duration_ms, metadata);
            if !publish_success(shared, delivery, &event).await {
                return;
            }
            ack(delivery).await;
            metrics()
                .jobs_total
                .with_label_values(&[report.status().as_str()])
                .inc();
            info!(
                status = %report.status(),
                regions = report.regions,
                iterations = report.iterations(),
                duration_ms,
                "job done"
            );
        }
        Outcome::AlreadyDone(done) => {
            let event = success_event(job_id, &done, attempt, duration_ms, metadata);
            if !publish_success(shared, delivery, &event).await {
                return;
            }
            ack(delivery).await;
            metrics().jobs_total.with_label_values(&["duplicate"]).inc();
            info!("result set already complete: acknowledged without recomputing");
        }
        Outcome::Failed(error) => {
            metrics()
                .errors_total
                .with_label_values(&[error.class.as_str()])
                .inc();
            let failure = Failure {
                job_id,
                attempt,
                duration_ms,
                metadata,
            };
            if !error.is_transient() {
                error!(class = %error.class, error = %error.message, "permanent failure: dead-lettering");
                dead_letter(shared, delivery, failure, error).await;
                return;
            }
            match shared.retry.decide(attempt) {
                RetryDecision::Retry {
                    queue,
                    expiration,
                    next_attempt,
                } => {
                    retry(
                        shared,
                        delivery,
                        failure,
                        error,
                        queue,
                        expiration,
                        next_attempt,
                    )
                    .await
                }
                RetryDecision::GiveUp => {
                    error!(
                        class = %error.class,
                        error = %error.message,
                        max_attempts = shared.retry.max_attempts(),
                        "transient failure, attempts spent: dead-lettering"
                    );
                    let error = JobError::new(
                        error.class,
                        format!("gave up after {attempt} attempts: {}", error.message),
                    );
                    dead_letter(shared, delivery, failure, error).await;
                }
            }
        }
    }
}

/// What the events of a failed delivery carry besides the error.
struct Failure<'a> {
    job_id: &'a str,
    attempt: u32,
    duration_ms: u64,
    metadata: Option<serde_json::Value>,
}

/// Schedules the next attempt through the delay queue `delay_queue`, then `job.retrying`,
/// then the ack. The ack waits for the broker's confirm of the retry: if that fails the
/// delivery is requeued instead, so the job is never lost.
async fn retry(
    shared: &Shared,
    delivery: &Delivery,
    failure: Failure<'_>,
    error: JobError,
    delay_queue: &str,
    expiration: Duration,
    next_attempt: u32,
) {
    if let Err(e) = shared
        .publisher
        .retry(
            delay_queue,
            &delivery.data,
            &delivery.properties,
            next_attempt,
            &error,
            expiration,
        )
        .await
    {
        error!(error = %e, "scheduling the retry failed: requeueing");
        requeue(delivery).await;
        return;
    }
    warn!(
        class = %error.class,
        error = %error.message,
        next_attempt,
        retry_in_ms = expiration.as_millis() as u64,
        delay_queue,
        "transient failure: retrying later"
    );
    let event = failure_event(&failure, EventStatus::Retrying, &error);
    if let Err(e) = shared.publisher.publish_event(&event).await {
        // Best effort: the retry is scheduled, which is what matters to the job.
        warn!(error = %e, "publishing job.retrying failed");
    }
    ack(delivery).await;
    metrics().jobs_total.with_label_values(&["retried"]).inc();
}

/// Sends the delivery to `<queue>.dead` with the error headers, then `job.failed`, then acks;
/// requeues instead when the dead letter is not confirmed.
async fn dead_letter(shared: &Shared, delivery: &Delivery, failure: Failure<'_>, error: JobError) {
    let queue = &shared.settings.broker.queue;
    if let Err(e) = shared
        .publisher
        .dead_letter(
            queue,
            &delivery.data,
            &delivery.properties,
            error.class,
            &error.message,
        )
        .await
    {
        // Never ack what is not safely dead-lettered.
        error!(error = %e, "dead-lettering failed: requeueing");
        requeue(delivery).await;
        return;
    }
    let event = failure_event(&failure, EventStatus::Failed, &error);
    if let Err(e) = shared.publisher.publish_event(&event).await {
        warn!(error = %e, "publishing job.failed failed");
    }
    ack(delivery).await;
    metrics().jobs_total.with_label_values(&["dead"]).inc();
}

/// `job.retrying` (`attempt` is the attempt that failed) or `job.failed`.
fn failure_event(failure: &Failure<'_>, status: EventStatus, error: &JobError) -> Event {
    Event {
        job_id: failure.job_id.to_string(),
        status,
        output: None,
        attempt: failure.attempt,
        iterations: 0,
        regions: 0,
        duration_ms: failure.duration_ms,
        error: Some(EventError {
            class: error.class.as_str().to_string(),
            message: error.message.clone(),
        }),
        metadata: failure.metadata.clone(),
    }
}

/// The `job.succeeded` event of a stored result set.
fn success_event(
    job_id: &str,
    diagnostics: &crate::diagnostics::Diagnostics,
    attempt: u32,
    duration_ms: u64,
    metadata: Option<serde_json::Value>,
) -> Event {
    Event {
        job_id: job_id.to_string(),
        status: diagnostics.status.into(),
        output: Some(diagnostics.output.uri.clone()),
        attempt,
        iterations: diagnostics.iterations.len() as u32,
        regions: diagnostics
            .iterations
            .iter()
            .map(|i| i.regions.len() as u32)
            .sum(),
        duration_ms,
        error: None,
        metadata,
    }
}

/// Publishes `job.succeeded`; on failure requeues the delivery (the result set is complete, so
/// the redelivery only publishes the event again) and returns false.
async fn publish_success(shared: &Shared, delivery: &Delivery, event: &Event) -> bool {
    match shared.publisher.publish_event(event).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "publishing job.succeeded failed: requeueing");
            requeue(delivery).await;
            false
        }
    }
}

async fn ack(delivery: &Delivery) {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        // lapin answers Ok(false) without sending anything when the acker is no longer usable.
        Ok(false) => warn!(
            poisoned = delivery.acker.poisoned(),
            "ack not sent (channel closed or delivery already settled): the job will be redelivered"
        ),
        Err(e) => warn!(error = %e, "ack failed: the job will be redelivered"),
    }
}

async fn requeue(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.acker.nack(options).await {
        warn!(error = %e, "nack failed: the job will be redelivered");
    }
}

/// Opens the confirmed publisher and the consumer channel (QoS prefetch) on a connection.
async fn open_consumer(
    conn: &lapin::Connection,
    queue: &str,
    name: &str,
    prefetch: u16,
) -> anyhow::Result<(Publisher, lapin::Channel, String, lapin::Consumer)> {
    let publisher = Publisher::new(conn).await?;
    let channel = conn
        .create_channel()
        .await
        .context("opening the consumer channel")?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("setting the prefetch")?;
    let tag = format!("{name}-{}", std::process::id());
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from {queue}"))?;
    Ok((publisher, channel, tag, consumer))
}

/// Nacks (with requeue) the deliveries already buffered for a cancelled consumer.
async fn requeue_prefetched(consumer: &mut lapin::Consumer) {
    let mut returned = 0;
    // After basic.cancel the stream ends once the broker confirms; bounded in case it does not.
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        requeue(&delivery).await;
        returned += 1;
    }
    if returned > 0 {
        info!(returned, "prefetched jobs handed back to the queue");
    }
}

async fn cancel(channel: &lapin::Channel, tag: &str) {
    let _ = channel
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await;
}
