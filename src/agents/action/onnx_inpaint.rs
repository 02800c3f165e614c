//! The `onnx-inpaint` tool: mask-guided inpainting with an ONNX model in the convention of the
//! public LaMa export (`image` [N,3,S,S] in [0,1], `mask` [N,1,S,S] with 1 = hole → `output`
//! [N,3,S,S] in the bundle's `output_range`).

use futures_util::future::BoxFuture;
use image::{GrayImage, RgbImage};
use serde::Deserialize;

use super::tool::{RepairInput, Tool, ToolEntry};
use crate::agents::{LoadContext, ModelInfo, ModelRole, ServedModel};
use crate::engine::{cpu_bound, InputSpec, OnnxModel, TensorData};
use crate::error::JobError;
use crate::imaging::{resample, to_chw};

pub const ENTRY: ToolEntry = ToolEntry {
    name: "onnx-inpaint",
    load,
};

/// `[action.tools.onnx-inpaint]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxInpaintSpec {
    /// The ONNX file.
    pub model: String,
    /// S: crop and mask are resized to S x S.
    pub input_size: u32,
    /// The model's output range; mapped to [0, 255] as (y - lo) / (hi - lo).
    pub output_range: [f32; 2],
    /// Crop = region bbox plus context x its width/height on each side.
    pub context: f32,
}

fn load(ctx: &LoadContext, spec: Option<&toml::Value>) -> anyhow::Result<Box<dyn Tool>> {
    let spec: OnnxInpaintSpec = spec
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the bundle routes to onnx-inpaint but has no [action.tools.onnx-inpaint] table"
            )
        })?
        .clone()
        .try_into()
        .map_err(|e| anyhow::anyhow!("[action.tools.onnx-inpaint]: {e}"))?;
    Ok(Box::new(OnnxInpaint::load(ctx, spec)?))
}

pub struct OnnxInpaint {
    model: ServedModel,
    spec: OnnxInpaintSpec,
    info: ModelInfo,
}

impl OnnxInpaint {
    pub fn load(ctx: &LoadContext, spec: OnnxInpaintSpec) -> anyhow::Result<OnnxInpaint> {
        let s = i64::from(spec.input_size);
        let model = OnnxModel::new(
            ctx.session(&spec.model)?,
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
        let size = spec.input_size;
        let plane = (size * size) as usize;
        let mut tool = OnnxInpaint {
            model: ctx.serve(ModelRole::Inpaint, model, Vec::new(), 3 * plane),
            info: ctx.info(&spec.model),
            spec,
        };
        let crop = RgbImage::new(size, size);
        let mut hole = GrayImage::new(size, size);
        hole.put_pixel(size / 2, size / 2, image::Luma([255]));
        tool.model.probe = tool.request(&crop, &hole);
        Ok(tool)
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
        // The batcher checked the output's length (3 x S x S).
        let output = self.model.submit(request).await?;
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
}

impl Tool for OnnxInpaint {
    fn context(&self) -> f32 {
        self.spec.context
    }

    fn repair<'a>(&'a self, input: RepairInput<'a>) -> BoxFuture<'a, Result<RgbImage, JobError>> {
        Box::pin(async move {
            let request = cpu_bound(|| self.request(&input.crop, &input.hole));
            self.fill(request, input.crop.width(), input.crop.height())
                .await
        })
    }

    fn served(&self) -> Vec<&ServedModel> {
        vec![&self.model]
    }

    fn info(&self) -> Option<&ModelInfo> {
        Some(&self.info)
    }
}
