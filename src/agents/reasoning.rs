//! Reasoning agent, `regions` mode: saliency → connected regions → region classifier → one
//! category of the bundle's taxonomy per region, with bbox, mask and a description.
//!
//! The classifier sees the region's crop (bbox plus the bundle's context margin) resized to its
//! input size, with the region mask as a fourth channel, so it judges the region in context.

use std::collections::BTreeMap;
use std::sync::Arc;

use image::{imageops, GrayImage, RgbImage};
use serde::Serialize;

use super::regions::connected_regions;
use super::{batch_settings, ModelInfo};
use crate::bundle::{Bundle, ReasoningSpec};
use crate::config::BatchingOverride;
use crate::engine::batcher::{BatchObserver, Batcher};
use crate::engine::{cpu_bound, load_session, EngineOptions, InputSpec, OnnxModel, TensorData};
use crate::error::{ErrorClass, JobError};
use crate::imaging::{dilate, grow_rect, inside_bbox, to_chw, Map};

/// One distorted region, as the action agent and the diagnostics see it.
#[derive(Debug, Clone, Serialize)]
pub struct Region {
    pub id: usize,
    pub category: String,
    /// `[x, y, w, h]` of the (dilated) mask.
    pub bbox: [u32; 4],
    /// Classifier probability of `category`.
    pub score: f32,
    pub description: String,
    pub tool: String,
    /// Full-image mask, 255 inside: exactly the pixels the action may change.
    #[serde(skip)]
    pub mask: GrayImage,
}

/// A region ready for the classifier: dilated mask, its bbox, the component's pixel count.
type Prepared = (GrayImage, [u32; 4], u32);

pub struct Reasoning {
    classifier: Batcher<OnnxModel>,
    bundle: Arc<Bundle>,
    spec: ReasoningSpec,
    pub info: ModelInfo,
    pub max_batch_size: usize,
}

impl Reasoning {
    pub fn load(
        bundle: &Arc<Bundle>,
        engine: &EngineOptions,
        batching: &BTreeMap<String, BatchingOverride>,
        observer: Arc<dyn BatchObserver>,
    ) -> anyhow::Result<Reasoning> {
        let spec = bundle.manifest.reasoning.clone();
        let session = load_session(&bundle.path(&spec.classifier), engine)?;
        let c = i64::from(spec.input_size);
        let model = OnnxModel::new(
            session,
            vec![InputSpec {
                name: "pixel_values".into(),
                item_shape: vec![4, c, c],
            }],
            "logits",
            &spec.classifier,
        )?;
        let k = model.output_item_shape().first().copied().unwrap_or(-1);
        let categories = bundle.manifest.taxonomy.categories.len() as i64;
        if k > 0 && k != categories {
            anyhow::bail!(
                "classifier {} outputs {k} logits but the taxonomy has {categories} categories",
                spec.classifier
            );
        }
        let mut settings = batch_settings("classifier", bundle, batching);
        if !model.dynamic_batch {
            settings.max_batch_size = 1;
        }
        Ok(Reasoning {
            classifier: Batcher::spawn("classifier", model, settings, observer),
            info: ModelInfo::of(bundle, &spec.classifier),
            bundle: bundle.clone(),
            spec,
            max_batch_size: settings.max_batch_size,
        })
    }

    /// Finds and classifies the regions whose saliency exceeds `threshold`.
    pub async fn regions(
        &self,
        image: &RgbImage,
        saliency: &Map,
        threshold: f32,
    ) -> Result<Vec<Region>, JobError> {
        let (prepared, requests): (Vec<Prepared>, Vec<_>) = cpu_bound(|| {
            let components = connected_regions(
                saliency,
                threshold,
                self.spec.min_region_pixels,
                self.spec.max_regions,
            );
            components
                .into_iter()
                .map(|c| {
                    // Grown so the repair also covers the blemish's soft edge, below τ.
                    let mask = dilate(&c.mask, self.spec.dilate_pixels);
                    let bbox = inside_bbox(&mask).unwrap_or(c.bbox);
                    let request = self.request(image, &mask, bbox);
                    ((mask, bbox, c.pixels), request)
                })
                .unzip()
        });
        let calls = requests.into_iter().map(|request| self.submit(request));
        let logits = futures_util::future::join_all(calls).await;
        let categories = &self.bundle.manifest.taxonomy.categories;
        let mut regions = Vec::with_capacity(prepared.len());
        for (id, ((mask, bbox, pixels), logits)) in prepared.into_iter().zip(logits).enumerate() {
            let (index, score) = argmax_softmax(&logits?);
            let category = categories.get(index).cloned().ok_or_else(|| {
                JobError::new(
                    ErrorClass::ModelError,
                    format!("classifier chose category {index}, outside the taxonomy"),
                )
            })?;
            regions.push(Region {
                id,
                description: self.bundle.describe(&category, score, pixels),
                tool: self.bundle.tool_for(&category).to_string(),
                category,
                bbox,
                score,
                mask,
            });
        }
        Ok(regions)
    }

    /// The classifier input: RGB crop + mask channel, resized to the classifier's size.
    pub fn request(&self, image: &RgbImage, mask: &GrayImage, bbox: [u32; 4]) -> Vec<TensorData> {
        let [x, y, w, h] = grow_rect(bbox, self.spec.context, image.width(), image.height());
        let c = self.spec.input_size;
        let crop = imageops::crop_imm(image, x, y, w, h).to_image();
        let mut data = to_chw(&crop, c, self.spec.mean, self.spec.std);
        let mask_crop = imageops::crop_imm(mask, x, y, w, h).to_image();
        let mask_crop = imageops::resize(&mask_crop, c, c, imageops::FilterType::Nearest);
        let plane = (c * c) as usize;
        data.resize(4 * plane, 0.0);
        for (i, p) in mask_crop.pixels().enumerate() {
            data[3 * plane + i] = if p[0] > 127 { 1.0 } else { 0.0 };
        }
        vec![TensorData::F32(data)]
    }

    async fn submit(&self, request: Vec<TensorData>) -> Result<Vec<f32>, JobError> {
        self.classifier
            .submit(request)
            .await
            .map_err(|e| JobError::new(ErrorClass::ModelError, e.to_string()))
    }

    pub fn batcher(&self) -> &Batcher<OnnxModel> {
        &self.classifier
    }

    pub async fn warm_up(&self, every_size: bool) -> anyhow::Result<()> {
        let image = RgbImage::new(64, 64);
        let mut mask = GrayImage::new(64, 64);
        mask.put_pixel(10, 10, image::Luma([255]));
        let request = self.request(&image, &mask, [10, 10, 1, 1]);
        let sizes = super::warm_up_sizes(self.max_batch_size, every_size);
        let categories = self.bundle.manifest.taxonomy.categories.len();
        super::warm_batcher(&self.classifier, &request, &sizes, categories).await
    }
}

/// Index of the largest logit and its softmax probability.
fn argmax_softmax(logits: &[f32]) -> (usize, f32) {
    let (index, max) =
        logits
            .iter()
            .copied()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            });
    let sum: f32 = logits.iter().map(|v| (v - max).exp()).sum();
    (index, if sum > 0.0 { 1.0 / sum } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_of_the_winner() {
        let (i, p) = argmax_softmax(&[0.0, 2.0, 0.0]);
        assert_eq!(i, 1);
        let expected = 2f32.exp() / (2.0 + 2f32.exp());
        assert!((p - expected).abs() < 1e-6);
    }
}
