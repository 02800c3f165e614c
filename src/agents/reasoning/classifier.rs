//! Reasoning's `regions` mode: saliency → connected regions → region classifier → one
//! category of the bundle's taxonomy per region, with bbox, mask and a description.
//!
//! The classifier sees the region's crop (bbox plus the bundle's context margin) resized to its
//! input size, with the region mask as a fourth channel, so it judges the region in context.

use image::{imageops, GrayImage, RgbImage};

use super::components::connected_regions;
use super::Region;
use crate::agents::{LoadContext, ModelInfo, ModelRole, ServedModel};
use crate::bundle::{Bundle, ReasoningSpec};
use crate::engine::{cpu_bound, InputSpec, OnnxModel, TensorData};
use crate::error::{ErrorClass, JobError};
use crate::imaging::{dilate, grow_rect, inside_bbox, to_chw, Map};

/// A region ready for the classifier: dilated mask, its bbox, the component's pixel count.
type Prepared = (GrayImage, [u32; 4], u32);

/// Reasoning's `regions` mode.
pub struct RegionClassifier {
    model: ServedModel,
    bundle: std::sync::Arc<Bundle>,
    spec: ReasoningSpec,
    /// C: crops are resized to C x C.
    size: u32,
    pub info: ModelInfo,
}

impl RegionClassifier {
    pub fn load(ctx: &LoadContext) -> anyhow::Result<RegionClassifier> {
        let spec = ctx.bundle.manifest.reasoning.clone();
        let (file, size) = match (&spec.classifier, spec.input_size) {
            (Some(file), Some(size)) => (file.clone(), size),
            (None, _) => anyhow::bail!("reasoning mode \"regions\" needs reasoning.classifier"),
            (Some(_), None) => anyhow::bail!("reasoning.classifier needs reasoning.input_size"),
        };
        let c = i64::from(size);
        let model = OnnxModel::new(
            ctx.session(&file)?,
            vec![InputSpec {
                name: "pixel_values".into(),
                item_shape: vec![4, c, c],
            }],
            "logits",
            &file,
        )?;
        let categories = ctx.bundle.manifest.taxonomy.categories.len();
        let k = model.output_item_shape().first().copied().unwrap_or(-1);
        if k > 0 && k != categories as i64 {
            anyhow::bail!(
                "classifier {file} outputs {k} logits but the taxonomy has {categories} categories"
            );
        }
        let mut classifier = RegionClassifier {
            model: ctx.serve(ModelRole::Classifier, model, Vec::new(), categories),
            bundle: ctx.bundle.clone(),
            spec,
            size,
            info: ctx.info(&file),
        };
        let image = RgbImage::new(64, 64);
        let mut mask = GrayImage::new(64, 64);
        mask.put_pixel(10, 10, image::Luma([255]));
        classifier.model.probe = classifier.request(&image, &mask, [10, 10, 1, 1]);
        Ok(classifier)
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
        let calls = requests
            .into_iter()
            .map(|request| self.model.submit(request));
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
                tool: self.bundle.tool_for(&category),
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
        let c = self.size;
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

    pub fn served(&self) -> &ServedModel {
        &self.model
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
