//! The `diffusion-inpaint` tool: instruction-guided inpainting with a Stable Diffusion
//! inpainting export (design §4.7c), conditioned on the region's instruction and the job's
//! prompt, seeded by the job so a redelivery writes the same pixels, and batched per denoising
//! step across every region of every job in the process.
//!
//! One repair (the contract of models/README.md, which `models/diffusion-reference/reference.py`
//! implements independently): the crop at S x S, masked; masked-image latents from the VAE
//! encoder; the conditioning text and the negative prompt through the text encoder; initial
//! noise from [`noise`]; per step of the [`scheduler`] one UNet request ([`denoise`]); the
//! latents decoded, brought back to the crop's size, and composited inside the region's
//! feathered mask by the action agent.
//!
//! [`spec`] reads the bundle table, [`export`] loads and serves the four models.

mod denoise;
pub mod export;
pub mod noise;
pub mod scheduler;
pub mod spec;

use futures_util::future::BoxFuture;
use image::{GrayImage, RgbImage};

use super::tool::{RepairInput, Tool, ToolEntry};
use crate::agents::text::{EncodingSpec, PromptEncoder};
use crate::agents::{LoadContext, ModelInfo, ServedModel};
use crate::engine::{cpu_bound, TensorData};
use crate::error::{ErrorClass, JobError};
use crate::imaging::{resample, to_chw};

pub use denoise::{StepTrace, Trace};
pub use export::{Export, Variant};
pub use scheduler::{Scheduler, SchedulerKind};
pub use spec::{DiffusionSpec, LatentMask};

pub const ENTRY: ToolEntry = ToolEntry {
    name: "diffusion-inpaint",
    load,
};

fn load(ctx: &LoadContext, table: Option<&toml::Value>) -> anyhow::Result<Box<dyn Tool>> {
    let table = table.ok_or_else(|| {
        anyhow::anyhow!(
            "the bundle routes to diffusion-inpaint but has no [action.tools.diffusion-inpaint] table"
        )
    })?;
    Ok(Box::new(DiffusionInpaint::load(
        ctx,
        DiffusionSpec::parse(table)?,
    )?))
}

/// One region to inpaint, with everything its result depends on.
#[derive(Debug, Clone, Copy)]
pub struct InpaintRequest<'a> {
    /// The crop around the region (any size).
    pub crop: &'a RgbImage,
    /// The crop's hole, its size, > 0 = to be filled.
    pub hole: &'a GrayImage,
    /// The conditioning text (see [`DiffusionSpec::conditioning_text`]).
    pub text: &'a str,
    /// The noise seed: the job, the loop iteration and the region's index in it.
    pub job_id: &'a str,
    pub iteration: usize,
    pub region: usize,
    /// Denoising steps (already within the bundle's bounds, see [`DiffusionSpec::steps_for`]).
    pub steps: u32,
}

pub struct DiffusionInpaint {
    spec: DiffusionSpec,
    export: Export,
    encoder: PromptEncoder,
    info: ModelInfo,
}

/// What a region's inputs become before any model runs.
struct Prepared {
    /// `masked` image, [3, S, S], hole pixels 0.
    masked: Vec<f32>,
    /// The latent mask, [h, h], 1 = hole.
    mask: Vec<f32>,
}

impl DiffusionInpaint {
    pub fn load(ctx: &LoadContext, spec: DiffusionSpec) -> anyhow::Result<DiffusionInpaint> {
        let encoder = PromptEncoder::load(
            &ctx.file(&spec.tokenizer)?,
            EncodingSpec {
                max_tokens: spec.max_tokens,
                add_special_tokens: spec.add_special_tokens,
                pad_id: Some(spec.pad_id),
            },
        )
        .map_err(|e| e.context("[action.tools.diffusion-inpaint] tokenizer"))?;
        let export = Export::load(ctx, &spec).map_err(|e| {
            e.context(format!(
                "[action.tools.diffusion-inpaint] export {:?}",
                spec.export
            ))
        })?;
        let info = ctx.info(&format!(
            "{}/unet/model.onnx",
            spec.export.trim_end_matches('/')
        ));
        Ok(DiffusionInpaint {
            spec,
            export,
            encoder,
            info,
        })
    }

    pub fn spec(&self) -> &DiffusionSpec {
        &self.spec
    }

    /// What was detected from the export's sessions.
    pub fn variant(&self) -> Variant {
        self.export.variant
    }

    /// The ids of a text as the text encoder sees them (exactly `max_tokens`).
    pub fn token_ids(&self, text: &str) -> Result<Vec<i64>, JobError> {
        Ok(self.encoder.encode(text)?.ids)
    }

    /// Inpaints one region; returns the crop-sized patch. With `trace`, records every
    /// intermediate array (for comparing with the reference).
    pub async fn inpaint(
        &self,
        request: &InpaintRequest<'_>,
        mut trace: Option<&mut Trace>,
    ) -> Result<RgbImage, JobError> {
        let internal = |e: anyhow::Error| JobError::new(ErrorClass::Internal, format!("{e:#}"));
        let scheduler = Scheduler::new(
            self.spec.scheduler,
            self.export.train.clone(),
            request.steps as usize,
        )
        .map_err(internal)?;
        let prepared = cpu_bound(|| self.prepare(request.crop, request.hole));

        // Text rows [uncond; cond] (with guidance) and the masked image go to their encoders
        // together.
        let mut ids = Vec::with_capacity(self.export.rows * self.spec.max_tokens);
        if self.spec.guided() {
            ids.extend(self.token_ids(&self.spec.negative_prompt)?);
        }
        ids.extend(self.token_ids(request.text)?);
        let (hidden, moments) = futures_util::future::join(
            self.export
                .text_encoder
                .submit(self.export.text_request(&ids)),
            self.export
                .vae_encoder
                .submit(vec![TensorData::F32(prepared.masked)]),
        )
        .await;
        let (hidden, moments) = (hidden?, moments?);
        let side = self.export.latent_side();
        let latent_len = 4 * side * side;
        // latent_parameters: channels 0..4 are the mean (the rest the log-variance).
        let masked_latents: Vec<f32> = moments[..latent_len]
            .iter()
            .map(|v| v * self.spec.latent_scale)
            .collect();

        let noise = noise::region_noise(
            request.job_id,
            request.iteration,
            request.region,
            latent_len,
        );
        let sigma = scheduler.init_noise_sigma();
        let latents: Vec<f32> = noise
            .iter()
            .map(|&v| (f64::from(v) * sigma) as f32)
            .collect();
        if let Some(trace) = trace.as_deref_mut() {
            trace.input_ids = ids
                .chunks(self.spec.max_tokens)
                .map(<[i64]>::to_vec)
                .collect();
            trace.timesteps = scheduler.timesteps().to_vec();
            trace.init_noise_sigma = sigma;
            trace.noise = noise;
            trace.initial_latents = latents.clone();
            trace.mask_latent = prepared.mask.clone();
            trace.masked_image_latents = masked_latents.clone();
            trace.text_embeddings = hidden.clone();
        }

        let latents = denoise::denoise(
            &self.export,
            &scheduler,
            self.spec.guidance_scale,
            denoise::Conditioning {
                mask: &prepared.mask,
                masked_latents: &masked_latents,
                hidden: &hidden,
            },
            latents,
            trace.as_deref_mut(),
        )
        .await?;

        let scaled: Vec<f32> = latents.iter().map(|v| v / self.spec.latent_scale).collect();
        let decoded = self
            .export
            .vae_decoder
            .submit(vec![TensorData::F32(scaled)])
            .await?;
        let decoded: Vec<f32> = decoded
            .iter()
            .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect();
        let patch = cpu_bound(|| self.patch(&decoded, request.crop.width(), request.crop.height()));
        if let Some(trace) = trace {
            trace.decoded = decoded;
        }
        Ok(patch)
    }

    /// The masked image and the latent mask of a crop and its hole.
    fn prepare(&self, crop: &RgbImage, hole: &GrayImage) -> Prepared {
        let s = self.export.size;
        let mut masked = to_chw(crop, s as u32, [0.5; 3], [0.5; 3]);
        // Any hole coverage marks the pixel as hole: shrinking must not drop thin holes.
        let (w, h) = (hole.width() as usize, hole.height() as usize);
        let holes: Vec<bool> = resample::resize_u8(hole.as_raw(), 1, (w, h), (s, s))
            .into_iter()
            .map(|v| v > 0.0)
            .collect();
        for plane in masked.chunks_exact_mut(s * s) {
            for (v, &inside) in plane.iter_mut().zip(&holes) {
                if inside {
                    *v = 0.0;
                }
            }
        }
        let side = s / 8;
        let mut mask = vec![0.0; side * side];
        for (i, m) in mask.iter_mut().enumerate() {
            let (row, col) = (i / side * 8, i % side * 8);
            let inside = match self.spec.latent_mask {
                LatentMask::Nearest => holes[row * s + col],
                LatentMask::Any => {
                    (row..row + 8).any(|y| holes[y * s + col..y * s + col + 8].contains(&true))
                }
            };
            *m = if inside { 1.0 } else { 0.0 };
        }
        Prepared { masked, mask }
    }

    /// The decoded [3, S, S] image in [0, 1] at the crop's size, quantised once.
    fn patch(&self, decoded: &[f32], width: u32, height: u32) -> RgbImage {
        let s = self.export.size;
        let (w, h) = (width as usize, height as usize);
        let planes = resample::resize_planes(decoded, 3, (s, s), (w, h));
        let plane = w * h;
        let mut raw = vec![0u8; 3 * plane];
        for (i, px) in raw.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = resample::to_u8(planes[c * plane + i] * 255.0);
            }
        }
        RgbImage::from_raw(width, height, raw).unwrap_or_else(|| RgbImage::new(width, height))
    }
}

impl Tool for DiffusionInpaint {
    fn context(&self) -> f32 {
        self.spec.context
    }

    fn repair<'a>(&'a self, input: RepairInput<'a>) -> BoxFuture<'a, Result<RgbImage, JobError>> {
        Box::pin(async move {
            let region = input.region;
            let text = self.spec.conditioning_text(
                &region.description,
                input.job.prompt,
                &region.category,
            );
            let request = InpaintRequest {
                crop: &input.crop,
                hole: &input.hole,
                text: &text,
                job_id: input.job.job_id,
                iteration: input.job.iteration,
                // As in mask-{iteration}-{region}.png.
                region: region.id,
                steps: self.spec.steps_for(input.job.diffusion_steps),
            };
            self.inpaint(&request, None).await
        })
    }

    fn served(&self) -> Vec<&ServedModel> {
        self.export.served()
    }

    fn info(&self) -> Option<&ModelInfo> {
        Some(&self.info)
    }
}
