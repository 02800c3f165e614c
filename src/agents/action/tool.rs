//! The tool library: the [`Tool`] every repair tool implements, the [`REGISTRY`] of the tools
//! this build knows, and [`ToolName`], a name that is known to be in it.
//!
//! A new tool is one file that implements [`Tool`] and exports a [`ToolEntry`], plus one line
//! in [`REGISTRY`]. Its bundle table `[action.tools.<name>]` is handed to its loader as it is,
//! so the manifest's schema needs no change either.

use std::fmt;

use futures_util::future::BoxFuture;
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{diffusion, onnx_inpaint, patchmatch};
use crate::agents::reasoning::Region;
use crate::agents::{LoadContext, ModelInfo, ServedModel};
use crate::error::JobError;

/// Makes a tool from its `[action.tools.<name>]` table (`None` when the bundle has none).
pub type LoadTool = fn(&LoadContext, Option<&toml::Value>) -> anyhow::Result<Box<dyn Tool>>;

/// How a tool is made from the bundle.
pub struct ToolEntry {
    /// The name bundles route categories to (`[action.routing]`, `default_tool`).
    pub name: &'static str,
    pub load: LoadTool,
}

/// Every tool this build knows.
pub const REGISTRY: &[ToolEntry] = &[diffusion::ENTRY, onnx_inpaint::ENTRY, patchmatch::ENTRY];

/// The name of a tool in [`REGISTRY`]: parsing is the only way to make one, so holding a
/// `ToolName` means the tool exists in this build.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ToolName(&'static str);

/// A tool name that is not in [`REGISTRY`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tool {name:?} (known: {})", ToolName::known().join(", "))]
pub struct UnknownTool {
    pub name: String,
}

impl ToolName {
    pub fn parse(name: &str) -> Result<ToolName, UnknownTool> {
        REGISTRY
            .iter()
            .find(|entry| entry.name == name)
            .map(|entry| ToolName(entry.name))
            .ok_or_else(|| UnknownTool {
                name: name.to_string(),
            })
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The names of every tool this build knows.
    pub fn known() -> Vec<&'static str> {
        REGISTRY.iter().map(|entry| entry.name).collect()
    }

    pub(super) fn entry(self) -> &'static ToolEntry {
        REGISTRY
            .iter()
            .find(|entry| entry.name == self.0)
            .expect("a ToolName is always in the registry")
    }
}

impl fmt::Display for ToolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for ToolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for ToolName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for ToolName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ToolName, D::Error> {
        let name = String::deserialize(deserializer)?;
        ToolName::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// The job a repair belongs to: what tools that are seeded or conditioned per job need.
#[derive(Debug, Clone, Copy)]
pub struct JobContext<'a> {
    pub job_id: &'a str,
    /// The job's prompt (what the image is meant to show).
    pub prompt: &'a str,
    /// The loop iteration (0-based) the repair happens in.
    pub iteration: usize,
    /// The job's `options.diffusion_steps` (bounded by the job contract; a diffusion tool
    /// bounds it further to its bundle's `max_steps`).
    pub diffusion_steps: Option<u32>,
}

/// One region to repair, cut out of the image.
pub struct RepairInput<'a> {
    /// The crop around the region: its bbox grown by the tool's [`Tool::context`].
    pub crop: RgbImage,
    /// The crop's hole: every region's mask over the crop, 255 = to be filled. Tools must not
    /// copy from any of it (it is distorted), only from outside.
    pub hole: GrayImage,
    /// `[x, y, w, h]` of the crop in the image.
    pub rect: [u32; 4],
    pub region: &'a Region,
    pub job: JobContext<'a>,
}

/// A repair tool. The action agent cuts the crop, hands it over, and composites the returned
/// crop back only inside the region's feathered mask, so a tool may change any pixel of the
/// crop it returns; it must return it at the crop's size.
pub trait Tool: Send + Sync {
    /// How far the crop reaches around the region: its bbox grown by this × its width and
    /// height on each side.
    fn context(&self) -> f32;

    /// Repairs the crop's hole.
    fn repair<'a>(&'a self, input: RepairInput<'a>) -> BoxFuture<'a, Result<RgbImage, JobError>>;

    /// The batched models the tool runs (warm-up, benchmarks).
    fn served(&self) -> Vec<&ServedModel> {
        Vec::new()
    }

    /// The model the tool runs, for diagnostics.
    fn info(&self) -> Option<&ModelInfo> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_only_when_registered() {
        assert_eq!(
            ToolName::parse("patchmatch").unwrap().as_str(),
            "patchmatch"
        );
        let err = ToolName::parse("photoshop").unwrap_err().to_string();
        assert!(err.contains("\"photoshop\""), "{err}");
        assert!(
            err.contains("diffusion-inpaint, onnx-inpaint, patchmatch"),
            "{err}"
        );
    }

    #[test]
    fn names_deserialize_through_the_registry() {
        let name: ToolName = serde_json::from_str("\"onnx-inpaint\"").unwrap();
        assert_eq!(name.to_string(), "onnx-inpaint");
        let err = serde_json::from_str::<ToolName>("\"nope\"").unwrap_err();
        assert!(err.to_string().contains("known: "), "{err}");
    }
}
