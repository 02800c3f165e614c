//! Reasoning agent: says what is wrong in each region the saliency map points at: where it is
//! (mask and box), which category of the bundle's taxonomy it belongs to, how it should look,
//! and which tool repairs it.
//!
//! The bundle's `reasoning.mode` picks how: `regions` ([`classifier`]: connected regions of the
//! map, each classified by a small model, described from the bundle's templates) or `vlm`
//! ([`vlm`]: a vision-language model writes the regions and their correction instructions; when
//! its answer is malformed the iteration falls back to the classifier, or to saliency regions
//! repaired with the default tool).

pub mod classifier;
pub mod components;
pub mod vlm;

use image::{GrayImage, RgbImage};
use serde::Serialize;

use self::components::connected_regions;
use self::vlm::spec::FallbackKind;
use self::vlm::{Vlm, VlmTrace};
use super::action::{JobContext, ToolName};
use super::{LoadContext, ModelInfo, ServedModel};
use crate::bundle::{Bundle, ReasoningMode};
use crate::engine::cpu_bound;
use crate::error::JobError;
use crate::imaging::{dilate, inside_bbox, Map};

/// The category of regions found by saliency alone (the `saliency` fallback).
pub const UNCLASSIFIED: &str = "unclassified";

/// One distorted region, as the action agent and the diagnostics see it.
#[derive(Debug, Clone, Serialize)]
pub struct Region {
    pub id: usize,
    pub category: String,
    /// `[x, y, w, h]`: the box of the (dilated) mask, or the box the VLM gave; the mask lies
    /// inside it.
    pub bbox: [u32; 4],
    /// Confidence: the classifier's probability of `category`, or the highest saliency inside
    /// the mask (VLM and saliency regions).
    pub score: f32,
    /// What is wrong and how it should look: the correction instruction tools are
    /// conditioned on.
    pub description: String,
    pub tool: ToolName,
    /// Full-image mask, 255 inside: exactly the pixels the action may change.
    #[serde(skip)]
    pub mask: GrayImage,
}

/// What reasoning found in one iteration.
#[derive(Debug, Clone, Default)]
pub struct Reasoned {
    pub regions: Vec<Region>,
    /// What the VLM did (`vlm` mode).
    pub vlm: Option<VlmTrace>,
}

pub struct Reasoning {
    mode: Mode,
}

enum Mode {
    Regions(Box<classifier::RegionClassifier>),
    Vlm { vlm: Box<Vlm>, fallback: Fallback },
}

/// What a malformed VLM answer falls back to.
enum Fallback {
    Regions(Box<classifier::RegionClassifier>),
    Saliency(std::sync::Arc<Bundle>),
}

impl Reasoning {
    pub fn load(ctx: &LoadContext) -> anyhow::Result<Reasoning> {
        let spec = &ctx.bundle.manifest.reasoning;
        let mode = match (spec.mode, &spec.vlm) {
            (ReasoningMode::Regions, _) => {
                Mode::Regions(Box::new(classifier::RegionClassifier::load(ctx)?))
            }
            (ReasoningMode::Vlm, None) => {
                anyhow::bail!("reasoning.mode = \"vlm\" needs a [reasoning.vlm] table")
            }
            (ReasoningMode::Vlm, Some(vlm_spec)) => {
                let fallback = match vlm_spec.fallback(spec.classifier.is_some()) {
                    FallbackKind::Regions => {
                        Fallback::Regions(Box::new(classifier::RegionClassifier::load(ctx)?))
                    }
                    FallbackKind::Saliency => Fallback::Saliency(ctx.bundle.clone()),
                };
                Mode::Vlm {
                    vlm: Box::new(Vlm::load(ctx, vlm_spec)?),
                    fallback,
                }
            }
        };
        Ok(Reasoning { mode })
    }

    /// Finds and explains the regions whose saliency exceeds `threshold`.
    pub async fn regions(
        &self,
        image: &RgbImage,
        saliency: &Map,
        threshold: f32,
        job: JobContext<'_>,
    ) -> Result<Reasoned, JobError> {
        match &self.mode {
            Mode::Regions(classifier) => Ok(Reasoned {
                regions: classifier.regions(image, saliency, threshold).await?,
                vlm: None,
            }),
            Mode::Vlm { vlm, fallback } => {
                let explained = vlm.explain(image, saliency, threshold, job).await?;
                let mut trace = explained.trace;
                let regions = match explained.regions {
                    Some(regions) => regions,
                    None => {
                        let (kind, regions) = match fallback {
                            Fallback::Regions(classifier) => (
                                FallbackKind::Regions,
                                classifier.regions(image, saliency, threshold).await?,
                            ),
                            Fallback::Saliency(bundle) => (
                                FallbackKind::Saliency,
                                cpu_bound(|| saliency_regions(bundle, saliency, threshold)),
                            ),
                        };
                        trace.fallback = Some(kind);
                        regions
                    }
                };
                crate::metrics::metrics()
                    .vlm_answers_total
                    .with_label_values(&[trace_outcome(&trace)])
                    .inc();
                Ok(Reasoned {
                    regions,
                    vlm: Some(trace),
                })
            }
        }
    }

    /// The batched models reasoning runs (the VLM's vision encoder and decoder have batchers
    /// of their own, warmed up by [`Reasoning::warm_up`]).
    pub fn served(&self) -> Vec<&ServedModel> {
        match &self.mode {
            Mode::Regions(classifier) => vec![classifier.served()],
            Mode::Vlm { fallback, .. } => match fallback {
                Fallback::Regions(classifier) => vec![classifier.served()],
                Fallback::Saliency(_) => Vec::new(),
            },
        }
    }

    /// Runs the models that are not in [`Reasoning::served`] once.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        match &self.mode {
            Mode::Regions(_) => Ok(()),
            Mode::Vlm { vlm, .. } => vlm.warm_up().await,
        }
    }

    /// The VLM, in `vlm` mode.
    pub fn vlm(&self) -> Option<&Vlm> {
        match &self.mode {
            Mode::Vlm { vlm, .. } => Some(vlm),
            Mode::Regions(_) => None,
        }
    }

    /// The reasoning model, for diagnostics.
    pub fn info(&self) -> Option<&ModelInfo> {
        match &self.mode {
            Mode::Regions(classifier) => Some(&classifier.info),
            Mode::Vlm { vlm, .. } => Some(&vlm.info),
        }
    }
}

/// The outcome label of a VLM answer in `retoucher_vlm_answers_total`.
fn trace_outcome(trace: &VlmTrace) -> &'static str {
    match (&trace.unsupported, &trace.answer) {
        (Some(_), _) => "unsupported_image",
        (None, Some(answer)) => answer.error.map_or("answered", |e| e.as_str()),
        (None, None) => "answered",
    }
}

/// The `saliency` fallback: the connected regions of the map (dilated), of no category,
/// repaired with the default tool.
fn saliency_regions(bundle: &Bundle, saliency: &Map, threshold: f32) -> Vec<Region> {
    let spec = &bundle.manifest.reasoning;
    connected_regions(
        saliency,
        threshold,
        spec.min_region_pixels,
        spec.max_regions,
    )
    .into_iter()
    .enumerate()
    .map(|(id, c)| {
        let mask = dilate(&c.mask, spec.dilate_pixels);
        Region {
            id,
            bbox: inside_bbox(&mask).unwrap_or(c.bbox),
            score: c.peak,
            description: bundle.describe(UNCLASSIFIED, c.peak, c.pixels),
            tool: bundle.manifest.action.default_tool,
            category: UNCLASSIFIED.to_string(),
            mask,
        }
    })
    .collect()
}
