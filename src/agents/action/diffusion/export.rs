//! The four models of a Stable Diffusion inpainting export in the diffusers / optimum ONNX
//! layout (design §4.7c), each served behind its own batcher, and the variant of the export
//! read from the sessions' inputs and outputs (never from the bundle):
//!
//! - `text_encoder/model.onnx`: `input_ids` (i32 or i64) [N, L] → `last_hidden_state` [N, L, D]
//! - `unet/model.onnx`: `sample` [N, 9, h, w], `timestep` (f32, i64 or i32; [N] or a scalar),
//!   `encoder_hidden_states` [N, L, D] → `out_sample` [N, 4, h, w]
//! - `vae_encoder/model.onnx`: `sample` [N, 3, H, W] → `latent_sample` [N, 4, h, w] or
//!   `latent_parameters` [N, 8, h, w] (mean, logvar: the mean is taken, never a sample)
//! - `vae_decoder/model.onnx`: `latent_sample` [N, 4, h, w] → `sample` [N, 3, H, W]
//!
//! With classifier-free guidance a text-encoder or UNet request is one item of two rows
//! (`[uncond; cond]`), so the pair always shares a call. A `[N]` timestep lets rows at
//! different steps share a UNet call; a scalar one makes it a shared input of the call, so a
//! batch is split into calls of equal timesteps.

use std::sync::Arc;

use anyhow::{bail, Context};
use ort::value::TensorElementType;

use super::scheduler::TrainSchedule;
use super::spec::DiffusionSpec;
use crate::agents::{LoadContext, ModelRole, ServedModel};
use crate::engine::{inputs_of, outputs_of, InputSpec, OnnxModel, TensorData, TensorInfo};

/// The element type of the text encoder's `input_ids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdType {
    I32,
    I64,
}

/// The element type of the UNet's `timestep` (the scheduler's integer timestep is cast to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    F32,
    I64,
    I32,
}

/// Which VAE-encoder output the export has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeOutput {
    /// `latent_sample` [N, 4, h, w], used as it is.
    LatentSample,
    /// `latent_parameters` [N, 8, h, w] = cat[mean, logvar]: the mean is taken.
    LatentParameters,
}

impl VaeOutput {
    fn name(self) -> &'static str {
        match self {
            VaeOutput::LatentSample => "latent_sample",
            VaeOutput::LatentParameters => "latent_parameters",
        }
    }
}

/// What was detected from the sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub input_ids: IdType,
    pub timestep: TimestepType,
    /// A rank-0 timestep: one per call.
    pub scalar_timestep: bool,
    pub vae_output: VaeOutput,
    /// D: the text encoder's hidden size.
    pub hidden_size: usize,
}

/// The export's four models, served.
pub struct Export {
    pub variant: Variant,
    pub train: Arc<TrainSchedule>,
    pub text_encoder: ServedModel,
    pub unet: ServedModel,
    pub vae_encoder: ServedModel,
    pub vae_decoder: ServedModel,
    /// Rows per text-encoder and UNet item: 2 with guidance (`[uncond; cond]`), else 1.
    pub rows: usize,
    /// L
    pub max_tokens: usize,
    /// S
    pub size: usize,
}

fn find<'a>(infos: &'a [TensorInfo], name: &str, part: &str) -> anyhow::Result<&'a TensorInfo> {
    infos.iter().find(|i| i.name == name).with_context(|| {
        let have: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
        format!("{part} has no {name:?} (it has {have:?})")
    })
}

fn require_f32(info: &TensorInfo, part: &str) -> anyhow::Result<()> {
    match info.element {
        TensorElementType::Float32 => Ok(()),
        TensorElementType::Float16 => bail!(
            "{part} {} is float16: fp16 exports are not supported (export in fp32)",
            info.name
        ),
        other => bail!("{part} {} has type {other:?}, expected float32", info.name),
    }
}

/// A declared dimension that is static and different from `want` (dynamic ones fit anything).
fn fixed_other(info: &TensorInfo, axis: usize, want: usize) -> Option<i64> {
    info.shape
        .get(axis)
        .copied()
        .filter(|&d| d >= 0 && d != want as i64)
}

/// The hidden size D if a declared shape fixes it.
fn static_last(info: &TensorInfo) -> Option<usize> {
    info.shape
        .last()
        .copied()
        .filter(|&d| d > 0)
        .map(|d| d as usize)
}

impl Export {
    pub fn load(ctx: &LoadContext, spec: &DiffusionSpec) -> anyhow::Result<Export> {
        let root = spec.export.trim_end_matches('/');
        let path = |part: &str| format!("{root}/{part}/model.onnx");
        let config_file = format!("{root}/scheduler/scheduler_config.json");
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(ctx.file(&config_file)?)
                .with_context(|| format!("reading {config_file}"))?,
        )
        .with_context(|| format!("{config_file} is not JSON"))?;
        let train =
            Arc::new(TrainSchedule::from_config(&config).with_context(|| config_file.clone())?);
        // Every step count a job may ask for must be a valid schedule.
        for n in 1..=spec.max_steps as usize {
            train
                .timesteps(n)
                .with_context(|| format!("max_steps = {} with {config_file}", spec.max_steps))?;
        }

        let (l, s) = (spec.max_tokens, spec.native_size as usize);
        let h = s / 8;
        let rows = if spec.guided() { 2 } else { 1 };

        let text_session = ctx.session(&path("text_encoder"))?;
        let unet_session = ctx.session(&path("unet"))?;
        let encoder_session = ctx.session(&path("vae_encoder"))?;
        let decoder_session = ctx.session(&path("vae_decoder"))?;

        // Text encoder.
        let (te_in, te_out) = (inputs_of(&text_session), outputs_of(&text_session));
        let ids = find(&te_in, "input_ids", "text_encoder")?;
        let input_ids = match ids.element {
            TensorElementType::Int32 => IdType::I32,
            TensorElementType::Int64 => IdType::I64,
            other => bail!("text_encoder input_ids has type {other:?} (int32 or int64 expected)"),
        };
        if let Some(d) = fixed_other(ids, 1, l) {
            bail!("max_tokens = {l}, but text_encoder input_ids has a fixed length of {d}");
        }
        let hidden = find(&te_out, "last_hidden_state", "text_encoder")?;
        require_f32(hidden, "text_encoder")?;

        // UNet.
        let (un_in, un_out) = (inputs_of(&unet_session), outputs_of(&unet_session));
        let mut names: Vec<&str> = un_in.iter().map(|i| i.name.as_str()).collect();
        names.sort_unstable();
        if names != ["encoder_hidden_states", "sample", "timestep"] {
            bail!(
                "unet inputs are {names:?}; an SD 1.x/2.x inpainting UNet takes exactly sample, \
                 timestep and encoder_hidden_states (SDXL's text_embeds/time_ids are not supported)"
            );
        }
        let sample = find(&un_in, "sample", "unet")?;
        require_f32(sample, "unet")?;
        if let Some(c) = fixed_other(sample, 1, 9) {
            bail!("unet sample has {c} channels: not an inpainting UNet (9 expected)");
        }
        for axis in [2, 3] {
            if let Some(d) = fixed_other(sample, axis, h) {
                bail!(
                    "native_size = {s} gives {h} x {h} latents, but the unet takes a fixed size {d} \
                     (native_size must be {})",
                    d * 8
                );
            }
        }
        let timestep_info = find(&un_in, "timestep", "unet")?;
        let timestep = match timestep_info.element {
            TensorElementType::Float32 => TimestepType::F32,
            TensorElementType::Int64 => TimestepType::I64,
            TensorElementType::Int32 => TimestepType::I32,
            TensorElementType::Float16 => {
                bail!("unet timestep is float16: fp16 exports are not supported (export in fp32)")
            }
            other => bail!("unet timestep has type {other:?} (float32, int64 or int32 expected)"),
        };
        let scalar_timestep = match timestep_info.shape.len() {
            0 => true,
            1 => false,
            r => bail!("unet timestep has rank {r} (0 or 1 expected)"),
        };
        let states = find(&un_in, "encoder_hidden_states", "unet")?;
        require_f32(states, "unet")?;
        require_f32(find(&un_out, "out_sample", "unet")?, "unet")?;

        // VAE.
        let (enc_in, enc_out) = (inputs_of(&encoder_session), outputs_of(&encoder_session));
        require_f32(find(&enc_in, "sample", "vae_encoder")?, "vae_encoder")?;
        let vae_output = if enc_out.iter().any(|o| o.name == "latent_sample") {
            VaeOutput::LatentSample
        } else if enc_out.iter().any(|o| o.name == "latent_parameters") {
            VaeOutput::LatentParameters
        } else {
            let have: Vec<&str> = enc_out.iter().map(|o| o.name.as_str()).collect();
            bail!("vae_encoder gives {have:?}; latent_sample or latent_parameters expected");
        };
        let dec_in = inputs_of(&decoder_session);
        require_f32(
            find(&dec_in, "latent_sample", "vae_decoder")?,
            "vae_decoder",
        )?;
        find(&outputs_of(&decoder_session), "sample", "vae_decoder")?;

        // The text encoder's model, and D: declared by either side, else measured once.
        let mut text_model = OnnxModel::new(
            text_session,
            vec![InputSpec {
                name: "input_ids".into(),
                item_shape: vec![l as i64],
            }],
            "last_hidden_state",
            &path("text_encoder"),
        )?
        .with_rows_per_item(rows);
        let pads = |n: usize| vec![i64::from(spec.pad_id); n];
        let text_probe = vec![ids_tensor(input_ids, &pads(rows * l))];
        let hidden_size = match static_last(states).or_else(|| static_last(hidden)) {
            Some(d) => d,
            None => {
                let out = text_model
                    .run_batch(std::slice::from_ref(&text_probe))
                    .context("running the text encoder once to learn its hidden size")?;
                out.first().map_or(0, Vec::len) / (rows * l).max(1)
            }
        };
        if hidden_size == 0 {
            bail!("the text encoder's hidden size could not be determined");
        }
        if let Some(d) = static_last(states).filter(|&d| d != hidden_size) {
            bail!("unet encoder_hidden_states has width {d}, the text encoder gives {hidden_size}");
        }

        let variant = Variant {
            input_ids,
            timestep,
            scalar_timestep,
            vae_output,
            hidden_size,
        };
        let d = hidden_size;
        let plane = h * h;

        let mut unet_model = OnnxModel::new(
            unet_session,
            vec![
                InputSpec {
                    name: "sample".into(),
                    item_shape: vec![9, h as i64, h as i64],
                },
                InputSpec {
                    name: "timestep".into(),
                    item_shape: vec![],
                },
                InputSpec {
                    name: "encoder_hidden_states".into(),
                    item_shape: vec![l as i64, d as i64],
                },
            ],
            "out_sample",
            &path("unet"),
        )?
        .with_rows_per_item(rows);
        if scalar_timestep {
            unet_model = unet_model.with_shared_input("timestep")?;
        }
        let encoder_model = OnnxModel::new(
            encoder_session,
            vec![InputSpec {
                name: "sample".into(),
                item_shape: vec![3, s as i64, s as i64],
            }],
            vae_output.name(),
            &path("vae_encoder"),
        )?;
        let decoder_model = OnnxModel::new(
            decoder_session,
            vec![InputSpec {
                name: "latent_sample".into(),
                item_shape: vec![4, h as i64, h as i64],
            }],
            "sample",
            &path("vae_decoder"),
        )?;
        let latent_channels = match vae_output {
            VaeOutput::LatentSample => 4,
            VaeOutput::LatentParameters => 8,
        };
        let mut export = Export {
            variant,
            train,
            text_encoder: ctx.serve(ModelRole::TextEncoder, text_model, text_probe, rows * l * d),
            unet: ctx.serve(ModelRole::Unet, unet_model, Vec::new(), rows * 4 * plane),
            vae_encoder: ctx.serve(
                ModelRole::VaeEncoder,
                encoder_model,
                vec![TensorData::F32(vec![0.0; 3 * s * s])],
                latent_channels * plane,
            ),
            vae_decoder: ctx.serve(
                ModelRole::VaeDecoder,
                decoder_model,
                vec![TensorData::F32(vec![0.0; 4 * plane])],
                3 * s * s,
            ),
            rows,
            max_tokens: l,
            size: s,
        };
        let zeros = vec![0.0; 4 * plane];
        let mut mask = vec![0.0; plane];
        mask[0] = 1.0;
        let first = export.train.timesteps(spec.steps as usize)?[0];
        export.unet.probe =
            export.unet_request(&zeros, &mask, &zeros, first, &vec![0.0; rows * l * d]);
        Ok(export)
    }

    /// Side of the latents: S / 8.
    pub fn latent_side(&self) -> usize {
        self.size / 8
    }

    /// A text-encoder request: one row per text (`[uncond; cond]` with guidance), each of
    /// exactly L ids.
    pub fn text_request(&self, ids: &[i64]) -> Vec<TensorData> {
        vec![ids_tensor(self.variant.input_ids, ids)]
    }

    /// A UNet request: every row gets `sample = cat[x, mask, masked latents]` and timestep `t`;
    /// `hidden` is the text encoder's output for the rows.
    pub fn unet_request(
        &self,
        x: &[f32],
        mask: &[f32],
        masked_latents: &[f32],
        t: usize,
        hidden: &[f32],
    ) -> Vec<TensorData> {
        let mut row = Vec::with_capacity(x.len() + mask.len() + masked_latents.len());
        row.extend_from_slice(x);
        row.extend_from_slice(mask);
        row.extend_from_slice(masked_latents);
        let sample = row.repeat(self.rows);
        let per_call = if self.variant.scalar_timestep {
            1
        } else {
            self.rows
        };
        let timestep = match self.variant.timestep {
            TimestepType::F32 => TensorData::F32(vec![t as f32; per_call]),
            TimestepType::I64 => TensorData::I64(vec![t as i64; per_call]),
            TimestepType::I32 => TensorData::I32(vec![t as i32; per_call]),
        };
        vec![
            TensorData::F32(sample),
            timestep,
            TensorData::F32(hidden.to_vec()),
        ]
    }

    /// The models, for warm-up and benchmarks.
    pub fn served(&self) -> Vec<&ServedModel> {
        vec![
            &self.text_encoder,
            &self.vae_encoder,
            &self.unet,
            &self.vae_decoder,
        ]
    }
}

fn ids_tensor(ty: IdType, ids: &[i64]) -> TensorData {
    match ty {
        IdType::I64 => TensorData::I64(ids.to_vec()),
        // Vocabularies are far below 2^31.
        IdType::I32 => TensorData::I32(ids.iter().map(|&id| id as i32).collect()),
    }
}
