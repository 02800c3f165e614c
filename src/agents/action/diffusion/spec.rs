//! `[action.tools.diffusion-inpaint]`: the tool's bundle table. Every key is required (so a
//! bundle says what it means), unknown keys are refused, and every refusal names its key.

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;

use super::scheduler::SchedulerKind;

/// How the latent mask is taken from the S x S hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentMask {
    /// A latent cell is hole when any of its 8x8 pixels is.
    Any,
    /// By the cell's top-left pixel (diffusers' `interpolate(mode="nearest")`).
    Nearest,
}

/// The tool's settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionSpec {
    /// Folder of the export (`text_encoder/`, `unet/`, `vae_encoder/`, `vae_decoder/`,
    /// `scheduler/scheduler_config.json`), relative to the bundle.
    pub export: String,
    /// The text encoder's `tokenizer.json`, relative to the bundle.
    pub tokenizer: String,
    /// L: ids are truncated (special tokens kept) and padded to exactly L.
    pub max_tokens: usize,
    pub add_special_tokens: bool,
    pub pad_id: u32,
    /// The conditioning text: `{instruction}`, `{prompt}`, `{category}` replaced.
    pub text_template: String,
    /// The unconditional text of classifier-free guidance.
    pub negative_prompt: String,
    pub scheduler: SchedulerKind,
    /// Denoising steps unless the job asks for others.
    pub steps: u32,
    /// The most steps a job may get (its `options.diffusion_steps` is clamped to this).
    pub max_steps: u32,
    /// g; `g <= 1` runs the conditional branch alone.
    pub guidance_scale: f32,
    /// S: the crop is processed at S x S (a multiple of 8); latents are S/8 x S/8.
    pub native_size: u32,
    /// Crop = region bbox plus context x its width/height on each side.
    pub context: f32,
    /// The VAE's scaling factor.
    pub latent_scale: f32,
    pub latent_mask: LatentMask,
}

/// Every key of the table, in the order of models/README.md.
const KEYS: &[&str] = &[
    "export",
    "tokenizer",
    "max_tokens",
    "add_special_tokens",
    "pad_id",
    "text_template",
    "negative_prompt",
    "scheduler",
    "steps",
    "max_steps",
    "guidance_scale",
    "native_size",
    "context",
    "latent_scale",
    "latent_mask",
];

impl DiffusionSpec {
    /// Reads and checks the table; errors name the key.
    pub fn parse(table: &toml::Value) -> anyhow::Result<DiffusionSpec> {
        Self::parse_table(table).context("[action.tools.diffusion-inpaint]")
    }

    fn parse_table(table: &toml::Value) -> anyhow::Result<DiffusionSpec> {
        let Some(table) = table.as_table() else {
            bail!("must be a table");
        };
        if let Some(unknown) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
            bail!("unknown key {unknown:?} (keys: {})", KEYS.join(", "));
        }
        fn get<T: DeserializeOwned>(table: &toml::Table, key: &str) -> anyhow::Result<T> {
            let value = table
                .get(key)
                .with_context(|| format!("{key} is missing (every key is required)"))?;
            value
                .clone()
                .try_into()
                .map_err(|e| anyhow::anyhow!("{key}: {e}"))
        }
        let scheduler: String = get(table, "scheduler")?;
        let latent_mask: String = get(table, "latent_mask")?;
        let spec = DiffusionSpec {
            export: get(table, "export")?,
            tokenizer: get(table, "tokenizer")?,
            max_tokens: get(table, "max_tokens")?,
            add_special_tokens: get(table, "add_special_tokens")?,
            pad_id: get(table, "pad_id")?,
            text_template: get(table, "text_template")?,
            negative_prompt: get(table, "negative_prompt")?,
            scheduler: SchedulerKind::parse(&scheduler).context("scheduler")?,
            steps: get(table, "steps")?,
            max_steps: get(table, "max_steps")?,
            guidance_scale: get(table, "guidance_scale")?,
            native_size: get(table, "native_size")?,
            context: get(table, "context")?,
            latent_scale: get(table, "latent_scale")?,
            latent_mask: match latent_mask.as_str() {
                "any" => LatentMask::Any,
                "nearest" => LatentMask::Nearest,
                other => bail!("latent_mask {other:?} is not \"any\" or \"nearest\""),
            },
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.export.trim().is_empty() {
            bail!("export must name the export's folder");
        }
        if self.max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        if self.max_steps == 0 {
            bail!("max_steps must be at least 1");
        }
        if !(1..=self.max_steps).contains(&self.steps) {
            bail!(
                "steps must be in 1..=max_steps ({}), got {}",
                self.max_steps,
                self.steps
            );
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            bail!(
                "guidance_scale must be a number >= 0, got {}",
                self.guidance_scale
            );
        }
        if self.native_size == 0 || self.native_size % 8 != 0 {
            bail!(
                "native_size must be a positive multiple of 8, got {}",
                self.native_size
            );
        }
        if !self.context.is_finite() || self.context < 0.0 {
            bail!("context must be a number >= 0, got {}", self.context);
        }
        if !self.latent_scale.is_finite() || self.latent_scale <= 0.0 {
            bail!(
                "latent_scale must be a number > 0, got {}",
                self.latent_scale
            );
        }
        Ok(())
    }

    /// Classifier-free guidance: the unconditional and conditional branches run together.
    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The steps of a repair: the job's override clamped to `1..=max_steps`, else `steps`.
    pub fn steps_for(&self, requested: Option<u32>) -> u32 {
        requested.map_or(self.steps, |n| n.clamp(1, self.max_steps))
    }

    /// The conditioning text: the template with its placeholders replaced (plain replacement,
    /// in this order, as the reference does).
    pub fn conditioning_text(&self, instruction: &str, prompt: &str, category: &str) -> String {
        self.text_template
            .replace("{instruction}", instruction)
            .replace("{prompt}", prompt)
            .replace("{category}", category)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"
        export = "sd-inpaint"
        tokenizer = "sd-inpaint/tokenizer/tokenizer.json"
        max_tokens = 77
        add_special_tokens = true
        pad_id = 49407
        text_template = "{instruction}, {prompt}"
        negative_prompt = ""
        scheduler = "ddim"
        steps = 20
        max_steps = 50
        guidance_scale = 7.5
        native_size = 128
        context = 1.0
        latent_scale = 0.18215
        latent_mask = "any"
    "#;

    fn with(key: &str, value: Option<&str>) -> anyhow::Result<DiffusionSpec> {
        let mut table: toml::Table = toml::from_str(TABLE).unwrap();
        match value {
            Some(v) => {
                let parsed: toml::Table = toml::from_str(&format!("v = {v}")).unwrap();
                table.insert(key.to_string(), parsed["v"].clone());
            }
            None => {
                table.remove(key);
            }
        }
        DiffusionSpec::parse(&toml::Value::Table(table))
    }

    fn refusal(key: &str, value: Option<&str>) -> String {
        format!("{:#}", with(key, value).unwrap_err())
    }

    #[test]
    fn the_reference_table_parses() {
        let spec = with("steps", Some("20")).unwrap();
        assert_eq!(spec.scheduler, SchedulerKind::Ddim);
        assert_eq!(spec.latent_mask, LatentMask::Any);
        assert!(spec.guided());
        assert_eq!(spec.steps_for(None), 20);
        assert_eq!(spec.steps_for(Some(7)), 7);
        assert_eq!(spec.steps_for(Some(80)), 50, "clamped to max_steps");
        assert_eq!(spec.steps_for(Some(0)), 1);
        assert_eq!(
            spec.conditioning_text("five fingers", "a violinist", "hand"),
            "five fingers, a violinist"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (key, value, needle) in [
            ("steps", Some("0"), "steps must be in 1..=max_steps"),
            ("steps", Some("51"), "steps must be in 1..=max_steps"),
            ("max_steps", Some("0"), "max_steps"),
            ("native_size", Some("100"), "native_size"),
            ("scheduler", Some("\"pndm\""), "scheduler"),
            ("latent_mask", Some("\"bilinear\""), "latent_mask"),
            ("guidance_scale", Some("-1.0"), "guidance_scale"),
            ("latent_scale", Some("0.0"), "latent_scale"),
            ("max_tokens", Some("0"), "max_tokens"),
            ("pad_id", Some("-1"), "pad_id"),
            ("pad_id", Some("\"eos\""), "pad_id"),
            ("context", Some("\"wide\""), "context"),
            ("negative_prompt", None, "negative_prompt is missing"),
            ("sampler", Some("1"), "unknown key \"sampler\""),
        ] {
            let err = refusal(key, value);
            assert!(err.contains(needle), "{key} = {value:?}: {err}");
            assert!(err.contains("[action.tools.diffusion-inpaint]"), "{err}");
        }
    }
}
