//! The `onnx-inpaint` tool: mask-guided inpainting with an ONNX model in the convention of the
//! public LaMa export (`image` [N,3,S,S] in [0,1], `mask` [N,1,S,S] with 1 = hole → `output`
//! [N,3,S,S] in the bundle's `output_range`).

use std::collections::BTreeMap;
use std::sync::Arc;

use image::{imageops, GrayImage, RgbImage};

use crate::agents::{batch_settings, ModelInfo};
use crate::bundle::{Bundle, OnnxInpaintSpec};
use crate::config::BatchingOverride;
use crate::engine::batcher::{BatchObserver, Batcher};
use crate::engine::{cpu_bound, load_session, EngineOptions, InputSpec, OnnxModel, TensorData};
use crate::error::{ErrorClass, JobError};

pub struct OnnxInpaint {
    batcher: Batcher<OnnxModel>,
    spec: OnnxInpaintSpec,
    pub info: ModelInfo,
    pub max_batch_size: usize,
}

impl OnnxInpaint {
    pub fn load(
        bundle: &Bundle,
        spec: &OnnxInpaintSpec,
        engine: &EngineOptions,
        batching: &BTreeMap<String, BatchingOverride>,
        observer: Arc<dyn BatchObserver>,
    ) -> anyhow::Result<OnnxInpaint> {
        let session = load_session(&bundle.path(&spec.model), engine)?;
        let s = i64::from(spec.input_size);
        let model = OnnxModel::new(
            session,
            vec![
                InputSpec {
                    name: "image".into(),
                    item_shape: vec![3, s, s],
                },
                InputSpec {
                    name: "mask".into(),
                    item_shape: vec![1, s, s],
                },
            ],
            "output",
            &spec.model,
        )?;
        let mut settings = batch_settings("inpaint", bundle, batching);
        if !model.dynamic_batch {
            settings.max_batch_size = 1;
        }
        Ok(OnnxInpaint {
            batcher: Batcher::spawn("inpaint", model, settings, observer),
            spec: spec.clone(),
            info: ModelInfo::of(bundle, &spec.model),
            max_batch_size: settings.max_batch_size,
        })
    }

    pub fn batcher(&self) -> &Batcher<OnnxModel> {
        &self.batcher
    }

    pub fn context(&self) -> f32 {
        self.spec.context
    }

    /// The model input for a crop and its hole (255 = fill).
    pub fn request(&self, crop: &RgbImage, hole: &GrayImage) -> Vec<TensorData> {
        let s = self.spec.input_size;
        let plane = (s * s) as usize;
        let resized = imageops::resize(crop, s, s, imageops::FilterType::Triangle);
        let mut pixels = vec![0f32; 3 * plane];
        for (i, p) in resized.pixels().enumerate() {
            for c in 0..3 {
                pixels[c * plane + i] = f32::from(p[c]) / 255.0;
            }
        }
        // Any hole coverage marks the model pixel as hole: shrinking must not drop thin holes.
        let hole_small = imageops::resize(hole, s, s, imageops::FilterType::Triangle);
        let mask = hole_small
            .pixels()
            .map(|p| if p[0] > 0 { 1.0 } else { 0.0 })
            .collect();
        vec![TensorData::F32(pixels), TensorData::F32(mask)]
    }

    /// Runs a prepared request; returns the fill at the crop's size (composited by the caller).
    pub async fn fill(
        &self,
        request: Vec<TensorData>,
        width: u32,
        height: u32,
    ) -> Result<RgbImage, JobError> {
        let s = self.spec.input_size;
        let output = self
            .batcher
            .submit(request)
            .await
            .map_err(|e| JobError::new(ErrorClass::ModelError, e.to_string()))?;
        let plane = (s * s) as usize;
        if output.len() != 3 * plane {
            return Err(JobError::new(
                ErrorClass::ModelError,
                format!(
                    "inpainting returned {} values, expected {}",
                    output.len(),
                    3 * plane
                ),
            ));
        }
        Ok(cpu_bound(|| self.to_image(&output, width, height)))
    }

    /// The model output (CHW, in `output_range`) as an RGB image of the crop's size.
    fn to_image(&self, output: &[f32], width: u32, height: u32) -> RgbImage {
        let s = self.spec.input_size;
        let plane = (s * s) as usize;
        let [lo, hi] = self.spec.output_range;
        let scale = if hi > lo { 255.0 / (hi - lo) } else { 1.0 };
        let small = RgbImage::from_fn(s, s, |x, y| {
            let i = (y * s + x) as usize;
            let px = |c: usize| {
                ((output[c * plane + i] - lo) * scale)
                    .round()
                    .clamp(0.0, 255.0) as u8
            };
            image::Rgb([px(0), px(1), px(2)])
        });
        imageops::resize(&small, width, height, imageops::FilterType::Triangle)
    }

    pub async fn warm_up(&self) -> anyhow::Result<()> {
        let s = self.spec.input_size;
        let crop = RgbImage::new(s, s);
        let mut hole = GrayImage::new(s, s);
        hole.put_pixel(s / 2, s / 2, image::Luma([255]));
        let request = self.request(&crop, &hole);
        let calls = (0..self.max_batch_size).map(|_| self.fill(request.clone(), s, s));
        for result in futures_util::future::join_all(calls).await {
            result.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }
}
