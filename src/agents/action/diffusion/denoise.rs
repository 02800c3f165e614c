//! The denoising loop of one region: per timestep one UNet request (the CFG pair as one item
//! of two rows), guidance, and the scheduler's step. Each step awaits the UNet's batcher, so
//! the steps of every region of every job in flight are batched together.

use std::time::Instant;

use super::export::Export;
use super::scheduler::Scheduler;
use crate::error::{ErrorClass, JobError};
use crate::metrics::metrics;

/// What every step of a region is conditioned on.
pub struct Conditioning<'a> {
    /// [h, h], 1 = hole.
    pub mask: &'a [f32],
    /// [4, h, h], already × latent_scale.
    pub masked_latents: &'a [f32],
    /// The text encoder's output for the rows ([uncond; cond], or cond alone).
    pub hidden: &'a [f32],
}

/// Every intermediate array of one repair (flat, C order), for comparison with the reference.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// One row of `max_tokens` ids per text: `[uncond, cond]`, or `[cond]` without guidance.
    pub input_ids: Vec<Vec<i64>>,
    pub timesteps: Vec<usize>,
    pub init_noise_sigma: f64,
    pub noise: Vec<f32>,
    pub initial_latents: Vec<f32>,
    pub mask_latent: Vec<f32>,
    pub masked_image_latents: Vec<f32>,
    pub text_embeddings: Vec<f32>,
    pub steps: Vec<StepTrace>,
    /// The decoded image, [3, S, S] in [0, 1].
    pub decoded: Vec<f32>,
}

/// One denoising step.
#[derive(Debug, Clone)]
pub struct StepTrace {
    pub timestep: usize,
    /// The UNet's `x` (scaled latents).
    pub model_input: Vec<f32>,
    /// The guided noise prediction.
    pub eps: Vec<f32>,
    /// The latents after the step.
    pub latents: Vec<f32>,
}

/// Runs every step of `scheduler` from `latents`; returns the final latents.
pub async fn denoise(
    export: &Export,
    scheduler: &Scheduler,
    guidance_scale: f32,
    cond: Conditioning<'_>,
    mut latents: Vec<f32>,
    mut trace: Option<&mut Trace>,
) -> Result<Vec<f32>, JobError> {
    let internal = |e: anyhow::Error| JobError::new(ErrorClass::Internal, format!("{e:#}"));
    let m = metrics();
    let steps_total = m
        .diffusion_steps_total
        .with_label_values(&[scheduler.kind().as_str()]);
    for &t in scheduler.timesteps() {
        let started = Instant::now();
        let x = scheduler.scale_model_input(&latents, t).map_err(internal)?;
        let request = export.unet_request(&x, cond.mask, cond.masked_latents, t, cond.hidden);
        let out = export.unet.submit(request).await?;
        let eps = guide(out, export.rows, guidance_scale);
        latents = scheduler.step(&eps, t, &latents).map_err(internal)?;
        steps_total.inc();
        m.diffusion_step_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(trace) = trace.as_deref_mut() {
            trace.steps.push(StepTrace {
                timestep: t,
                model_input: x,
                eps,
                latents: latents.clone(),
            });
        }
    }
    Ok(latents)
}

/// Classifier-free guidance on the UNet's rows: `eu + g (ec - eu)` in f32 for `[uncond; cond]`,
/// the single row as it is otherwise.
fn guide(out: Vec<f32>, rows: usize, g: f32) -> Vec<f32> {
    if rows < 2 {
        return out;
    }
    let (uncond, cond) = out.split_at(out.len() / 2);
    uncond
        .iter()
        .zip(cond)
        .map(|(&u, &c)| u + g * (c - u))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_moves_from_the_unconditional_row_towards_the_conditional_one() {
        assert_eq!(guide(vec![1.0, 2.0, 3.0, 6.0], 2, 7.5), vec![16.0, 32.0]);
        assert_eq!(guide(vec![1.0, 2.0, 3.0, 6.0], 2, 1.0), vec![3.0, 6.0]);
        assert_eq!(guide(vec![3.0, 6.0], 1, 7.5), vec![3.0, 6.0]);
    }
}
