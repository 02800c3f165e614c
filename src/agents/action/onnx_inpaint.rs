//! The `onnx-inpaint` tool: mask-guided inpainting with an ONNX model in the convention of the
//! public LaMa export (`image` [N,3,S,S] in [0,1], `mask` [N,1,S,S] with 1 = hole → `output`
//! [N,3,S,S] in the bundle's `output_range`).

use std::collections::BTreeMap;
use std::sync::Arc;

use image::{GrayImage, RgbImage};

use crate::agents::{batch_settings, ModelInfo};
use crate::bundle::{Bundle, OnnxInpaintSpec};
use crate::config::BatchingOverride;
use crate::engine::batcher::{BatchObserver, Batcher};
use crate::engine::{cpu_bound, load_session, EngineOptions, InputSpec, OnnxModel, TensorData};
use crate::error::{ErrorClass, JobError};
use crate::imaging::{resample, to_chw};

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
        let pixels = to_chw(crop, s, [0.0; 3], [1.0; 3]);
        // Any hole coverage marks the model pixel as hole: shrinking must not drop thin holes
        // (every source pixel in a model pixel's filter support has a positive weight).
        let (w, h) = (hole.width() as usize, hole.height() as usize);
        let s = s as usize;
        let coverage = resample::resize_u8(hole.as_raw(), 1, (w, h), (s, s));
        let mask = coverage
            .into_iter()
            .map(|v| if v > 0.0 { 1.0 } else { 0.0 })
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

    /// The model output (CHW, in `output_range`) as an RGB image of the crop's size: resized
    /// in float, then quantised once.
    fn to_image(&self, output: &[f32], width: u32, height: u32) -> RgbImage {
        let s = self.spec.input_size as usize;
        let [lo, hi] = self.spec.output_range;
        let scale = if hi > lo { 255.0 / (hi - lo) } else { 1.0 };
        let (w, h) = (width as usize, height as usize);
        let planes = resample::resize_planes(output, 3, (s, s), (w, h));
        let plane = w * h;
        let mut raw = vec![0u8; 3 * plane];
        for (i, px) in raw.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = resample::to_u8((planes[c * plane + i] - lo) * scale);
            }
        }
        RgbImage::from_raw(width, height, raw).unwrap_or_else(|| RgbImage::new(width, height))
    }

    pub async fn warm_up(&self, every_size: bool) -> anyhow::Result<()> {
        let s = self.spec.input_size;
        let crop = RgbImage::new(s, s);
        let mut hole = GrayImage::new(s, s);
        hole.put_pixel(s / 2, s / 2, image::Luma([255]));
        let request = self.request(&crop, &hole);
        let sizes = crate::agents::warm_up_sizes(self.max_batch_size, every_size);
        let plane = (s * s) as usize;
        crate::agents::warm_batcher(&self.batcher, &request, &sizes, 3 * plane).await
    }
}
