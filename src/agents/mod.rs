//! The three agents of the paper, each a thin adapter: pre-processing, a session call through
//! its model's batcher, post-processing.
//!
//! [`perception`] finds where the image is distorted (a saliency map conditioned on the prompt),
//! [`reasoning`] says what is wrong in each region, [`action`] repairs the regions with the tool
//! the bundle routes their category to.

pub mod action;
pub mod perception;
pub mod reasoning;
pub mod regions;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::bundle::Bundle;
use crate::config::BatchingOverride;
use crate::engine::batcher::{BatchObserver, BatchSettings, Batcher};
use crate::engine::{Device, EngineOptions, OnnxModel, TensorData};

/// Identity of one model, reported in diagnostics (`models` {agent → name, version, sha256}).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

impl ModelInfo {
    fn of(bundle: &Bundle, file: &str) -> ModelInfo {
        ModelInfo {
            name: format!("{}/{}", bundle.manifest.name, file),
            version: bundle.manifest.version.clone(),
            sha256: bundle.sha256(file).to_string(),
        }
    }
}

/// The three agents, loaded from one bundle, ready to serve every job of the process.
pub struct Agents {
    pub bundle: Arc<Bundle>,
    pub perception: perception::Perception,
    pub reasoning: reasoning::Reasoning,
    pub action: action::Action,
    /// Warm every batch size, not only the largest (on a GPU; see [`warm_up_sizes`]).
    warm_every_size: bool,
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

/// Runs one wave of `size` copies of `request` through `batcher` per size (the copies are
/// made before the first is submitted, so each wave forms one batch), and checks that every
/// output has `expected_len` values.
async fn warm_batcher(
    batcher: &Batcher<OnnxModel>,
    request: &[TensorData],
    sizes: &[usize],
    expected_len: usize,
) -> anyhow::Result<()> {
    for &size in sizes {
        let calls = (0..size).map(|_| batcher.submit(request.to_vec()));
        for output in futures_util::future::join_all(calls).await {
            let output = output.map_err(|e| anyhow::anyhow!("{e}"))?;
            if output.len() != expected_len {
                anyhow::bail!(
                    "model {} returned {} values at batch size {size}, expected {expected_len}",
                    batcher.name(),
                    output.len()
                );
            }
        }
    }
    Ok(())
}

/// Batch settings for a model: built-in defaults ← bundle's `[batching.<model>]` ← config.
pub fn batch_settings(
    model: &str,
    bundle: &Bundle,
    config: &BTreeMap<String, BatchingOverride>,
) -> BatchSettings {
    let mut s = BatchSettings::default();
    for layer in [bundle.manifest.batching.get(model), config.get(model)]
        .into_iter()
        .flatten()
    {
        if let Some(v) = layer.max_batch_size {
            s.max_batch_size = v.max(1);
        }
        if let Some(v) = layer.max_delay_ms {
            s.max_delay = std::time::Duration::from_millis(v);
        }
        if let Some(v) = layer.max_queue {
            s.max_queue = v.max(1);
        }
    }
    s
}

impl Agents {
    /// Loads the bundle's sessions and starts their batchers (needs a tokio runtime).
    pub fn load(
        bundle: Bundle,
        engine: &EngineOptions,
        batching: &BTreeMap<String, BatchingOverride>,
        observer: Arc<dyn BatchObserver>,
    ) -> anyhow::Result<Agents> {
        let bundle = Arc::new(bundle);
        let perception = perception::Perception::load(&bundle, engine, batching, observer.clone())
            .context("loading the perception agent")?;
        let reasoning = reasoning::Reasoning::load(&bundle, engine, batching, observer.clone())
            .context("loading the reasoning agent")?;
        let action = action::Action::load(&bundle, engine, batching, observer)
            .context("loading the action agent")?;
        Ok(Agents {
            bundle,
            perception,
            reasoning,
            action,
            warm_every_size: matches!(engine.device, Device::Cuda(_)),
        })
    }

    /// Models by agent, for diagnostics.
    pub fn models(&self) -> BTreeMap<String, ModelInfo> {
        let mut models = BTreeMap::new();
        models.insert("perception".to_string(), self.perception.info.clone());
        models.insert("reasoning".to_string(), self.reasoning.info.clone());
        if let Some(info) = self.action.inpaint_info() {
            models.insert("action".to_string(), info);
        }
        models
    }

    /// Runs every model at its full batch size (on a GPU at every batch size, see
    /// [`warm_up_sizes`]) so the first jobs are not slow and a broken bundle fails at start,
    /// not on the first job.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        let every = self.warm_every_size;
        self.perception
            .warm_up(every)
            .await
            .context("warming up perception")?;
        self.reasoning
            .warm_up(every)
            .await
            .context("warming up reasoning")?;
        self.action
            .warm_up(every)
            .await
            .context("warming up action")?;
        Ok(())
    }
}
