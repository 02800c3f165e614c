//! One job from input location to a stored result set: fetch → decode → the loop → encode →
//! store. Shared by the worker (S3) and `run` (local files), so both produce the same layout.
//!
//! The result set is written image first and `diagnostics.json` last: a set whose
//! `diagnostics.json` exists is complete, and a redelivered job finding it is not recomputed.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::agents::Agents;
use crate::config::Limits;
use crate::diagnostics::{
    layout, Diagnostics, InputInfo, JobStatus, JobTimings, LoopInfo, OutputInfo, WorkerInfo,
};
use crate::error::{ErrorClass, JobError};
use crate::faults::{self, FaultPoint};
use crate::imaging::{self, DecodedImage, ImageLimits};
use crate::job::JobOptions;
use crate::metrics::metrics;
use crate::pipeline::{self, LoopSettings, Retouched};
use crate::storage::{Location, Storage};

/// What a job needs from the process: the agents, storage and limits.
#[derive(Clone)]
pub struct Executor {
    pub agents: Arc<Agents>,
    pub storage: Storage,
    pub limits: Limits,
}

/// A job with its locations resolved.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub job_id: String,
    pub image: Location,
    pub prompt: String,
    /// `{output}{job_id}/`: the folder or prefix the result set goes into.
    pub results: Location,
    pub options: JobOptions,
    pub metadata: Option<Value>,
    pub attempt: u32,
    /// Time the message waited in the queue, when known.
    pub queue_ms: f64,
}

/// How a finished job turned out.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub diagnostics: Diagnostics,
    pub regions: usize,
    /// The loop's own result: the image as stored, and every perception pass with its float
    /// saliency map and region masks (the stored files are 8-bit renderings of them).
    pub retouched: Arc<Retouched>,
}

impl JobReport {
    pub fn status(&self) -> JobStatus {
        self.diagnostics.status
    }
    pub fn iterations(&self) -> usize {
        self.diagnostics.iterations.len()
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

impl Executor {
    pub fn new(agents: Arc<Agents>, storage: Storage, limits: Limits) -> Executor {
        Executor {
            agents,
            storage,
            limits,
        }
    }

    /// The loop settings for a job: the bundle's defaults with the job's overrides.
    pub fn loop_settings(&self, options: &JobOptions) -> LoopSettings {
        let defaults = self.agents.bundle.manifest.defaults;
        LoopSettings {
            max_iterations: options.max_iterations.unwrap_or(defaults.max_iterations),
            saliency_threshold: options
                .saliency_threshold
                .unwrap_or(defaults.saliency_threshold),
            diffusion_steps: options.diffusion_steps,
        }
    }

    /// The stored diagnostics of a job whose result set is complete, if there is one.
    pub async fn completed(&self, job: &JobSpec) -> Result<Option<Diagnostics>, JobError> {
        let marker = job.results.join(layout::DIAGNOSTICS);
        // One GET: absent (the usual case) is "not found", present is read right away.
        let bytes = match self.storage.get(&marker, 64 << 20).await {
            Ok(bytes) => bytes,
            Err(e) if e.class == ErrorClass::ImageNotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // A marker that does not parse is not trusted: the job is recomputed and overwrites it.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Runs the job and stores its result set.
    pub async fn execute(&self, job: &JobSpec) -> Result<JobReport, JobError> {
        let started = Instant::now();
        let stage = |name: &str, ms: f64| {
            metrics()
                .stage_duration_seconds
                .with_label_values(&[name])
                .observe(ms / 1000.0);
        };
        let mut timings = JobTimings {
            queue: job.queue_ms,
            ..JobTimings::default()
        };

        let t = Instant::now();
        let bytes = self
            .storage
            .get(&job.image, self.limits.max_image_bytes)
            .await?;
        timings.fetch = ms(t);
        stage("fetch", timings.fetch);
        faults::hit(FaultPoint::AfterFetch, &job.job_id).await;

        let t = Instant::now();
        let limits = ImageLimits {
            max_bytes: self.limits.max_image_bytes,
            max_pixels: self.limits.max_image_pixels,
        };
        let decoded = tokio::task::spawn_blocking(move || {
            let sha256 = hex::encode(Sha256::digest(&bytes));
            imaging::decode(&bytes, &limits).map(|d| (d, sha256))
        })
        .await
        .map_err(|e| JobError::new(ErrorClass::Internal, format!("decoding task: {e}")))?;
        let (decoded, sha256) = decoded?;
        timings.decode = ms(t);
        stage("decode", timings.decode);
        faults::hit(FaultPoint::AfterDecode, &job.job_id).await;
        let (width, height) = decoded.rgb.dimensions();
        let DecodedImage {
            rgb,
            format,
            original,
        } = decoded;

        let settings = self.loop_settings(&job.options);
        let result = faults::in_job(
            &job.job_id,
            pipeline::retouch(&self.agents, rgb, &job.job_id, &job.prompt, settings),
        )
        .await?;
        timings.perception = result.timings_ms.perception;
        timings.reasoning = result.timings_ms.reasoning;
        timings.action = result.timings_ms.action;
        for (name, value) in [
            ("perception", timings.perception),
            ("reasoning", timings.reasoning),
            ("action", timings.action),
        ] {
            stage(name, value);
        }
        faults::hit(FaultPoint::AfterRetouch, &job.job_id).await;

        // Encode every file of the set off the async threads.
        let t = Instant::now();
        let result = Arc::new(result);
        let encoded = {
            let result = result.clone();
            tokio::task::spawn_blocking(move || {
                let mut files: Vec<(String, Bytes)> = Vec::new();
                // The input's alpha, bit depth and metadata come back (see imaging::Original).
                files.push((
                    layout::RETOUCHED.to_string(),
                    Bytes::from(original.encode(&result.image)),
                ));
                for it in &result.iterations {
                    files.push((
                        layout::saliency(it.index),
                        Bytes::from(imaging::encode_gray_png(&it.saliency_map.to_gray())),
                    ));
                }
                for (i, r, mask) in result.masks() {
                    files.push((
                        layout::mask(i, r),
                        Bytes::from(imaging::encode_mask_png(mask)),
                    ));
                }
                files
            })
            .await
            .map_err(|e| JobError::new(ErrorClass::Internal, format!("encoding task: {e}")))?
        };
        timings.encode = ms(t);
        stage("encode", timings.encode);

        let t = Instant::now();
        let puts = encoded.into_iter().map(|(name, body)| {
            let location = job.results.join(&name);
            async move {
                self.storage.put(&location, body, "image/png").await?;
                if name == layout::RETOUCHED {
                    faults::hit(FaultPoint::AfterRetouchedWrite, &job.job_id).await;
                }
                Ok::<(), JobError>(())
            }
        });
        for put in futures_util::future::join_all(puts).await {
            put?;
        }
        let status = if result.edited() {
            JobStatus::Retouched
        } else {
            JobStatus::Clean
        };
        for it in &result.iterations {
            for region in &it.regions {
                metrics()
                    .regions_total
                    .with_label_values(&[region.category.as_str()])
                    .inc();
            }
        }
        timings.store = ms(t);
        timings.total = ms(started) + job.queue_ms;
        let diagnostics = Diagnostics {
            job_id: job.job_id.clone(),
            status,
            attempt: job.attempt,
            input: InputInfo {
                uri: job.image.to_string(),
                width,
                height,
                format: format.to_string(),
                sha256,
            },
            output: OutputInfo {
                uri: job.results.join(layout::RETOUCHED).to_string(),
            },
            settings: LoopInfo {
                max_iterations: settings.max_iterations,
                saliency_threshold: settings.saliency_threshold,
                diffusion_steps: settings.diffusion_steps,
            },
            iterations: result.iterations.iter().map(Into::into).collect(),
            models: self
                .agents
                .models()
                .iter()
                .map(|(k, v)| (k.clone(), v.into()))
                .collect(),
            timings_ms: timings,
            worker: WorkerInfo::current(),
            metadata: job.metadata.clone(),
        };
        let body = serde_json::to_vec_pretty(&diagnostics)
            .map_err(|e| JobError::new(ErrorClass::Internal, format!("diagnostics: {e}")))?;
        faults::hit(FaultPoint::BeforeDiagnostics, &job.job_id).await;
        // Last: the commit marker.
        self.storage
            .put(
                &job.results.join(layout::DIAGNOSTICS),
                Bytes::from(body),
                "application/json",
            )
            .await?;
        stage("store", ms(t));
        faults::hit(FaultPoint::AfterDiagnostics, &job.job_id).await;
        metrics()
            .iterations
            .observe(diagnostics.iterations.len() as f64);
        Ok(JobReport {
            regions: result.region_count(),
            diagnostics,
            retouched: result,
        })
    }
}
