//! `diagnostics.json` (design §4.4): everything a person or a program needs to know about how
//! a job was retouched. Written last, it is also the result set's commit marker.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agents::reasoning::vlm::VlmTrace;
use crate::agents::reasoning::Region;
use crate::agents::ModelInfo;
use crate::pipeline::{Iteration, StageTimings};

/// How a job that succeeded turned out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// At least one region was repaired.
    Retouched,
    /// Nothing was distorted (or nothing was edited): the input came back unchanged.
    Clean,
}

impl JobStatus {
    /// The name in `diagnostics.json`, events and the `retoucher_jobs_total` outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Retouched => "retouched",
            JobStatus::Clean => "clean",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        [JobStatus::Retouched, JobStatus::Clean]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Diagnostics {
    pub job_id: String,
    pub status: JobStatus,
    pub attempt: u32,
    pub input: InputInfo,
    pub output: OutputInfo,
    pub settings: LoopInfo,
    pub iterations: Vec<IterationInfo>,
    pub models: BTreeMap<String, ModelInfoOut>,
    pub timings_ms: JobTimings,
    pub worker: WorkerInfo,
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputInfo {
    pub uri: String,
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputInfo {
    /// The retouched image.
    pub uri: String,
}

/// The loop settings this job ran with (bundle defaults with the job's overrides applied).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopInfo {
    pub max_iterations: u32,
    pub saliency_threshold: f32,
    /// The job's `options.diffusion_steps`, when it set one (a diffusion tool clamps it to its
    /// bundle's `max_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusion_steps: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IterationInfo {
    pub index: usize,
    pub saliency: SaliencyInfo,
    pub regions: Vec<RegionInfo>,
    /// What the VLM did (reasoning's `vlm` mode, when reasoning ran): the proposals it was
    /// shown, the generated text, token counts, decode timings, the validated answer with its
    /// dropped items and reasons, and the fallback that ran when the answer was malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlm: Option<VlmTrace>,
    pub timings_ms: StageTimings,
}

impl From<&Iteration> for IterationInfo {
    fn from(it: &Iteration) -> Self {
        IterationInfo {
            index: it.index,
            saliency: SaliencyInfo {
                max: it.saliency.max,
                mean: it.saliency.mean,
                area_above_threshold: it.saliency.area_above_threshold,
                map: layout::saliency(it.index),
            },
            regions: it
                .regions
                .iter()
                .map(|r| RegionInfo::of(it.index, r))
                .collect(),
            vlm: it.vlm.clone(),
            timings_ms: it.timings_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SaliencyInfo {
    pub max: f32,
    pub mean: f32,
    pub area_above_threshold: f32,
    /// File name of the 8-bit map, next to this file.
    pub map: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegionInfo {
    pub id: usize,
    pub category: String,
    pub bbox: [u32; 4],
    pub score: f32,
    pub description: String,
    pub tool: String,
    /// File name of the region's mask, next to this file.
    pub mask: String,
}

impl RegionInfo {
    /// The record of region `region`, repaired in iteration `iteration`.
    pub fn of(iteration: usize, region: &Region) -> RegionInfo {
        RegionInfo {
            id: region.id,
            category: region.category.clone(),
            bbox: region.bbox,
            score: region.score,
            description: region.description.clone(),
            tool: region.tool.as_str().to_string(),
            mask: layout::mask(iteration, region.id),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JobTimings {
    pub queue: f64,
    pub fetch: f64,
    pub decode: f64,
    pub perception: f64,
    pub reasoning: f64,
    pub action: f64,
    pub encode: f64,
    pub store: f64,
    pub total: f64,
}

impl JobTimings {
    /// The per-stage times (everything but `queue` and `total`), named as in the metrics.
    pub fn stages(&self) -> [(&'static str, f64); 7] {
        [
            ("fetch", self.fetch),
            ("decode", self.decode),
            ("perception", self.perception),
            ("reasoning", self.reasoning),
            ("action", self.action),
            ("encode", self.encode),
            ("store", self.store),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfoOut {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

impl From<&ModelInfo> for ModelInfoOut {
    fn from(m: &ModelInfo) -> Self {
        ModelInfoOut {
            name: m.name.clone(),
            version: m.version.clone(),
            sha256: m.sha256.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerInfo {
    pub version: String,
    pub host: String,
}

impl WorkerInfo {
    pub fn current() -> WorkerInfo {
        WorkerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
        }
    }
}

/// File names of the result layout, relative to `{output}{job_id}/`.
pub mod layout {
    pub const RETOUCHED: &str = "retouched.png";
    pub const DIAGNOSTICS: &str = "diagnostics.json";

    pub fn saliency(iteration: usize) -> String {
        format!("saliency-{iteration}.png")
    }

    pub fn mask(iteration: usize, region: usize) -> String {
        format!("mask-{iteration}-{region}.png")
    }
}
