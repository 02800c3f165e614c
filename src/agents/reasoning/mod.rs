//! Reasoning agent: says what is wrong in each region the saliency map points at: where it is
//! (mask and box), which category of the bundle's taxonomy it belongs to, how it should look,
//! and which tool repairs it.
//!
//! The bundle's `reasoning.mode` picks how: `regions` ([`classifier`]: connected regions of the
//! map, each classified by a small model, described from the bundle's templates).

pub mod classifier;
pub mod components;

use image::{GrayImage, RgbImage};
use serde::Serialize;

use super::action::ToolName;
use super::{LoadContext, ModelInfo, ServedModel};
use crate::bundle::ReasoningMode;
use crate::error::JobError;
use crate::imaging::Map;

/// One distorted region, as the action agent and the diagnostics see it.
#[derive(Debug, Clone, Serialize)]
pub struct Region {
    pub id: usize,
    pub category: String,
    /// `[x, y, w, h]` of the (dilated) mask.
    pub bbox: [u32; 4],
    /// Confidence in `category` (the classifier's probability).
    pub score: f32,
    /// What is wrong and how it should look: the correction instruction tools are
    /// conditioned on.
    pub description: String,
    pub tool: ToolName,
    /// Full-image mask, 255 inside: exactly the pixels the action may change.
    #[serde(skip)]
    pub mask: GrayImage,
}

pub struct Reasoning {
    mode: Mode,
}

enum Mode {
    Regions(classifier::RegionClassifier),
}

impl Reasoning {
    pub fn load(ctx: &LoadContext) -> anyhow::Result<Reasoning> {
        let mode = match ctx.bundle.manifest.reasoning.mode {
            ReasoningMode::Regions => Mode::Regions(classifier::RegionClassifier::load(ctx)?),
            ReasoningMode::Vlm => anyhow::bail!(
                "reasoning mode \"vlm\" is not supported by this build (supported: \"regions\")"
            ),
        };
        Ok(Reasoning { mode })
    }

    /// Finds and explains the regions whose saliency exceeds `threshold`.
    pub async fn regions(
        &self,
        image: &RgbImage,
        saliency: &Map,
        threshold: f32,
    ) -> Result<Vec<Region>, JobError> {
        match &self.mode {
            Mode::Regions(classifier) => classifier.regions(image, saliency, threshold).await,
        }
    }

    /// The batched models reasoning runs.
    pub fn served(&self) -> Vec<&ServedModel> {
        match &self.mode {
            Mode::Regions(classifier) => vec![classifier.served()],
        }
    }

    /// The reasoning model, for diagnostics.
    pub fn info(&self) -> Option<&ModelInfo> {
        match &self.mode {
            Mode::Regions(classifier) => Some(&classifier.info),
        }
    }
}
