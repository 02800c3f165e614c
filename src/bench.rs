//! `retoucher bench`: throughput and latency of the real pipeline on generated jobs, and in the
//! same run the model-only throughput of the same sessions fed ready tensors at the batch sizes
//! the pipeline reached (design §6).
//!
//! Headline ratios: end-to-end ÷ model-only (what the worker around the models costs) and, with
//! `--compare-batch-1`, dynamic batching ÷ batch size 1.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::agents::action::diffusion::SchedulerKind;
use crate::agents::{Agents, ModelRole};
use crate::app::{self, StorageKind};
use crate::bundle::Bundle;
use crate::config::{BatchingOverride, Settings};
use crate::cputime::{CpuDelta, CpuSample};
use crate::engine::batcher::{BatchObserver, BatchRecord, DecoderEvent};
use crate::error::{ErrorClass, JobError};
use crate::execute::{Executor, JobSpec};
use crate::job::JobOptions;
use crate::metrics::BatchMetrics;
use crate::storage::{Location, Storage};

/// What to measure (the `bench` command's flags).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Jobs to run.
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// Jobs in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Override every model's max_batch_size.
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// Override every model's max_delay_ms.
    #[arg(long)]
    pub max_delay_ms: Option<u64>,
    /// Run the same load again with max_batch_size = 1 and report the ratio.
    #[arg(long)]
    pub compare_batch_1: bool,
    /// Side of the generated square images, in pixels.
    #[arg(long, default_value_t = 512)]
    pub image_size: u32,
    /// The jobs' prompt (with the VLM test bundle, prompt keywords steer its answers: see
    /// models/README.md).
    #[arg(long, default_value = "a photo, detailed, natural light")]
    pub prompt: String,
    /// Share of generated images with magenta blemishes (0..1).
    #[arg(long, default_value_t = 0.5)]
    pub blemished: f32,
    /// Seed of the generated images.
    #[arg(skip = 42u64)]
    pub seed: u64,
    /// Batches per model in the model-only phase.
    #[arg(long, default_value_t = 30)]
    pub model_only_batches: usize,
    /// Batch size of the model-only phase (capped at each model's max_batch_size) instead of
    /// the mean batch the run reached: a model's ceiling at a chosen size (e.g. 32, against
    /// another runtime's figure at 32). The model-only ceiling in jobs/s is then that size's.
    #[arg(long)]
    pub model_only_batch_size: Option<usize>,
    /// Go through the real broker and S3 (broker.*, s3.*: inputs go to the first allowed
    /// bucket, results to s3.output) with an in-process worker, instead of local files.
    #[arg(long)]
    pub through_broker: bool,
}

impl BenchOptions {
    /// The options, checked and clamped to what can be measured.
    pub fn checked(self) -> anyhow::Result<BenchOptions> {
        anyhow::ensure!(self.jobs > 0, "--jobs must be at least 1");
        anyhow::ensure!(self.image_size >= 64, "--image-size must be at least 64");
        Ok(BenchOptions {
            blemished: self.blemished.clamp(0.0, 1.0),
            ..self
        })
    }
}

/// Per-model figures of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelStats {
    pub max_batch_size: usize,
    pub batches: u64,
    pub items: u64,
    pub mean_batch_size: f64,
    pub items_per_job: f64,
    pub closed_full: u64,
    pub closed_timeout: u64,
    pub mean_inference_ms: f64,
    /// Time the session was busy during the run.
    pub total_inference_ms: f64,
    /// The same session fed ready tensors at the rounded mean batch size, alone.
    pub model_only_items_per_s: f64,
    pub model_only_batch_size: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// The VLM decoder's figures of one run (reasoning mode `vlm`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecoderReport {
    /// `batching.decoder.max_batch_size`: sequences decoded together at most.
    pub max_active: usize,
    /// Sequences generated (one per VLM call).
    pub sequences: u64,
    /// Tokens generated, stop tokens included.
    pub generated_tokens: u64,
    /// Generated tokens per second of the run's wall time.
    pub tokens_per_s: f64,
    /// Generated tokens per second of decoder time (prefills and steps): its ceiling.
    pub busy_tokens_per_s: f64,
    pub decode_steps: u64,
    /// Mean and largest number of sequences in one decode step.
    pub mean_decode_batch: f64,
    pub max_decode_batch: usize,
    pub mean_prefill_ms: f64,
    pub mean_prompt_tokens: f64,
    pub mean_step_ms: f64,
    pub time_to_first_token: Latency,
    /// Decoder time (prefills and steps) per completed job.
    pub busy_ms_per_job: f64,
}

/// Raw decoder events of a run.
#[derive(Debug, Clone, Default)]
struct DecoderTally {
    sequences: u64,
    tokens: u64,
    prompt_tokens: u64,
    prefills: u64,
    prefill_s: f64,
    steps: u64,
    step_s: f64,
    batch_sum: u64,
    max_batch: usize,
    ttft_ms: Vec<f64>,
}

impl DecoderTally {
    fn report(mut self, max_active: usize, wall_s: f64, jobs: f64) -> DecoderReport {
        self.ttft_ms.sort_by(|a, b| a.total_cmp(b));
        let busy = self.prefill_s + self.step_s;
        DecoderReport {
            max_active,
            sequences: self.sequences,
            generated_tokens: self.tokens,
            tokens_per_s: self.tokens as f64 / wall_s.max(f64::MIN_POSITIVE),
            busy_tokens_per_s: if busy > 0.0 {
                self.tokens as f64 / busy
            } else {
                0.0
            },
            decode_steps: self.steps,
            mean_decode_batch: self.batch_sum as f64 / self.steps.max(1) as f64,
            max_decode_batch: self.max_batch,
            mean_prefill_ms: self.prefill_s * 1000.0 / self.prefills.max(1) as f64,
            mean_prompt_tokens: self.prompt_tokens as f64 / self.prefills.max(1) as f64,
            mean_step_ms: self.step_s * 1000.0 / self.steps.max(1) as f64,
            time_to_first_token: Latency {
                mean_ms: self.ttft_ms.iter().sum::<f64>() / self.ttft_ms.len().max(1) as f64,
                p50_ms: percentile(&self.ttft_ms, 50.0),
                p95_ms: percentile(&self.ttft_ms, 95.0),
                p99_ms: percentile(&self.ttft_ms, 99.0),
            },
            busy_ms_per_job: busy * 1000.0 / jobs.max(1.0),
        }
    }
}

/// One load run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub label: String,
    pub jobs: usize,
    pub failed: usize,
    pub concurrency: usize,
    pub wall_s: f64,
    pub jobs_per_s: f64,
    pub latency: Latency,
    /// Mean time per job in each stage (from the jobs' diagnostics), in milliseconds.
    pub stages_ms: BTreeMap<String, f64>,
    pub models: BTreeMap<String, ModelStats>,
    /// The VLM decoder (reasoning mode `vlm`).
    pub decoder: Option<DecoderReport>,
    /// Jobs/s if the models were the only cost: 1 / Σ(items per job ÷ model-only items/s),
    /// plus the decoder's time per job.
    pub model_only_jobs_per_s: f64,
    pub end_to_end_over_model_only: f64,
    /// Denoising steps of diffusion repairs during the load (one per region and step).
    pub diffusion_steps: u64,
    pub diffusion_steps_per_s: f64,
    /// Where the cores went during the load (Linux only).
    pub cpu: Option<CpuReport>,
}

/// CPU time of one load run, split between the model threads and everything else.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// CPU seconds of the whole process during the load.
    pub process_s: f64,
    /// Of which in the model threads (the batchers' session calls and ONNX Runtime's pools).
    pub model_threads_s: f64,
    /// Share of all cores busy: process_s ÷ (wall × cpus).
    pub utilisation: f64,
    /// CPU milliseconds outside the model threads per completed job: the worker's own work
    /// (decode, resizing, regions, patchmatch, encode, storage, broker).
    pub host_ms_per_job: f64,
    /// cpus ÷ host seconds per job: the jobs/s the host side could sustain on every core.
    pub host_ceiling_jobs_per_s: f64,
    /// CPU seconds by thread group (each model's threads, `runtime` = tokio's workers and
    /// blocking pool, `other`); threads that exited during the run are not in it.
    pub threads_s: BTreeMap<String, f64>,
}

impl CpuReport {
    fn of(delta: CpuDelta, wall_s: f64, cpus: usize, jobs: usize) -> Self {
        let (process_s, model_threads_s) = (delta.process_s, delta.model_s);
        let host_s = (process_s - model_threads_s).max(0.0);
        let host_s_per_job = host_s / jobs.max(1) as f64;
        CpuReport {
            process_s,
            model_threads_s,
            utilisation: process_s / (wall_s * cpus.max(1) as f64).max(f64::MIN_POSITIVE),
            host_ms_per_job: host_s_per_job * 1000.0,
            host_ceiling_jobs_per_s: if host_s_per_job > 0.0 {
                cpus as f64 / host_s_per_job
            } else {
                0.0
            },
            threads_s: delta.groups,
        }
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub bundle: String,
    pub device: String,
    /// How the sessions were set up: `models.io_binding`, and on CUDA the cuDNN settings.
    pub engine: String,
    pub image_size: u32,
    pub cpus: usize,
    pub runs: Vec<RunReport>,
    /// Dynamic batching jobs/s ÷ batch-size-1 jobs/s (with `--compare-batch-1`).
    pub dynamic_over_batch_1: Option<f64>,
    /// The same for the VLM decoder's generated tokens/s.
    pub tokens_dynamic_over_batch_1: Option<f64>,
}

/// Collects batch records per model and the decoder's events (and forwards them to the
/// Prometheus metrics).
#[derive(Default)]
struct Recorder {
    models: Mutex<BTreeMap<String, ModelStats>>,
    decoder: Mutex<Option<DecoderTally>>,
}

impl BatchObserver for Recorder {
    fn batch(&self, model: &str, record: &BatchRecord) {
        BatchMetrics.batch(model, record);
        if record.size == 0 {
            return;
        }
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let s = models.entry(model.to_string()).or_default();
        s.batches += 1;
        s.items += record.size as u64;
        s.total_inference_ms += record.inference.as_secs_f64() * 1000.0;
        match record.reason {
            crate::engine::batcher::CloseReason::Full => s.closed_full += 1,
            crate::engine::batcher::CloseReason::Timeout => s.closed_timeout += 1,
            crate::engine::batcher::CloseReason::Drained => {}
        }
    }
    fn queue_depth(&self, model: &str, depth: usize) {
        BatchMetrics.queue_depth(model, depth);
    }
    fn decoder(&self, model: &str, event: &DecoderEvent) {
        BatchMetrics.decoder(model, event);
        let mut tally = self.decoder.lock().unwrap_or_else(|e| e.into_inner());
        let t = tally.get_or_insert_with(DecoderTally::default);
        match *event {
            DecoderEvent::Prefill {
                prompt_tokens,
                duration,
                time_to_first_token,
            } => {
                t.tokens += 1;
                t.prefills += 1;
                t.prompt_tokens += prompt_tokens as u64;
                t.prefill_s += duration.as_secs_f64();
                t.ttft_ms.push(time_to_first_token.as_secs_f64() * 1000.0);
            }
            DecoderEvent::Step { batch, duration } => {
                t.tokens += batch as u64;
                t.steps += 1;
                t.step_s += duration.as_secs_f64();
                t.batch_sum += batch as u64;
                t.max_batch = t.max_batch.max(batch);
            }
            DecoderEvent::Finished { generated } => {
                if generated > 0 {
                    t.sequences += 1;
                }
            }
            DecoderEvent::Load { .. } => {}
        }
    }
    fn recovery(&self, model: &str, event: crate::engine::batcher::Recovery) {
        BatchMetrics.recovery(model, event);
    }
}

impl Recorder {
    fn take(&self) -> BTreeMap<String, ModelStats> {
        std::mem::take(&mut *self.models.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn take_decoder(&self) -> Option<DecoderTally> {
        self.decoder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// A generated test image: smooth colour gradients with noise, and magenta blobs when asked.
pub fn synthetic_image(size: u32, blemishes: usize, rng: &mut impl Rng) -> RgbImage {
    let (a, b): ([f32; 3], [f32; 3]) = (
        [
            rng.random_range(20.0..200.0),
            rng.random_range(20.0..200.0),
            rng.random_range(20.0..200.0),
        ],
        [
            rng.random_range(20.0..200.0),
            rng.random_range(20.0..200.0),
            rng.random_range(20.0..200.0),
        ],
    );
    let mut img = RgbImage::from_fn(size, size, |x, y| {
        let t = (x + y) as f32 / (2 * size) as f32;
        let wave = ((x as f32 / 9.0).sin() * (y as f32 / 13.0).cos()) * 12.0;
        let px = |c: usize| (a[c] * (1.0 - t) + b[c] * t + wave).clamp(0.0, 255.0) as u8;
        Rgb([px(0), px(1), px(2)])
    });
    for _ in 0..blemishes {
        let r = rng.random_range(size / 40 + 3..size / 14 + 5) as i64;
        let cx = rng.random_range(r..size as i64 - r);
        let cy = rng.random_range(r..size as i64 - r);
        for y in cy - r..=cy + r {
            for x in cx - r..=cx + r {
                if (x - cx).pow(2) + (y - cy).pow(2) <= r * r {
                    img.put_pixel(x as u32, y as u32, Rgb([255, 0, 255]));
                }
            }
        }
    }
    img
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs the benchmark: the dynamic-batching run, and the batch-1 run when asked.
pub async fn bench(settings: &Settings, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let bundle = Bundle::load(&settings.models.bundle).context("loading the model bundle")?;
    let work = tempfile_dir()?;
    let inputs = write_inputs(&work, options)?;
    let mut runs = Vec::new();

    let mut batching = settings.batching.clone();
    for role in ModelRole::ALL {
        let entry = batching.entry(role.as_str().to_string()).or_default();
        if options.max_batch_size.is_some() {
            entry.max_batch_size = options.max_batch_size;
        }
        if options.max_delay_ms.is_some() {
            entry.max_delay_ms = options.max_delay_ms;
        }
    }
    runs.push(run_load("dynamic", settings, &batching, options, &inputs, &work).await?);
    if options.compare_batch_1 {
        for entry in batching.values_mut() {
            entry.max_batch_size = Some(1);
        }
        runs.push(run_load("batch-1", settings, &batching, options, &inputs, &work).await?);
    }
    let _ = std::fs::remove_dir_all(&work);
    let dynamic_over_batch_1 = (runs.len() == 2 && runs[1].jobs_per_s > 0.0)
        .then(|| runs[0].jobs_per_s / runs[1].jobs_per_s);
    let tokens_dynamic_over_batch_1 = match runs.as_slice() {
        [dynamic, one] => match (&dynamic.decoder, &one.decoder) {
            (Some(d), Some(o)) if o.tokens_per_s > 0.0 => Some(d.tokens_per_s / o.tokens_per_s),
            _ => None,
        },
        _ => None,
    };
    Ok(BenchReport {
        bundle: format!("{} {}", bundle.manifest.name, bundle.manifest.version),
        device: settings.models.device.clone(),
        engine: format!(
            "io_binding {}, cudnn_conv_search {}, cudnn_max_workspace {}",
            settings.models.io_binding,
            settings.models.cudnn_conv_search,
            settings.models.cudnn_max_workspace
        ),
        image_size: options.image_size,
        cpus: cpus(),
        runs,
        dynamic_over_batch_1,
        tokens_dynamic_over_batch_1,
    })
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("retoucher-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes a pool of distinct generated images (jobs cycle through them).
fn write_inputs(
    dir: &std::path::Path,
    options: &BenchOptions,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let pool = options.jobs.clamp(1, 32);
    (0..pool)
        .map(|i| {
            let blemishes = if (i as f32 + 0.5) / pool as f32 <= options.blemished {
                rng.random_range(1..4)
            } else {
                0
            };
            let img = synthetic_image(options.image_size, blemishes, &mut rng);
            let path = dir.join(format!("input-{i}.png"));
            std::fs::write(&path, crate::imaging::encode_png(&img))?;
            Ok(path)
        })
        .collect()
}

async fn run_load(
    label: &str,
    settings: &Settings,
    batching: &BTreeMap<String, BatchingOverride>,
    options: &BenchOptions,
    inputs: &[std::path::PathBuf],
    work: &std::path::Path,
) -> anyhow::Result<RunReport> {
    let recorder = Arc::new(Recorder::default());
    let settings = &Settings {
        batching: batching.clone(),
        ..settings.clone()
    };
    let agents = app::agents(settings, recorder.clone()).await?;
    // Warm-up batches are not part of the run.
    recorder.take();
    recorder.take_decoder();
    let out = work.join(label);
    let total = options.jobs;
    eprintln!(
        "[{label}] {total} jobs at concurrency {}",
        options.concurrency
    );
    let steps_before = diffusion_steps();
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(total);
    let mut stages: BTreeMap<String, f64> = BTreeMap::new();
    let mut failed = 0;
    if options.through_broker {
        (latencies, stages, failed) =
            through_broker(label, settings, agents.clone(), options, inputs).await?;
    } else {
        let executor = Executor::new(agents.clone(), Storage::local(), settings.limits.clone());
        let mut stream = futures_util::stream::iter((0..total).map(|i| {
            let executor = executor.clone();
            let job = JobSpec {
                job_id: format!("bench-{i}"),
                image: Location::File(inputs[i % inputs.len()].clone()),
                prompt: options.prompt.clone(),
                results: Location::File(out.clone()).join(&format!("bench-{i}/")),
                options: JobOptions::default(),
                metadata: None,
                attempt: 1,
                queue_ms: 0.0,
            };
            // Each job is its own task, as in the worker: polled inside one task, every job's
            // pre- and post-processing would share a single thread.
            let task = tokio::spawn(async move {
                let t = Instant::now();
                let result = executor.execute(&job).await;
                (t.elapsed(), result)
            });
            async move {
                task.await.unwrap_or_else(|e| {
                    let error = JobError::new(ErrorClass::Internal, format!("job task: {e}"));
                    (Duration::ZERO, Err(error))
                })
            }
        }))
        .buffer_unordered(options.concurrency.max(1));
        let mut done = 0;
        let step = (total / 10).max(1);
        while let Some((elapsed, result)) = stream.next().await {
            done += 1;
            match result {
                Ok(report) => {
                    latencies.push(elapsed.as_secs_f64() * 1000.0);
                    let t = &report.diagnostics.timings_ms;
                    for (name, ms) in t.stages() {
                        *stages.entry(name.to_string()).or_default() += ms;
                    }
                }
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("[{label}] job failed: {e}");
                    }
                }
            }
            if done % step == 0 || done == total {
                eprintln!(
                    "[{label}] {done}/{total} jobs, {:.1} jobs/s",
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let steps = diffusion_steps().saturating_sub(steps_before);
    let cpu = match (cpu_before, CpuSample::now()) {
        (Some(before), Some(after)) => Some(CpuReport::of(
            after.since(&before),
            wall,
            cpus(),
            latencies.len(),
        )),
        _ => None,
    };
    let _ = std::fs::remove_dir_all(&out);
    let mut models = recorder.take();
    let decoder = recorder.take_decoder().map(|tally| {
        let max_active = agents
            .reasoning
            .vlm()
            .map_or(0, |vlm| vlm.decoding.max_active);
        tally.report(max_active, wall, latencies.len() as f64)
    });
    latencies.sort_by(|a, b| a.total_cmp(b));
    let completed = latencies.len().max(1) as f64;
    for ms in stages.values_mut() {
        *ms /= completed;
    }
    for (name, stats) in models.iter_mut() {
        stats.mean_batch_size = stats.items as f64 / stats.batches.max(1) as f64;
        stats.items_per_job = stats.items as f64 / completed;
        stats.mean_inference_ms = stats.total_inference_ms / stats.batches.max(1) as f64;
        stats.max_batch_size = agents
            .served()
            .into_iter()
            .find(|m| m.role.as_str() == name)
            .map_or(1, |m| m.max_batch_size);
    }
    eprintln!("[{label}] model-only phase");
    let mut model_only_seconds_per_job =
        decoder.as_ref().map_or(0.0, |d| d.busy_ms_per_job / 1000.0);
    for (name, stats) in models.iter_mut() {
        let wanted = options
            .model_only_batch_size
            .unwrap_or(stats.mean_batch_size.round() as usize);
        let b = wanted.clamp(1, stats.max_batch_size.max(1));
        let mut per_s = model_only(&agents, &recorder, name, b, options.model_only_batches).await?;
        if per_s == 0.0 && stats.total_inference_ms > 0.0 {
            // A model with a batcher of its own (the VLM's vision encoder) has no probe: its
            // busy time in the run itself is its ceiling.
            per_s = stats.items as f64 * 1000.0 / stats.total_inference_ms;
        }
        stats.model_only_items_per_s = per_s;
        stats.model_only_batch_size = b;
        if per_s > 0.0 {
            model_only_seconds_per_job += stats.items_per_job / per_s;
        }
    }
    let jobs_per_s = latencies.len() as f64 / wall;
    let model_only_jobs_per_s = if model_only_seconds_per_job > 0.0 {
        1.0 / model_only_seconds_per_job
    } else {
        0.0
    };
    Ok(RunReport {
        label: label.to_string(),
        jobs: total,
        failed,
        concurrency: options.concurrency,
        wall_s: wall,
        jobs_per_s,
        latency: Latency {
            mean_ms: latencies.iter().sum::<f64>() / completed,
            p50_ms: percentile(&latencies, 50.0),
            p95_ms: percentile(&latencies, 95.0),
            p99_ms: percentile(&latencies, 99.0),
        },
        stages_ms: stages,
        models,
        decoder,
        model_only_jobs_per_s,
        end_to_end_over_model_only: if model_only_jobs_per_s > 0.0 {
            jobs_per_s / model_only_jobs_per_s
        } else {
            0.0
        },
        diffusion_steps: steps,
        diffusion_steps_per_s: steps as f64 / wall,
        cpu,
    })
}

/// Denoising steps counted so far in this process (every scheduler).
fn diffusion_steps() -> u64 {
    let counter = &crate::metrics::metrics().diffusion_steps_total;
    SchedulerKind::ALL
        .iter()
        .map(|kind| counter.with_label_values(&[kind.as_str()]).get())
        .sum()
}

/// Items/s of one model's session fed a ready request in waves of `batch` concurrent copies.
/// Only the time inside the model thread counts (stacking the tensors, the session call,
/// splitting the output), so batch assembly delays do not lower the ceiling.
async fn model_only(
    agents: &Agents,
    recorder: &Recorder,
    model: &str,
    batch: usize,
    batches: usize,
) -> anyhow::Result<f64> {
    let Some(served) = agents
        .served()
        .into_iter()
        .find(|m| m.role.as_str() == model)
    else {
        return Ok(0.0);
    };
    let (batcher, request) = (&served.batcher, &served.probe);
    let wave = || {
        let calls = (0..batch).map(|_| batcher.submit(request.clone()));
        futures_util::future::join_all(calls)
    };
    let started = Instant::now();
    recorder.take();
    for _ in 0..batches.max(1) {
        for result in wave().await {
            result.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let stats = recorder.take().remove(model).unwrap_or_default();
    let busy_s = stats.total_inference_ms / 1000.0;
    Ok(if busy_s > 0.0 {
        stats.items as f64 / busy_s
    } else {
        0.0
    })
}

/// The load through RabbitMQ and S3: uploads the inputs, starts an in-process worker on the
/// configured queue, publishes the jobs, and waits for their events. Returns per-job latency
/// (publish → event), per-stage sums read back from the stored diagnostics, and failures.
async fn through_broker(
    label: &str,
    settings: &Settings,
    agents: Arc<Agents>,
    options: &BenchOptions,
    inputs: &[std::path::PathBuf],
) -> anyhow::Result<(Vec<f64>, BTreeMap<String, f64>, usize)> {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let bucket = settings
        .s3
        .allowed_buckets
        .first()
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--through-broker needs s3.allowed_buckets (the first one gets the inputs)"
            )
        })?;
    anyhow::ensure!(
        !settings.s3.output.is_empty(),
        "--through-broker needs s3.output (where the results go)"
    );
    let storage = app::storage(settings, StorageKind::S3).await?;
    let run = format!("bench-{}-{label}", std::process::id());
    let mut uris = Vec::new();
    for (i, path) in inputs.iter().enumerate() {
        let uri = Location::S3 {
            bucket: bucket.clone(),
            key: format!("{run}/input-{i}.png"),
        };
        let body = bytes::Bytes::from(std::fs::read(path)?);
        storage
            .put(&uri, body, "image/png")
            .await
            .map_err(|e| anyhow::anyhow!("uploading bench inputs: {e}"))?;
        uris.push(uri.to_string());
    }
    let conn = crate::broker::connect(&settings.broker.endpoint(), "retoucher-bench").await?;
    settings
        .broker
        .migrations()?
        .verify(&conn, &settings.broker.queue)
        .await?;
    let channel = conn.create_channel().await?;
    let events = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            events.name().clone(),
            crate::broker::EVENTS_EXCHANGE.into(),
            "job.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            events.name().clone(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    let mut worker_settings = settings.clone();
    worker_settings.worker.max_inflight = options.concurrency.max(1);
    worker_settings.broker.prefetch = options.concurrency.clamp(1, u16::MAX as usize) as u16;
    let executor = Executor::new(agents, storage.clone(), settings.limits.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let readiness = Arc::new(crate::metrics::Readiness::default());
    let worker = tokio::spawn(crate::worker::consume(
        worker_settings,
        executor,
        readiness,
        stop_rx,
    ));

    let publisher = crate::broker::Publisher::new(&conn).await?;
    let mut published = std::collections::HashMap::new();
    for i in 0..options.jobs {
        let job_id = format!("{run}-{i}");
        let body = serde_json::json!({
            "job_id": job_id,
            "image": uris[i % uris.len()],
            "prompt": options.prompt,
        });
        publisher
            .publish_job(&settings.broker.queue, body.to_string().as_bytes())
            .await?;
        published.insert(job_id, Instant::now());
    }
    let mut latencies = Vec::new();
    let mut stages: BTreeMap<String, f64> = BTreeMap::new();
    let mut failed = 0;
    let step = (options.jobs / 10).max(1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !published.is_empty() {
        let delivery = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!("{} jobs did not finish within 10 minutes", published.len())
            })?
            .ok_or_else(|| anyhow::anyhow!("the event stream ended"))??;
        let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        if event["status"] == "retrying" {
            continue;
        }
        let Some(sent) = event["job_id"].as_str().and_then(|id| published.remove(id)) else {
            continue;
        };
        match event["status"].as_str() {
            Some("retouched") | Some("clean") => {
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                let job_id = event["job_id"].as_str().unwrap_or_default();
                let output = Location::parse_s3_prefix(&settings.s3.output)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .join(&format!(
                        "{job_id}/{}",
                        crate::diagnostics::layout::DIAGNOSTICS
                    ));
                if let Ok(bytes) = storage.get(&output, 64 << 20).await {
                    if let Ok(d) = serde_json::from_slice::<crate::diagnostics::Diagnostics>(&bytes)
                    {
                        let t = &d.timings_ms;
                        for (name, ms) in t.stages() {
                            *stages.entry(name.to_string()).or_default() += ms;
                        }
                    }
                }
            }
            _ => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("[{label}] job failed: {}", event["error"]);
                }
            }
        }
        let done = options.jobs - published.len();
        if done % step == 0 {
            eprintln!("[{label}] {done}/{} jobs through the broker", options.jobs);
        }
    }
    let _ = stop_tx.send(true);
    worker.await??;
    crate::broker::close(&conn, "bench done").await;
    Ok((latencies, stages, failed))
}

/// The report as a table for people.
pub fn table(report: &BenchReport) -> String {
    let mut s = format!(
        "bundle {}, device {} ({}), {}x{} images, {} CPUs\n",
        report.bundle,
        report.device,
        report.engine,
        report.image_size,
        report.image_size,
        report.cpus
    );
    for run in &report.runs {
        s.push_str(&format!(
            "\n[{}] {} jobs ({} failed), concurrency {}: {:.1} jobs/s; latency p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms\n",
            run.label, run.jobs, run.failed, run.concurrency, run.jobs_per_s,
            run.latency.p50_ms, run.latency.p95_ms, run.latency.p99_ms
        ));
        let stages: Vec<String> = run
            .stages_ms
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect();
        s.push_str(&format!("  mean ms per job: {}\n", stages.join(", ")));
        s.push_str(&format!(
            "  {:<12} {:>9} {:>10} {:>10} {:>12} {:>14} {:>18}\n",
            "model",
            "max batch",
            "mean batch",
            "items/job",
            "full/timeout",
            "inference ms",
            "model-only items/s"
        ));
        for (name, m) in &run.models {
            s.push_str(&format!(
                "  {:<12} {:>9} {:>10.2} {:>10.2} {:>12} {:>14.2} {:>13.1} @ b{}\n",
                name,
                m.max_batch_size,
                m.mean_batch_size,
                m.items_per_job,
                format!("{}/{}", m.closed_full, m.closed_timeout),
                m.mean_inference_ms,
                m.model_only_items_per_s,
                m.model_only_batch_size
            ));
        }
        if let Some(d) = &run.decoder {
            s.push_str(&format!(
                "  decoder (max {} active): {} sequences, {} tokens: {:.1} tokens/s ({:.1} while busy); \
                 {} steps, mean batch {:.2} (max {}), step {:.1} ms; prefill {:.1} ms for {:.0} tokens; \
                 first token p50 {:.0} ms, p95 {:.0} ms\n",
                d.max_active,
                d.sequences,
                d.generated_tokens,
                d.tokens_per_s,
                d.busy_tokens_per_s,
                d.decode_steps,
                d.mean_decode_batch,
                d.max_decode_batch,
                d.mean_step_ms,
                d.mean_prefill_ms,
                d.mean_prompt_tokens,
                d.time_to_first_token.p50_ms,
                d.time_to_first_token.p95_ms
            ));
        }
        s.push_str(&format!(
            "  model-only ceiling {:.1} jobs/s; end-to-end / model-only = {:.2}\n",
            run.model_only_jobs_per_s, run.end_to_end_over_model_only
        ));
        if run.diffusion_steps > 0 {
            let unet = run.models.get(ModelRole::Unet.as_str());
            s.push_str(&format!(
                "  diffusion: {} denoising steps, {:.1} steps/s, UNet mean batch {:.2}\n",
                run.diffusion_steps,
                run.diffusion_steps_per_s,
                unet.map_or(0.0, |m| m.mean_batch_size)
            ));
        }
        if let Some(cpu) = &run.cpu {
            s.push_str(&format!(
                "  CPU {:.1} s ({:.0}% of {} cores), model threads {:.1} s; outside them {:.1} ms per job: host ceiling {:.1} jobs/s\n",
                cpu.process_s,
                cpu.utilisation * 100.0,
                report.cpus,
                cpu.model_threads_s,
                cpu.host_ms_per_job,
                cpu.host_ceiling_jobs_per_s
            ));
            let threads: Vec<String> = cpu
                .threads_s
                .iter()
                .filter(|(_, s)| **s >= 0.05)
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect();
            s.push_str(&format!("  CPU s by thread: {}\n", threads.join(", ")));
        }
    }
    if let Some(ratio) = report.dynamic_over_batch_1 {
        s.push_str(&format!("\ndynamic batching / batch size 1 = {ratio:.2}\n"));
    }
    if let Some(ratio) = report.tokens_dynamic_over_batch_1 {
        s.push_str(&format!(
            "decoder tokens/s, continuous batching / one sequence at a time = {ratio:.2}\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_images_have_blemishes_only_when_asked() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let magenta = |img: &RgbImage| img.pixels().filter(|p| p.0 == [255, 0, 255]).count();
        assert_eq!(magenta(&synthetic_image(128, 0, &mut rng)), 0);
        assert!(magenta(&synthetic_image(128, 2, &mut rng)) > 20);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
