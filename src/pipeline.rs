//! The loop of the paper: I(t+1) = act(I(t), reason(I(t), perceive(I(t), prompt))), repeated
//! while the saliency still exceeds τ and the iteration budget lasts.
//!
//! It knows nothing of RabbitMQ, S3 or files: the worker and `run` both drive it with a decoded
//! image and get back the retouched image and everything the diagnostics report.

use std::time::Instant;

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::agents::action::JobContext;
use crate::agents::reasoning::vlm::VlmTrace;
use crate::agents::reasoning::{Reasoned, Region};
use crate::agents::Agents;
use crate::error::JobError;
use crate::imaging::Map;

/// What the loop is asked to do for one job.
#[derive(Debug, Clone, Copy)]
pub struct LoopSettings {
    /// Edits allowed (0 = perceive only).
    pub max_iterations: u32,
    /// τ: pixels above it are distorted; the loop stops once none are.
    pub saliency_threshold: f32,
    /// The job's override of the denoising steps of diffusion repairs.
    pub diffusion_steps: Option<u32>,
}

/// Saliency statistics of one perception pass.
#[derive(Debug, Clone, Serialize)]
pub struct SaliencyStats {
    pub max: f32,
    pub mean: f32,
    /// Fraction of pixels above the threshold.
    pub area_above_threshold: f32,
}

/// One pass of the loop: what perception saw and what was repaired.
#[derive(Debug, Clone)]
pub struct Iteration {
    pub index: usize,
    pub saliency: SaliencyStats,
    pub saliency_map: Map,
    pub regions: Vec<Region>,
    /// What the VLM did, in reasoning's `vlm` mode.
    pub vlm: Option<VlmTrace>,
    pub timings_ms: StageTimings,
}

/// Milliseconds spent in each agent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct StageTimings {
    pub perception: f64,
    pub reasoning: f64,
    pub action: f64,
}

impl StageTimings {
    fn add(&mut self, other: &StageTimings) {
        self.perception += other.perception;
        self.reasoning += other.reasoning;
        self.action += other.action;
    }
}

/// The loop's result.
#[derive(Debug, Clone)]
pub struct Retouched {
    pub image: RgbImage,
    /// Every perception pass; the last one shows what is left.
    pub iterations: Vec<Iteration>,
    pub timings_ms: StageTimings,
}

impl Retouched {
    /// Whether any region was repaired.
    pub fn edited(&self) -> bool {
        self.iterations.iter().any(|i| !i.regions.is_empty())
    }

    pub fn region_count(&self) -> usize {
        self.iterations.iter().map(|i| i.regions.len()).sum()
    }

    /// Masks of every repaired region, by (iteration, region).
    pub fn masks(&self) -> impl Iterator<Item = (usize, usize, &GrayImage)> {
        self.iterations
            .iter()
            .flat_map(|i| i.regions.iter().map(move |r| (i.index, r.id, &r.mask)))
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Runs the perception → reasoning → action loop on one image of job `job_id`.
pub async fn retouch(
    agents: &Agents,
    image: RgbImage,
    job_id: &str,
    prompt: &str,
    settings: LoopSettings,
) -> Result<Retouched, JobError> {
    let tokens = agents.perception.tokenize(prompt)?;
    let threshold = settings.saliency_threshold;
    let mut image = image;
    let mut iterations = Vec::new();
    let mut total = StageTimings::default();
    for index in 0..=settings.max_iterations as usize {
        let mut timings = StageTimings::default();
        let started = Instant::now();
        let map = agents.perception.saliency(&image, &tokens).await?;
        timings.perception = ms(started);
        let stats = SaliencyStats {
            max: map.max(),
            mean: map.mean(),
            area_above_threshold: map.area_above(threshold),
        };
        // Stop when nothing is distorted any more, or when the edit budget is spent: the last
        // perception pass is kept so the diagnostics show what is left.
        let budget_left = index < settings.max_iterations as usize;
        let job = JobContext {
            job_id,
            prompt,
            iteration: index,
            diffusion_steps: settings.diffusion_steps,
        };
        let Reasoned { regions, vlm } = if stats.max > threshold && budget_left {
            let started = Instant::now();
            let reasoned = agents
                .reasoning
                .regions(&image, &map, threshold, job)
                .await?;
            timings.reasoning = ms(started);
            reasoned
        } else {
            Reasoned::default()
        };
        if !regions.is_empty() {
            let started = Instant::now();
            image = agents.action.apply(&image, &regions, job).await?;
            timings.action = ms(started);
        }
        total.add(&timings);
        let done = regions.is_empty();
        tracing::debug!(
            iteration = index,
            saliency_max = stats.max,
            regions = regions.len(),
            "loop iteration"
        );
        iterations.push(Iteration {
            index,
            saliency: stats,
            saliency_map: map,
            regions,
            vlm,
            timings_ms: timings,
        });
        if done {
            break;
        }
    }
    Ok(Retouched {
        image,
        iterations,
        timings_ms: total,
    })
}
