//! The three agents of the paper, each a thin adapter: pre-processing, a session call through
//! its model's batcher, post-processing.
//!
//! [`perception`] finds where the image is distorted (a saliency map conditioned on the prompt),
//! [`reasoning`] says what is wrong in each region, [`action`] repairs the regions with the tool
//! the bundle routes their category to. [`served`] is what every batched model has in common
//! (its role, batcher, warm-up); [`Agents`] loads all three from one bundle.

pub mod action;
pub mod perception;
pub mod reasoning;
pub mod served;
pub mod text;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::bundle::Bundle;
use crate::config::BatchingOverride;
use crate::engine::batcher::BatchObserver;
use crate::engine::{Device, EngineOptions};

pub use served::{warm_up_sizes, LoadContext, ModelRole, ServedModel};

/// Identity of one model, reported in diagnostics (`models` {agent → name, version, sha256}).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

impl ModelInfo {
    pub fn of(bundle: &Bundle, file: &str) -> ModelInfo {
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

impl Agents {
    /// Loads the bundle's sessions and starts their batchers (needs a tokio runtime).
    pub fn load(
        bundle: Bundle,
        engine: &EngineOptions,
        batching: &BTreeMap<String, BatchingOverride>,
        observer: Arc<dyn BatchObserver>,
    ) -> anyhow::Result<Agents> {
        let bundle = Arc::new(bundle);
        let ctx = LoadContext {
            bundle: &bundle,
            engine,
            batching,
            observer,
        };
        let perception =
            perception::Perception::load(&ctx).context("loading the perception agent")?;
        let reasoning = reasoning::Reasoning::load(&ctx).context("loading the reasoning agent")?;
        let action = action::Action::load(&ctx).context("loading the action agent")?;
        Ok(Agents {
            bundle: bundle.clone(),
            perception,
            reasoning,
            action,
            warm_every_size: matches!(engine.device, Device::Cuda(_)),
        })
    }

    /// Every batched model of the three agents, in pipeline order.
    pub fn served(&self) -> Vec<&ServedModel> {
        let mut served = vec![self.perception.served()];
        served.extend(self.reasoning.served());
        served.extend(self.action.served());
        served
    }

    /// The batched model serving `role`, if the bundle has one.
    pub fn model(&self, role: ModelRole) -> Option<&ServedModel> {
        self.served().into_iter().find(|m| m.role == role)
    }

    /// Models by agent, for diagnostics: `perception`, `reasoning`, `action` (the first tool
    /// with a model, for readers of the original layout) and `action.{tool}` for every tool
    /// with a model.
    pub fn models(&self) -> BTreeMap<String, ModelInfo> {
        let mut models = BTreeMap::new();
        models.insert("perception".to_string(), self.perception.info.clone());
        if let Some(info) = self.reasoning.info() {
            models.insert("reasoning".to_string(), info.clone());
        }
        for (tool, info) in self.action.models() {
            models
                .entry("action".to_string())
                .or_insert_with(|| info.clone());
            models.insert(format!("action.{tool}"), info);
        }
        models
    }

    /// Runs every model at its full batch size (on a GPU at every batch size, see
    /// [`warm_up_sizes`]) so the first jobs are not slow and a broken bundle fails at start,
    /// not on the first job.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        for model in self.served() {
            model
                .warm_up(self.warm_every_size)
                .await
                .with_context(|| format!("warming up {}", model.role))?;
        }
        self.reasoning
            .warm_up()
            .await
            .context("warming up the reasoning models")
    }
}
