//! What every batched model of every agent has in common: its [`ModelRole`] (the name in
//! metrics and in `batching.<model>` settings), its batcher, the largest batch it takes, and a
//! probe request of its input shape that the warm-up and `bench`'s model-only phase run.
//!
//! Agents and tools build their models through a [`LoadContext`], so that loading a model from
//! the bundle, choosing its batch settings and starting its batcher is written once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use ort::session::Session;

use super::ModelInfo;
use crate::bundle::Bundle;
use crate::config::BatchingOverride;
use crate::engine::batcher::{BatchError, BatchObserver, BatchSettings, Batcher};
use crate::engine::staging::IoPlan;
use crate::engine::{load_session, EngineOptions, OnnxModel, Signature, TensorData};
use crate::error::{ErrorClass, JobError};

/// The role a model session plays. Its name labels the model's metrics
/// (`retoucher_batch_size{model=…}`), names its thread (`model-{name}`) and keys its batching
/// settings (`batching.{name}.*`, in the configuration and in the bundle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelRole {
    /// Image + prompt → saliency map.
    Perception,
    /// Region crop + mask → category logits (reasoning, `regions` mode).
    Classifier,
    /// LaMa-convention inpainting (tool `onnx-inpaint`).
    Inpaint,
    /// The VLM's vision encoder (reasoning, `vlm` mode).
    Vision,
    /// The VLM's token embedding and decoder, continuously batched across jobs (`vlm` mode).
    Decoder,
    /// Diffusion inpainting's text encoder: prompt ids → hidden states (tool `diffusion-inpaint`).
    TextEncoder,
    /// Diffusion inpainting's denoising UNet, one call per step (tool `diffusion-inpaint`).
    Unet,
    /// Diffusion inpainting's VAE encoder: masked image → latents (tool `diffusion-inpaint`).
    VaeEncoder,
    /// Diffusion inpainting's VAE decoder: latents → image (tool `diffusion-inpaint`).
    VaeDecoder,
}

impl ModelRole {
    /// Every role, in pipeline order.
    pub const ALL: &'static [ModelRole] = &[
        ModelRole::Perception,
        ModelRole::Classifier,
        ModelRole::Vision,
        ModelRole::Decoder,
        ModelRole::Inpaint,
        ModelRole::TextEncoder,
        ModelRole::Unet,
        ModelRole::VaeEncoder,
        ModelRole::VaeDecoder,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelRole::Perception => "perception",
            ModelRole::Classifier => "classifier",
            ModelRole::Inpaint => "inpaint",
            ModelRole::Vision => "vision",
            ModelRole::Decoder => "decoder",
            ModelRole::TextEncoder => "text_encoder",
            ModelRole::Unet => "unet",
            ModelRole::VaeEncoder => "vae_encoder",
            ModelRole::VaeDecoder => "vae_decoder",
        }
    }
}

impl fmt::Display for ModelRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// KV cache bytes a decoder's running batch may hold unless configured (1 GiB).
pub const DEFAULT_KV_BYTES: u64 = 1 << 30;

/// Everything an agent or tool needs to load its models.
pub struct LoadContext<'a> {
    pub bundle: &'a Arc<Bundle>,
    pub engine: &'a EngineOptions,
    pub batching: &'a BTreeMap<String, BatchingOverride>,
    pub observer: Arc<dyn BatchObserver>,
}

impl LoadContext<'_> {
    /// The path of a bundle file the manifest refers to; it must carry a checksum in
    /// `[files]` (so it was verified when the bundle was loaded).
    pub fn file(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.bundle.file(name)
    }

    /// A session for a bundle file, on the configured device.
    pub fn session(&self, file: &str) -> anyhow::Result<Session> {
        load_session(&self.file(file)?, self.engine)
    }

    pub fn info(&self, file: &str) -> ModelInfo {
        ModelInfo::of(self.bundle, file)
    }

    /// Batch settings for a role: built-in defaults ← bundle's `[batching.<role>]` ← config.
    pub fn batch_settings(&self, role: ModelRole) -> BatchSettings {
        let mut s = BatchSettings::default();
        let layers = [
            self.bundle.manifest.batching.get(role.as_str()),
            self.batching.get(role.as_str()),
        ];
        for layer in layers.into_iter().flatten() {
            if let Some(v) = layer.max_batch_size {
                s.max_batch_size = v.max(1);
            }
            if let Some(v) = layer.max_delay_ms {
                s.max_delay = std::time::Duration::from_millis(v);
            }
            if let Some(v) = layer.max_queue {
                s.max_queue = v.max(1);
            }
            if let Some(v) = layer.retries {
                s.retries = v;
            }
            if let Some(v) = layer.retry_backoff_ms {
                s.retry_backoff = std::time::Duration::from_millis(v);
            }
            if let Some(v) = layer.unhealthy_after {
                s.unhealthy_after = v.max(1);
            }
        }
        s
    }

    /// The KV cache budget of a continuously batched decoder: bundle's
    /// `[batching.<role>] max_kv_bytes` ← config; default [`DEFAULT_KV_BYTES`].
    pub fn kv_budget(&self, role: ModelRole) -> u64 {
        let config = self.batching.get(role.as_str());
        let bundle = self.bundle.manifest.batching.get(role.as_str());
        config
            .and_then(|layer| layer.max_kv_bytes)
            .or_else(|| bundle.and_then(|layer| layer.max_kv_bytes))
            .unwrap_or(DEFAULT_KV_BYTES)
    }

    /// Starts the batcher of a model (batch size 1 when its batch dimension is fixed).
    /// `probe` is a request of the model's input shape, `output_len` the values it returns per
    /// item; the warm-up checks both.
    pub fn serve(
        &self,
        role: ModelRole,
        model: OnnxModel,
        probe: Vec<TensorData>,
        output_len: usize,
    ) -> ServedModel {
        let model = model.with_io(IoPlan {
            mode: self.engine.io,
            device: self.engine.device,
        });
        let mut settings = self.batch_settings(role);
        if !model.dynamic_batch {
            settings.max_batch_size = 1;
        }
        ServedModel {
            role,
            signature: model.signature(),
            batcher: Batcher::spawn(role.as_str(), model, settings, self.observer.clone()),
            max_batch_size: settings.max_batch_size,
            probe,
            output_len,
        }
    }
}

/// A model session served behind its batcher.
pub struct ServedModel {
    pub role: ModelRole,
    pub batcher: Batcher<OnnxModel>,
    /// The largest batch the batcher forms.
    pub max_batch_size: usize,
    /// A request of the model's input shape (warm-up, model-only benchmarks).
    pub probe: Vec<TensorData>,
    /// Values the model returns per item.
    pub output_len: usize,
    /// What the model file declares, checked against the probe before the warm-up runs.
    pub signature: Signature,
}

impl ServedModel {
    /// Runs one request through the batcher. A request that fails alone is the job's
    /// `model_error` (permanent); a model that could not run it (out of memory, device busy,
    /// shutting down) is `model_unavailable` (transient: the job is retried later).
    pub async fn submit(&self, request: Vec<TensorData>) -> Result<Vec<f32>, JobError> {
        let output = self.batcher.submit(request).await.map_err(|e| {
            let class = match e {
                BatchError::Model { .. } => ErrorClass::ModelError,
                BatchError::Unavailable { .. } | BatchError::Closed { .. } => {
                    ErrorClass::ModelUnavailable
                }
            };
            JobError::new(class, e.to_string())
        })?;
        if output.len() != self.output_len {
            return Err(JobError::new(
                ErrorClass::ModelError,
                format!(
                    "model {} returned {} values, expected {}",
                    self.role,
                    output.len(),
                    self.output_len
                ),
            ));
        }
        Ok(output)
    }

    /// Checks the model file's declared inputs and output against what the agent feeds (the
    /// probe) and reads (`output_len`): names, ranks, fixed dimensions, element types. The error
    /// names every disagreement.
    pub fn check_contract(&self) -> anyhow::Result<()> {
        let problems = self.signature.problems(&self.probe, self.output_len);
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", problems.join("; "))
        }
    }

    /// Checks the contract, then runs one probe request alone and checks its output; returns how
    /// long the call took.
    pub async fn probe_once(&self) -> anyhow::Result<std::time::Duration> {
        self.check_contract()?;
        let started = std::time::Instant::now();
        let output = self
            .batcher
            .submit(self.probe.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if output.len() != self.output_len {
            anyhow::bail!(
                "model {} returned {} values, expected {}",
                self.role,
                output.len(),
                self.output_len
            );
        }
        Ok(started.elapsed())
    }

    /// Checks the contract, then runs one wave of `size` copies of the probe per warm-up size
    /// (the copies are made before the first is submitted, so each wave forms one batch), and
    /// checks every output.
    pub async fn warm_up(&self, every_size: bool) -> anyhow::Result<()> {
        self.check_contract()?;
        for size in warm_up_sizes(self.max_batch_size, every_size) {
            let calls = (0..size).map(|_| self.batcher.submit(self.probe.clone()));
            for output in futures_util::future::join_all(calls).await {
                let output = output.map_err(|e| anyhow::anyhow!("{e}"))?;
                if output.len() != self.output_len {
                    anyhow::bail!(
                        "model {} returned {} values at batch size {size}, expected {}",
                        self.role,
                        output.len(),
                        self.output_len
                    );
                }
            }
        }
        Ok(())
    }
}

/// The batch sizes the warm-up runs for a model whose largest batch is `max`: on a GPU every
/// size from `max` down to 1, because the first call at a new input shape pays for memory
/// planning and kernel selection, and dynamic batching produces every size; paid at start, it
/// stays out of the first jobs' latency. On the CPU the full batch alone.
pub fn warm_up_sizes(max: usize, every_size: bool) -> Vec<usize> {
    if every_size {
        (1..=max.max(1)).rev().collect()
    } else {
        vec![max.max(1)]
    }
}
