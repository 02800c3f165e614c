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
use crate::engine::batcher::{BatchObserver, BatchSettings};
use crate::engine::EngineOptions;

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

    /// Runs every model once at its full batch size so the first job is not slow and a broken
    /// bundle fails at start, not on the first job.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        self.perception
            .warm_up()
            .await
            .context("warming up perception")?;
        self.reasoning
            .warm_up()
            .await
            .context("warming up reasoning")?;
        self.action.warm_up().await.context("warming up action")?;
        Ok(())
    }
}
