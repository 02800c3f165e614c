//! Prometheus metrics (design §4.6) and the `/metrics`, `/healthz`, `/readyz` HTTP server.
//!
//! Every metric is declared once here, with its help text; the rest of the code records through
//! [`metrics()`]. Names carry their unit and use base units (seconds, bytes).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::engine::batcher::{BatchObserver, BatchRecord, DecoderEvent, ModelHealth, Recovery};

/// Every metric the worker exports.
pub struct Metrics {
    pub registry: Registry,
    pub jobs_total: IntCounterVec,
    pub job_duration_seconds: Histogram,
    pub stage_duration_seconds: HistogramVec,
    pub batch_size: HistogramVec,
    pub batch_queue_seconds: HistogramVec,
    pub inference_seconds: HistogramVec,
    pub batch_queue_depth: IntGaugeVec,
    pub batches_total: IntCounterVec,
    pub batch_skipped_total: IntCounterVec,
    pub model_retries_total: IntCounterVec,
    pub model_failures_total: IntCounterVec,
    pub model_healthy: IntGaugeVec,
    pub inflight_jobs: IntGauge,
    pub iterations: Histogram,
    pub regions_total: IntCounterVec,
    pub s3_requests_total: IntCounterVec,
    pub broker_connected: IntGauge,
    pub ready: IntGauge,
    pub errors_total: IntCounterVec,
    pub diffusion_steps_total: IntCounterVec,
    pub diffusion_step_seconds: Histogram,
    pub generated_tokens_total: IntCounter,
    pub decode_batch_size: Histogram,
    pub time_to_first_token_seconds: Histogram,
    pub active_sequences: IntGauge,
    pub kv_cache_bytes: IntGauge,
    pub vlm_answers_total: IntCounterVec,
}

fn seconds_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0,
    ]
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("metric");
            registry.register(Box::new(h.clone())).expect("register");
            h
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("metric");
            registry.register(Box::new(h.clone())).expect("register");
            h
        };
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let metrics = Metrics {
            jobs_total: counter(
                "retoucher_jobs_total",
                "Jobs finished, by outcome (retouched, clean, retried, dead, duplicate).",
                &["outcome"],
            ),
            job_duration_seconds: histogram(
                "retoucher_job_duration_seconds",
                "Time from delivery to acknowledgement of a job.",
                seconds_buckets(),
            ),
            stage_duration_seconds: histogram_vec(
                "retoucher_stage_duration_seconds",
                "Time spent per job in each stage (fetch, decode, perception, reasoning, action, encode, store).",
                &["stage"],
                seconds_buckets(),
            ),
            batch_size: histogram_vec(
                "retoucher_batch_size",
                "Requests per model call.",
                &["model"],
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0],
            ),
            batch_queue_seconds: histogram_vec(
                "retoucher_batch_queue_seconds",
                "Time a request waited in its model's batch queue.",
                &["model"],
                seconds_buckets(),
            ),
            inference_seconds: histogram_vec(
                "retoucher_inference_seconds",
                "Duration of one model call (one batch).",
                &["model"],
                seconds_buckets(),
            ),
            batch_queue_depth: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "retoucher_batch_queue_depth",
                        "Requests waiting in a model's batch queue.",
                    ),
                    &["model"],
                )
                .expect("metric");
                registry.register(Box::new(g.clone())).expect("register");
                g
            },
            batches_total: counter(
                "retoucher_batches_total",
                "Model calls, by why the batch closed (full, timeout, drained).",
                &["model", "reason"],
            ),
            batch_skipped_total: counter(
                "retoucher_batch_skipped_total",
                "Requests dropped from a batch because their job had been abandoned.",
                &["model"],
            ),
            model_retries_total: counter(
                "retoucher_model_retries_total",
                "Model calls made again after a failure: a failed batch run as two halves \
                 (kind=split), a request that failed alone transiently run again after a pause \
                 (kind=backoff).",
                &["model", "kind"],
            ),
            model_failures_total: counter(
                "retoucher_model_failures_total",
                "Requests a model failed after splitting and retries: the input fails alone \
                 (class=permanent, job model_error) or the model could not run it \
                 (class=transient, job model_unavailable).",
                &["model", "class"],
            ),
            model_healthy: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "retoucher_model_healthy",
                        "0 while a model's calls keep failing transiently (the worker is not \
                         ready), 1 otherwise.",
                    ),
                    &["model"],
                )
                .expect("metric");
                registry.register(Box::new(g.clone())).expect("register");
                g
            },
            inflight_jobs: gauge("retoucher_inflight_jobs", "Jobs being processed now."),
            iterations: histogram(
                "retoucher_iterations",
                "Perception-reasoning-action iterations per job.",
                vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
            ),
            regions_total: counter(
                "retoucher_regions_total",
                "Distorted regions repaired, by category.",
                &["category"],
            ),
            s3_requests_total: counter(
                "retoucher_s3_requests_total",
                "S3 requests, by operation and outcome.",
                &["op", "outcome"],
            ),
            broker_connected: gauge(
                "retoucher_broker_connected",
                "1 while the worker holds a broker connection.",
            ),
            ready: gauge(
                "retoucher_ready",
                "1 while /readyz answers 200 (broker connected, storage reachable, models warm, \
                 not draining); set at every scrape.",
            ),
            errors_total: counter(
                "retoucher_job_errors_total",
                "Job failures, by error class.",
                &["class"],
            ),
            diffusion_steps_total: counter(
                "retoucher_diffusion_steps_total",
                "Denoising steps of diffusion repairs (one per region and step), by scheduler.",
                &["scheduler"],
            ),
            diffusion_step_seconds: histogram(
                "retoucher_diffusion_step_seconds",
                "Duration of one denoising step of one region (UNet queue wait, call and scheduler step).",
                seconds_buckets(),
            ),
            generated_tokens_total: plain_counter(
                "retoucher_generated_tokens_total",
                "Tokens generated by the VLM decoder (stop tokens included); its rate is tokens/s.",
            ),
            decode_batch_size: histogram(
                "retoucher_decode_batch_size",
                "Sequences in one decode step of the VLM decoder (continuous batching across jobs).",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0],
            ),
            time_to_first_token_seconds: histogram(
                "retoucher_time_to_first_token_seconds",
                "Time from a sequence's submission to the VLM decoder to its first token (queue and prefill).",
                seconds_buckets(),
            ),
            active_sequences: gauge(
                "retoucher_active_sequences",
                "Sequences in the VLM decoder's running batch.",
            ),
            kv_cache_bytes: gauge(
                "retoucher_kv_cache_bytes",
                "Bytes of the VLM decoder's batched KV cache, padding included.",
            ),
            vlm_answers_total: counter(
                "retoucher_vlm_answers_total",
                "VLM answers, by outcome (answered, no_json, invalid_json, unsupported_image); all but answered fell back.",
                &["outcome"],
            ),
            registry,
        };
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = metrics.registry.register(Box::new(process));
        }
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Records batcher activity into the model metrics.
pub struct BatchMetrics;

impl BatchObserver for BatchMetrics {
    fn batch(&self, model: &str, record: &BatchRecord) {
        let m = metrics();
        if record.skipped > 0 {
            m.batch_skipped_total
                .with_label_values(&[model])
                .inc_by(record.skipped as u64);
        }
        if record.size == 0 {
            return;
        }
        m.batches_total
            .with_label_values(&[model, record.reason.as_str()])
            .inc();
        m.batch_size
            .with_label_values(&[model])
            .observe(record.size as f64);
        m.inference_seconds
            .with_label_values(&[model])
            .observe(record.inference.as_secs_f64());
        let queue = m.batch_queue_seconds.with_label_values(&[model]);
        for wait in &record.queue_waits {
            queue.observe(wait.as_secs_f64());
        }
    }

    fn queue_depth(&self, model: &str, depth: usize) {
        metrics()
            .batch_queue_depth
            .with_label_values(&[model])
            .set(depth as i64);
    }

    fn decoder(&self, model: &str, event: &DecoderEvent) {
        let m = metrics();
        match *event {
            DecoderEvent::Prefill {
                duration,
                time_to_first_token,
                ..
            } => {
                m.generated_tokens_total.inc();
                m.time_to_first_token_seconds
                    .observe(time_to_first_token.as_secs_f64());
                m.inference_seconds
                    .with_label_values(&[model])
                    .observe(duration.as_secs_f64());
            }
            DecoderEvent::Step { batch, duration } => {
                m.generated_tokens_total.inc_by(batch as u64);
                m.decode_batch_size.observe(batch as f64);
                m.inference_seconds
                    .with_label_values(&[model])
                    .observe(duration.as_secs_f64());
            }
            DecoderEvent::Load { active, kv_bytes } => {
                m.active_sequences.set(active as i64);
                m.kv_cache_bytes
                    .set(i64::try_from(kv_bytes).unwrap_or(i64::MAX));
            }
            DecoderEvent::Finished { .. } => {}
        }
    }

    fn recovery(&self, model: &str, event: Recovery) {
        let m = metrics();
        match event {
            Recovery::Split => m.model_retries_total.with_label_values(&[model, "split"]),
            Recovery::Retry => m.model_retries_total.with_label_values(&[model, "backoff"]),
            Recovery::Failed { transient } => {
                let class = if transient { "transient" } else { "permanent" };
                m.model_failures_total.with_label_values(&[model, class])
            }
            Recovery::Health { healthy } => {
                m.model_healthy
                    .with_label_values(&[model])
                    .set(i64::from(healthy));
                return;
            }
        }
        .inc();
    }
}

/// What `/readyz` reports: every part must be up.
#[derive(Default)]
pub struct Readiness {
    pub broker: AtomicBool,
    pub storage: AtomicBool,
    /// The models are loaded and warmed up.
    pub models: AtomicBool,
    pub draining: AtomicBool,
    /// The health of every batched model (see [`Readiness::watch_models`]).
    model_health: std::sync::RwLock<Vec<Arc<ModelHealth>>>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
            && self.storage.load(Ordering::Relaxed)
            && self.models.load(Ordering::Relaxed)
            && self.failing_models().is_empty()
            && !self.draining.load(Ordering::Relaxed)
    }

    /// Makes readiness follow these models' health: a model whose calls keep failing makes
    /// the worker not ready until it recovers.
    pub fn watch_models(&self, models: impl IntoIterator<Item = Arc<ModelHealth>>) {
        let models: Vec<_> = models.into_iter().collect();
        for model in &models {
            metrics()
                .model_healthy
                .with_label_values(&[model.model()])
                .set(i64::from(model.is_healthy()));
        }
        *self.model_health.write().unwrap_or_else(|e| e.into_inner()) = models;
    }

    /// The models that are unhealthy now.
    fn failing_models(&self) -> Vec<String> {
        self.model_health
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|m| !m.is_healthy())
            .map(|m| m.model().to_string())
            .collect()
    }

    fn describe(&self) -> String {
        let flag = |b: &AtomicBool| {
            if b.load(Ordering::Relaxed) {
                "up"
            } else {
                "down"
            }
        };
        let failing = self.failing_models();
        let models = if failing.is_empty() {
            flag(&self.models).to_string()
        } else {
            format!("failing ({})", failing.join(", "))
        };
        format!(
            "broker {}\nstorage {}\nmodels {models}\ndraining {}\n",
            flag(&self.broker),
            flag(&self.storage),
            self.draining.load(Ordering::Relaxed)
        )
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(listen: &str, readiness: Arc<Readiness>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen = {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get({
                let readiness = readiness.clone();
                move || {
                    let ready = readiness.is_ready();
                    async move {
                        metrics().ready.set(i64::from(ready));
                        (
                            [("content-type", "text/plain; version=0.0.4")],
                            metrics().render(),
                        )
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    let status = if readiness.is_ready() {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, readiness.describe()).into_response()
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(%addr, "metrics server listening");
    Ok(addr)
}
