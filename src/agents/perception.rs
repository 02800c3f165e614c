//! Perception agent: image + prompt → distortion saliency map in [0,1], at the image's size.
//!
//! The prompt is tokenized once per job with the bundle's `tokenizer.json` (special tokens as its
//! post-processor adds them, see [`super::text`]) and padded to the bundle's `max_tokens`, and the image is resized to the bundle's input size, so every request
//! has the same shape and requests of different jobs batch together.

use anyhow::Context;
use image::RgbImage;

use super::served::{LoadContext, ModelRole, ServedModel};
use super::text::{EncodingSpec, PromptEncoder};
use super::ModelInfo;
use crate::engine::{cpu_bound, InputSpec, OnnxModel, TensorData};
use crate::error::JobError;
use crate::imaging::{to_chw, Map};

pub use super::text::Tokens;

pub struct Perception {
    model: ServedModel,
    encoder: PromptEncoder,
    size: u32,
    mean: [f32; 3],
    std: [f32; 3],
    out: (u32, u32),
    pub info: ModelInfo,
}

impl Perception {
    pub fn load(ctx: &LoadContext) -> anyhow::Result<Perception> {
        let spec = &ctx.bundle.manifest.perception;
        let encoder = PromptEncoder::load(
            &ctx.file(&spec.tokenizer)?,
            EncodingSpec {
                max_tokens: spec.max_tokens,
                add_special_tokens: spec.add_special_tokens,
                pad_id: spec.pad_id,
            },
        )?;
        let size = i64::from(spec.input_size);
        let l = spec.max_tokens as i64;
        let model = OnnxModel::new(
            ctx.session(&spec.model)?,
            vec![
                InputSpec {
                    name: "pixel_values".into(),
                    item_shape: vec![3, size, size],
                },
                InputSpec {
                    name: "input_ids".into(),
                    item_shape: vec![l],
                },
                InputSpec {
                    name: "attention_mask".into(),
                    item_shape: vec![l],
                },
            ],
            "saliency",
            &spec.model,
        )?;
        let shape = model.output_item_shape();
        // [1, H, W]; a dynamic size is taken to be the input size.
        let dim = |i: usize| shape.get(i).copied().filter(|d| *d > 0).unwrap_or(size) as u32;
        let out = (dim(2), dim(1));
        let mut perception = Perception {
            model: ctx.serve(
                ModelRole::Perception,
                model,
                Vec::new(),
                (out.0 * out.1) as usize,
            ),
            encoder,
            size: spec.input_size,
            mean: spec.mean,
            std: spec.std,
            out,
            info: ctx.info(&spec.model),
        };
        let tokens = perception.tokenize("warm up").context("tokenizing")?;
        let blank = RgbImage::new(spec.input_size, spec.input_size);
        perception.model.probe = perception.request(&blank, &tokens);
        Ok(perception)
    }

    /// Tokenizes a prompt for the text encoder (special tokens, truncation and padding to
    /// `max_tokens` as the bundle says).
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens, JobError> {
        self.encoder.encode(prompt)
    }

    /// The request tensors for one image (pixels resized to the model's input size).
    pub fn request(&self, image: &RgbImage, tokens: &Tokens) -> Vec<TensorData> {
        vec![
            TensorData::F32(to_chw(image, self.size, self.mean, self.std)),
            TensorData::I64(tokens.ids.clone()),
            TensorData::I64(tokens.attention_mask.clone()),
        ]
    }

    /// The saliency map of an image, resized back to the image's size.
    pub async fn saliency(&self, image: &RgbImage, tokens: &Tokens) -> Result<Map, JobError> {
        let request = cpu_bound(|| self.request(image, tokens));
        // The batcher checked that the map has out.0 x out.1 values.
        let map = Map {
            width: self.out.0,
            height: self.out.1,
            data: self.model.submit(request).await?,
        };
        Ok(cpu_bound(|| map.resize(image.width(), image.height())))
    }

    pub fn served(&self) -> &ServedModel {
        &self.model
    }
}
