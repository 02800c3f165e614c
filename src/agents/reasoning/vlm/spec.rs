//! `[reasoning.vlm]` of a bundle (models/README.md, "VLM reasoning"): the three graphs and the
//! tokenizer, pre-processing, special tokens, decoding limits, the answer's coordinate space,
//! the fallback and the conversation template. Checked once at load, each refusal naming its
//! key; what can only be checked with the tokenizer (token strings) is checked by the agent.

use serde::{Deserialize, Serialize};

use super::template::Template;

/// The table as the bundle writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct VlmSpec {
    pub vision_encoder: String,
    pub embed_tokens: String,
    pub decoder: String,
    pub tokenizer: String,
    /// Smart-resize bounds on the resized image's area.
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: u32,
    pub merge_size: u32,
    pub temporal_patch_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub image_token: String,
    pub vision_start_token: String,
    /// The id fed at padded input positions. The worker pads only the cache (left, masked), so
    /// it feeds none; the key is read and checked for bundles that other runtimes share.
    pub pad_token: String,
    pub stop_tokens: Vec<String>,
    /// Generated tokens at most, the stop token included.
    pub max_new_tokens: usize,
    #[serde(default)]
    pub bbox_coordinates: Coordinates,
    #[serde(default)]
    pub allow_tool: bool,
    /// Default: `regions` when the bundle has a classifier, else `saliency`.
    #[serde(default)]
    pub fallback: Option<FallbackKind>,
    pub template: String,
}

/// The space of `bbox_2d` in the answer (and of `{{regions}}` in the prompt).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coordinates {
    /// Input-image pixels.
    #[default]
    Input,
    /// Pixels of the smart-resized image (Qwen2.5-VL's grounding).
    Resized,
    /// 0..1000 on both axes (Qwen2-VL's).
    Norm1000,
}

impl Coordinates {
    /// Width and height of the space for an input of `input` and a resized image of `resized`.
    pub fn size(self, input: (u32, u32), resized: (u32, u32)) -> (u32, u32) {
        match self {
            Coordinates::Input => input,
            Coordinates::Resized => resized,
            Coordinates::Norm1000 => (1000, 1000),
        }
    }
}

/// What a malformed answer falls back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FallbackKind {
    /// Reasoning's `regions` mode (the bundle's classifier).
    Regions,
    /// Connected saliency regions, repaired with the default tool.
    Saliency,
}

impl FallbackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackKind::Regions => "regions",
            FallbackKind::Saliency => "saliency",
        }
    }
}

impl VlmSpec {
    /// Checks every value that needs no model; `has_classifier`: the bundle has a regions-mode
    /// classifier (a `regions` fallback needs one).
    pub fn check(&self, has_classifier: bool) -> anyhow::Result<()> {
        let key = |k: &str| format!("reasoning.vlm.{k}");
        for (name, value) in [
            ("patch_size", self.patch_size),
            ("merge_size", self.merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
        ] {
            anyhow::ensure!(value >= 1, "{} must be at least 1", key(name));
        }
        anyhow::ensure!(
            self.min_pixels >= 1,
            "{} must be at least 1",
            key("min_pixels")
        );
        let factor = u64::from(self.patch_size) * u64::from(self.merge_size);
        anyhow::ensure!(
            self.max_pixels >= self.min_pixels.max(factor * factor),
            "{} ({}) must be at least {} and at least one {factor}x{factor} merged patch",
            key("max_pixels"),
            self.max_pixels,
            key("min_pixels")
        );
        anyhow::ensure!(
            self.std.iter().all(|s| s.is_finite() && *s != 0.0)
                && self.mean.iter().all(|m| m.is_finite()),
            "{} must be finite and {} finite and non-zero",
            key("mean"),
            key("std")
        );
        anyhow::ensure!(
            !self.stop_tokens.is_empty(),
            "{} must name at least one token",
            key("stop_tokens")
        );
        anyhow::ensure!(
            self.max_new_tokens >= 1,
            "{} must be at least 1",
            key("max_new_tokens")
        );
        if self.fallback == Some(FallbackKind::Regions) && !has_classifier {
            anyhow::bail!(
                "{} = \"regions\" needs reasoning.classifier (or use \"saliency\")",
                key("fallback")
            );
        }
        Template::parse(&self.template, &self.image_token)
            .map_err(|e| anyhow::anyhow!("{}: {e}", key("template")))?;
        Ok(())
    }

    /// The fallback in effect.
    pub fn fallback(&self, has_classifier: bool) -> FallbackKind {
        self.fallback.unwrap_or(if has_classifier {
            FallbackKind::Regions
        } else {
            FallbackKind::Saliency
        })
    }
}
