//! Action agent: repairs each region with the tool its category is routed to, and composites
//! the result back only inside the region's (feathered) mask.
//!
//! Every tool sees the union of all regions as its hole, so no repair copies pixels from
//! another distorted region; composition then touches only the region's own mask, so pixels
//! outside every mask stay byte-for-byte equal to the input.

pub mod onnx_inpaint;
pub mod patchmatch;

use std::collections::BTreeMap;
use std::sync::Arc;

use image::{imageops, GrayImage, RgbImage};

use super::reasoning::Region;
use super::ModelInfo;
use crate::bundle::{Bundle, PatchMatchSpec};
use crate::config::BatchingOverride;
use crate::engine::batcher::BatchObserver;
use crate::engine::{cpu_bound, EngineOptions};
use crate::error::{ErrorClass, JobError};
use crate::imaging::{composite, feather, grow_rect};

use onnx_inpaint::OnnxInpaint;
use patchmatch::PatchMatchParams;

/// Crops larger than this (long side) are repaired at reduced scale by `patchmatch`, whose cost
/// grows with the hole's area.
const PATCHMATCH_MAX_SIDE: u32 = 320;

pub struct Action {
    inpaint: Option<OnnxInpaint>,
    patchmatch: PatchMatchSpec,
    feather_pixels: u32,
    context: f32,
}

impl Action {
    pub fn load(
        bundle: &Bundle,
        engine: &EngineOptions,
        batching: &BTreeMap<String, BatchingOverride>,
        observer: Arc<dyn BatchObserver>,
    ) -> anyhow::Result<Action> {
        let tools = &bundle.manifest.action.tools;
        let inpaint = match &tools.onnx_inpaint {
            Some(spec) => Some(OnnxInpaint::load(bundle, spec, engine, batching, observer)?),
            None => None,
        };
        Ok(Action {
            inpaint,
            patchmatch: tools.patchmatch.clone().unwrap_or(PatchMatchSpec {
                patch_size: 7,
                iterations: 4,
            }),
            feather_pixels: bundle.manifest.reasoning.feather_pixels,
            context: bundle.manifest.reasoning.context.max(0.5),
        })
    }

    pub fn inpaint_info(&self) -> Option<ModelInfo> {
        self.inpaint.as_ref().map(|t| t.info.clone())
    }

    pub fn inpaint(&self) -> Option<&OnnxInpaint> {
        self.inpaint.as_ref()
    }

    /// Repairs every region of `image`; returns the edited image.
    pub async fn apply(&self, image: &RgbImage, regions: &[Region]) -> Result<RgbImage, JobError> {
        if regions.is_empty() {
            return Ok(image.clone());
        }
        let (w, h) = image.dimensions();
        let holes = cpu_bound(|| {
            let mut holes = GrayImage::new(w, h);
            let width = w as usize;
            for region in regions {
                let mask: &[u8] = &region.mask;
                let dst: &mut [u8] = &mut holes;
                if mask.len() != dst.len() {
                    // Not image-sized (never made so): take it pixel by pixel as far as it goes.
                    dst.iter_mut()
                        .zip(mask)
                        .for_each(|(d, &s)| *d = (*d).max(s));
                    continue;
                }
                // A region's mask is zero outside its bbox.
                let [x, y, bw, bh] = region.bbox.map(|v| v as usize);
                let x = x.min(width);
                for row in y..(y + bh).min(h as usize) {
                    let span = row * width + x..row * width + (x + bw).min(width);
                    for (d, &s) in dst[span.clone()].iter_mut().zip(&mask[span]) {
                        *d = (*d).max(s);
                    }
                }
            }
            holes
        });
        // Repairs run concurrently (the inpainting ones batch together), then are composited
        // one after another.
        let repairs = regions
            .iter()
            .map(|region| self.repair(image, &holes, region));
        let patches = futures_util::future::join_all(repairs).await;
        let patches: Vec<_> = patches.into_iter().collect::<Result<_, _>>()?;
        Ok(cpu_bound(|| {
            let mut out = image.clone();
            for (region, (rect, patch)) in regions.iter().zip(patches) {
                let [x, y, cw, ch] = rect;
                let mask = imageops::crop_imm(&region.mask, x, y, cw, ch).to_image();
                let alpha = feather(&mask, self.feather_pixels);
                let mut target = imageops::crop_imm(&out, x, y, cw, ch).to_image();
                composite(&mut target, &patch, &alpha);
                imageops::replace(&mut out, &target, i64::from(x), i64::from(y));
            }
            out
        }))
    }

    /// Runs the region's tool on a crop around it; returns the crop rectangle and its repair.
    async fn repair(
        &self,
        image: &RgbImage,
        holes: &GrayImage,
        region: &Region,
    ) -> Result<([u32; 4], RgbImage), JobError> {
        let (w, h) = image.dimensions();
        match region.tool.as_str() {
            "onnx-inpaint" => {
                let tool = self.inpaint.as_ref().ok_or_else(|| {
                    JobError::new(ErrorClass::ModelError, "onnx-inpaint is not in this bundle")
                })?;
                let rect = grow_rect(region.bbox, tool.context(), w, h);
                let (crop, hole) = crops(image, holes, rect);
                let request = cpu_bound(|| tool.request(&crop, &hole));
                Ok((rect, tool.fill(request, crop.width(), crop.height()).await?))
            }
            "patchmatch" => {
                let rect = grow_rect(region.bbox, self.context, w, h);
                let (crop, hole) = crops(image, holes, rect);
                let params = PatchMatchParams {
                    patch_size: self.patchmatch.patch_size,
                    iterations: self.patchmatch.iterations,
                    seed: u64::from(region.bbox[0]) << 32 | u64::from(region.bbox[1]),
                };
                let patch =
                    tokio::task::spawn_blocking(move || patchmatch_scaled(&crop, &hole, &params))
                        .await
                        .map_err(|e| {
                            JobError::new(ErrorClass::Internal, format!("patchmatch: {e}"))
                        })?;
                Ok((rect, patch))
            }
            other => Err(JobError::new(
                ErrorClass::ModelError,
                format!("unknown tool {other:?}"),
            )),
        }
    }

    pub async fn warm_up(&self, every_size: bool) -> anyhow::Result<()> {
        if let Some(tool) = &self.inpaint {
            tool.warm_up(every_size).await?;
        }
        Ok(())
    }
}

fn crops(image: &RgbImage, holes: &GrayImage, rect: [u32; 4]) -> (RgbImage, GrayImage) {
    let [x, y, w, h] = rect;
    (
        imageops::crop_imm(image, x, y, w, h).to_image(),
        imageops::crop_imm(holes, x, y, w, h).to_image(),
    )
}

/// PatchMatch at a bounded working size: large crops are filled at reduced scale and the fill
/// is scaled back (only hole pixels are used from it).
fn patchmatch_scaled(crop: &RgbImage, hole: &GrayImage, params: &PatchMatchParams) -> RgbImage {
    let (w, h) = crop.dimensions();
    let long = w.max(h);
    if long <= PATCHMATCH_MAX_SIDE {
        return patchmatch::fill(crop, hole, params);
    }
    let scale = PATCHMATCH_MAX_SIDE as f32 / long as f32;
    let (sw, sh) = (
        ((w as f32 * scale).round() as u32).max(1),
        ((h as f32 * scale).round() as u32).max(1),
    );
    let small = imageops::resize(crop, sw, sh, imageops::FilterType::Triangle);
    let small_hole = imageops::resize(hole, sw, sh, imageops::FilterType::Triangle);
    let small_hole = GrayImage::from_fn(sw, sh, |x, y| {
        image::Luma([if small_hole.get_pixel(x, y)[0] > 0 {
            255
        } else {
            0
        }])
    });
    let filled = patchmatch::fill(&small, &small_hole, params);
    imageops::resize(&filled, w, h, imageops::FilterType::Triangle)
}
