//! Perception agent: image + prompt → distortion saliency map in [0,1], at the image's size.
//!
//! The prompt is tokenized once per job with the bundle's `tokenizer.json` and padded to the
//! bundle's `max_tokens`, and the image is resized to the bundle's input size, so every request
//! has the same shape and requests of different jobs batch together.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use image::RgbImage;

use super::{batch_settings, ModelInfo};
use crate::bundle::Bundle;
use crate::config::BatchingOverride;
use crate::engine::batcher::{BatchObserver, Batcher};
use crate::engine::{cpu_bound, load_session, EngineOptions, InputSpec, OnnxModel, TensorData};
use crate::error::{ErrorClass, JobError};
use crate::imaging::{to_chw, Map};

/// The prompt as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
}

pub struct Perception {
    batcher: Batcher<OnnxModel>,
    tokenizer: tokenizers::Tokenizer,
    size: u32,
    max_tokens: usize,
    mean: [f32; 3],
    std: [f32; 3],
    out: (u32, u32),
    pub info: ModelInfo,
    pub max_batch_size: usize,
}

impl Perception {
    pub fn load(
        bundle: &Bundle,
        engine: &EngineOptions,
        batching: &BTreeMap<String, BatchingOverride>,
        observer: Arc<dyn BatchObserver>,
    ) -> anyhow::Result<Perception> {
        let spec = &bundle.manifest.perception;
        let tokenizer_path = bundle.path(&spec.tokenizer);
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", tokenizer_path.display()))?;
        let session = load_session(&bundle.path(&spec.model), engine)?;
        let size = i64::from(spec.input_size);
        let l = spec.max_tokens as i64;
        let model = OnnxModel::new(
            session,
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
        let mut settings = batch_settings("perception", bundle, batching);
        if !model.dynamic_batch {
            settings.max_batch_size = 1;
        }
        Ok(Perception {
            batcher: Batcher::spawn("perception", model, settings, observer),
            tokenizer,
            size: spec.input_size,
            max_tokens: spec.max_tokens,
            mean: spec.mean,
            std: spec.std,
            out,
            info: ModelInfo::of(bundle, &spec.model),
            max_batch_size: settings.max_batch_size,
        })
    }

    /// Tokenizes a prompt, truncated and padded (id 0) to `max_tokens`.
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens, JobError> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(|e| {
            JobError::new(
                ErrorClass::InvalidMessage,
                format!("prompt cannot be tokenized: {e}"),
            )
        })?;
        let mut ids: Vec<i64> = encoding
            .get_ids()
            .iter()
            .take(self.max_tokens)
            .map(|&id| i64::from(id))
            .collect();
        let mut attention_mask = vec![1; ids.len()];
        ids.resize(self.max_tokens, 0);
        attention_mask.resize(self.max_tokens, 0);
        Ok(Tokens {
            ids,
            attention_mask,
        })
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
        let data = self
            .batcher
            .submit(request)
            .await
            .map_err(|e| JobError::new(ErrorClass::ModelError, e.to_string()))?;
        let map = Map {
            width: self.out.0,
            height: self.out.1,
            data,
        };
        if map.data.len() != (map.width * map.height) as usize {
            return Err(JobError::new(
                ErrorClass::ModelError,
                format!(
                    "perception returned {} values for a {}x{} map",
                    map.data.len(),
                    map.width,
                    map.height
                ),
            ));
        }
        Ok(cpu_bound(|| map.resize(image.width(), image.height())))
    }

    pub fn batcher(&self) -> &Batcher<OnnxModel> {
        &self.batcher
    }

    pub async fn warm_up(&self, every_size: bool) -> anyhow::Result<()> {
        let image = RgbImage::new(self.size, self.size);
        let tokens = self.tokenize("warm up").context("tokenizing")?;
        let request = self.request(&image, &tokens);
        let sizes = super::warm_up_sizes(self.max_batch_size, every_size);
        let expected = (self.out.0 * self.out.1) as usize;
        super::warm_batcher(&self.batcher, &request, &sizes, expected).await
    }
}
