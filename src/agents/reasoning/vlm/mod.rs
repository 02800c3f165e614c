//! Reasoning's `vlm` mode: a vision-language model (Qwen2-VL / Qwen2.5-VL in the split ONNX
//! layout, design §4.7b) looks at the image with the job's prompt and the saliency proposals and
//! writes the regions as JSON: box, category, correction instruction, and optionally the tool.
//!
//! One concern per module: [`spec`] (the bundle table), [`preprocess`] (image → patches),
//! [`template`] (the conversation), [`rope`] (M-RoPE positions), [`vision`] (the encoder behind
//! its batcher), [`decoder`] (prefill and decode step), [`scheduler`] (continuous batching across
//! jobs), [`answer`] (parsing and validation). [`Vlm::explain`] puts them together and returns
//! the regions with a [`VlmTrace`] for the diagnostics; a malformed answer returns no regions
//! and the caller falls back.

pub mod answer;
pub mod decoder;
pub mod preprocess;
pub mod rope;
pub mod scheduler;
pub mod spec;
pub mod template;
pub mod vision;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use image::{GrayImage, Luma, RgbImage};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use self::answer::{Answer, Rules};
use self::decoder::{DecoderModel, Prompt};
use self::preprocess::{preprocess, Unsupported, VisionInput};
use self::rope::{rope_index, Positions};
use self::scheduler::{Decoder, Scheduler, SchedulerSettings, SequenceRequest, StopReason};
use self::spec::{FallbackKind, VlmSpec};
use self::template::{to_space, Template, Values};
use self::vision::{ImageFeatures, VisionEncoder};
use super::components::connected_regions;
use super::Region;
use crate::agents::action::{JobContext, ToolName};
use crate::agents::{LoadContext, ModelInfo, ModelRole};
use crate::bundle::Bundle;
use crate::engine::batcher::Batcher;
use crate::engine::kv::KvLayout;
use crate::engine::tensor::Graph;
use crate::engine::{cpu_bound, load_session};
use crate::error::{ErrorClass, JobError};
use crate::imaging::{dilate, Map};

/// What the graphs look like, as read from the sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub grid_input: String,
    pub multi_image: bool,
    pub kv: KvLayout,
    pub hidden: usize,
}

/// Milliseconds of one VLM call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct VlmTimings {
    /// Resizing, patchifying, rendering and tokenizing the prompt.
    pub preprocess: f64,
    /// The vision encoder, its queue included.
    pub vision: f64,
    /// Waiting for a place in the decode batch.
    pub queue: f64,
    pub prefill: f64,
    /// From submission to the decoder to the first token.
    pub time_to_first_token: f64,
    /// The decode steps this sequence was part of.
    pub decode: f64,
    pub total: f64,
}

/// What the VLM did in one iteration, for `diagnostics.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VlmTrace {
    /// The saliency proposals shown to the model, `[x1, y1, x2, y2]` in input pixels.
    pub proposals: Vec<[u32; 4]>,
    /// `[width, height]` of the image the model saw (after smart resize).
    pub resized: Option<[u32; 2]>,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub generated_tokens: usize,
    pub stop_reason: Option<StopReason>,
    /// The generated text, the stop token left out.
    pub text: String,
    /// The parsed, validated answer: its error when malformed, kept regions with notes,
    /// dropped elements with reasons.
    pub answer: Option<Answer>,
    /// Why the image could not be shown to the model, when it could not.
    pub unsupported: Option<String>,
    /// What ran instead when the answer was malformed or the image unsupported.
    pub fallback: Option<FallbackKind>,
    /// Decode steps this sequence was part of, and the mean batch size of those steps.
    pub decode_steps: usize,
    pub mean_decode_batch: f64,
    pub timings_ms: VlmTimings,
}

/// A prompt and image ready for the models.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The rendered conversation (one image token).
    pub text: String,
    /// Token ids with the image token expanded.
    pub ids: Vec<i64>,
    pub vision: VisionInput,
    pub positions: Positions,
}

/// The model's reply to one prepared prompt.
#[derive(Debug, Clone)]
pub struct Reply {
    pub ids: Vec<u32>,
    pub text: String,
    pub answer: Answer,
    pub trace: VlmTrace,
}

/// The VLM, loaded.
pub struct Vlm {
    spec: VlmSpec,
    template: Template,
    tokenizer: Tokenizer,
    image_token: u32,
    vision_start: u32,
    stop_tokens: Vec<u32>,
    bundle: Arc<Bundle>,
    /// Every tool of the bundle (sorted), which an answer may name.
    tools: Vec<String>,
    vision: Batcher<VisionEncoder>,
    decoder: Decoder,
    pub layout: Layout,
    /// The decoder's batch limits.
    pub decoding: SchedulerSettings,
    pub info: ModelInfo,
}

/// The result of [`Vlm::explain`].
pub struct Explained {
    /// `None` when the answer was malformed or the image unsupported: fall back.
    pub regions: Option<Vec<Region>>,
    pub trace: VlmTrace,
}

fn token_id(tokenizer: &Tokenizer, key: &str, text: &str) -> anyhow::Result<u32> {
    tokenizer
        .token_to_id(text)
        .with_context(|| format!("reasoning.vlm.{key}: the tokenizer has no token {text:?}"))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn model_error(e: impl std::fmt::Display) -> JobError {
    JobError::new(ErrorClass::ModelError, e.to_string())
}

impl Vlm {
    pub fn load(ctx: &LoadContext, spec: &VlmSpec) -> anyhow::Result<Vlm> {
        let spec = spec.clone();
        let template = Template::parse(&spec.template, &spec.image_token)
            .map_err(|e| anyhow::anyhow!("reasoning.vlm.template: {e}"))?;
        let path = ctx.file(&spec.tokenizer)?;
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        let image_token = token_id(&tokenizer, "image_token", &spec.image_token)?;
        let vision_start = token_id(&tokenizer, "vision_start_token", &spec.vision_start_token)?;
        token_id(&tokenizer, "pad_token", &spec.pad_token)?;
        let stop_tokens = spec
            .stop_tokens
            .iter()
            .map(|t| token_id(&tokenizer, "stop_tokens", t))
            .collect::<anyhow::Result<Vec<_>>>()?;

        let graph = |file: &str| -> anyhow::Result<Graph> {
            Graph::new(load_session(&ctx.file(file)?, ctx.engine)?, file)
        };
        let row_len = 3 * (spec.temporal_patch_size * spec.patch_size * spec.patch_size) as usize;
        let encoder = VisionEncoder::new(graph(&spec.vision_encoder)?, row_len, spec.merge_size)?;
        let model = DecoderModel::new(graph(&spec.embed_tokens)?, graph(&spec.decoder)?)?;
        let layout = Layout {
            grid_input: encoder.grid_input.clone(),
            multi_image: encoder.multi_image,
            kv: model.kv,
            hidden: model.hidden,
        };
        let mut vision_settings = ctx.batch_settings(ModelRole::Vision);
        if !encoder.multi_image {
            vision_settings.max_batch_size = 1;
        }
        let vision = Batcher::spawn(
            ModelRole::Vision.as_str(),
            encoder,
            vision_settings,
            ctx.observer.clone(),
        );
        let batch = ctx.batch_settings(ModelRole::Decoder);
        let settings = SchedulerSettings {
            max_active: batch.max_batch_size,
            max_kv_bytes: ctx.kv_budget(ModelRole::Decoder),
            max_queue: batch.max_queue,
            retries: batch.retries,
            retry_backoff: batch.retry_backoff,
        };
        tracing::info!(
            layers = layout.kv.layers,
            kv_heads = layout.kv.kv_heads,
            head_dim = layout.kv.head_dim,
            kv_dtype = %layout.kv.ty,
            grid_input = %layout.grid_input,
            max_active = settings.max_active,
            max_kv_bytes = settings.max_kv_bytes,
            "VLM loaded"
        );
        let scheduler = Scheduler::new(
            ModelRole::Decoder.as_str(),
            model,
            settings,
            stop_tokens.clone(),
            ctx.observer.clone(),
        );
        let vlm = Vlm {
            template,
            tokenizer,
            image_token,
            vision_start,
            stop_tokens,
            tools: ctx.bundle.manifest.action.tools.keys().cloned().collect(),
            bundle: ctx.bundle.clone(),
            vision,
            decoder: Decoder::spawn(scheduler),
            decoding: settings,
            layout,
            info: ctx.info(&spec.decoder),
            spec,
        };
        // The template must put the image token right after the vision start token.
        let probe = RgbImage::new(56, 56);
        vlm.prepare(&probe, "", &[])
            .map_err(|e| anyhow::anyhow!("reasoning.vlm.template: {e}"))?;
        Ok(vlm)
    }

    pub fn spec(&self) -> &VlmSpec {
        &self.spec
    }

    /// Renders the conversation for an image, a job prompt and saliency proposals
    /// (`[x1, y1, x2, y2]`, input pixels), tokenizes it and pre-processes the image.
    pub fn prepare(
        &self,
        image: &RgbImage,
        prompt: &str,
        proposals: &[[u32; 4]],
    ) -> Result<Prepared, PrepareError> {
        let vision = preprocess(image, &self.spec)?;
        let input = image.dimensions();
        let (sw, sh) = self.spec.bbox_coordinates.size(input, vision.resized);
        let regions: Vec<[u32; 4]> = proposals
            .iter()
            .map(|&[x1, y1, x2, y2]| {
                [
                    to_space(x1, input.0, sw),
                    to_space(y1, input.1, sh),
                    to_space(x2, input.0, sw),
                    to_space(y2, input.1, sh),
                ]
            })
            .collect();
        let allowed: &[String] = if self.spec.allow_tool {
            &self.tools
        } else {
            &[]
        };
        let text = self.template.render(&Values {
            prompt,
            categories: &self.bundle.manifest.taxonomy.categories,
            tools: allowed,
            regions: &regions,
            width: sw,
            height: sh,
        });
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| PrepareError::Model(format!("tokenizing the prompt: {e}")))?;
        let tokens = vision.tokens(self.spec.merge_size);
        let mut ids = Vec::with_capacity(encoding.get_ids().len() + tokens);
        for &id in encoding.get_ids() {
            if id == self.image_token {
                ids.extend(std::iter::repeat_n(i64::from(id), tokens));
            } else {
                ids.push(i64::from(id));
            }
        }
        let positions = rope_index(
            &ids,
            i64::from(self.image_token),
            i64::from(self.vision_start),
            vision.grid,
            i64::from(self.spec.merge_size),
        )
        .map_err(PrepareError::Model)?;
        Ok(Prepared {
            text,
            ids,
            vision,
            positions,
        })
    }

    /// Image features of one pre-processed image (through the vision batcher).
    pub async fn encode(&self, vision: VisionInput) -> Result<ImageFeatures, JobError> {
        self.vision.submit(vision).await.map_err(model_error)
    }

    /// The decoder's input for a prepared prompt: its image encoded.
    pub async fn prompt(&self, prepared: Prepared) -> Result<Prompt, JobError> {
        let features = self.encode(prepared.vision).await?;
        Ok(Prompt {
            ids: prepared.ids,
            image_token: i64::from(self.image_token),
            features,
            positions: prepared.positions,
        })
    }

    /// Generates the answer to a prepared prompt (at most `max_new_tokens`, default the
    /// bundle's), decodes and validates it; `image` is the input's size.
    pub async fn generate(
        &self,
        prepared: Prepared,
        image: (u32, u32),
        label: String,
        max_new_tokens: Option<usize>,
    ) -> Result<Reply, JobError> {
        let started = Instant::now();
        let resized = prepared.vision.resized;
        let image_tokens = prepared.vision.tokens(self.spec.merge_size);
        let prompt = self.prompt(prepared).await?;
        let vision_ms = ms(started);
        let request = SequenceRequest {
            label,
            max_new_tokens: max_new_tokens.unwrap_or(self.spec.max_new_tokens),
            prompt,
        };
        let prompt_tokens = request.prompt.ids.len();
        let generation = self.decoder.generate(request).await.map_err(|failure| {
            let message = format!("model {}: {failure}", ModelRole::Decoder.as_str());
            if failure.transient {
                JobError::new(ErrorClass::ModelUnavailable, message)
            } else {
                model_error(message)
            }
        })?;
        let body = match generation.stop_reason {
            StopReason::StopToken => &generation.ids[..generation.ids.len().saturating_sub(1)],
            StopReason::MaxNewTokens => &generation.ids[..],
        };
        let text = self
            .tokenizer
            .decode(body, false)
            .map_err(|e| model_error(format!("decoding the VLM's answer: {e}")))?;
        let answer = answer::validate(
            &text,
            &Rules {
                categories: &self.bundle.manifest.taxonomy.categories,
                tools: &self.tools,
                allow_tool: self.spec.allow_tool,
                max_regions: self.bundle.manifest.reasoning.max_regions,
                coordinates: self.spec.bbox_coordinates,
                image,
                resized,
            },
        );
        let t = generation.timings;
        let trace = VlmTrace {
            resized: Some([resized.0, resized.1]),
            prompt_tokens,
            image_tokens,
            generated_tokens: generation.ids.len(),
            stop_reason: Some(generation.stop_reason),
            text: text.clone(),
            answer: Some(answer.clone()),
            decode_steps: generation.decode_steps,
            mean_decode_batch: generation.mean_batch,
            timings_ms: VlmTimings {
                vision: vision_ms,
                queue: t.queue,
                prefill: t.prefill,
                time_to_first_token: t.time_to_first_token,
                decode: t.decode,
                ..VlmTimings::default()
            },
            ..VlmTrace::default()
        };
        Ok(Reply {
            ids: generation.ids,
            text,
            answer,
            trace,
        })
    }

    /// Asks the model about the regions of `image` whose saliency exceeds `threshold`.
    pub async fn explain(
        &self,
        image: &RgbImage,
        saliency: &Map,
        threshold: f32,
        job: JobContext<'_>,
    ) -> Result<Explained, JobError> {
        let started = Instant::now();
        let reasoning = &self.bundle.manifest.reasoning;
        let proposals: Vec<[u32; 4]> = cpu_bound(|| {
            connected_regions(
                saliency,
                threshold,
                reasoning.min_region_pixels,
                reasoning.max_regions,
            )
            .into_iter()
            .map(|c| {
                let [x, y, w, h] = c.bbox;
                [x, y, x + w, y + h]
            })
            .collect()
        });
        let prepared = cpu_bound(|| self.prepare(image, job.prompt, &proposals));
        let preprocess_ms = ms(started);
        let prepared = match prepared {
            Ok(p) => p,
            Err(PrepareError::Unsupported(e)) => {
                return Ok(Explained {
                    regions: None,
                    trace: VlmTrace {
                        proposals,
                        unsupported: Some(e.to_string()),
                        timings_ms: VlmTimings {
                            preprocess: preprocess_ms,
                            total: ms(started),
                            ..VlmTimings::default()
                        },
                        ..VlmTrace::default()
                    },
                })
            }
            Err(PrepareError::Model(e)) => return Err(model_error(e)),
        };
        let label = format!("{}/{}", job.job_id, job.iteration);
        let reply = self
            .generate(prepared, image.dimensions(), label, None)
            .await?;
        let mut trace = reply.trace;
        trace.proposals = proposals;
        trace.timings_ms.preprocess = preprocess_ms;
        let regions = match reply.answer.error {
            Some(_) => None,
            None => Some(cpu_bound(|| {
                self.regions(&reply.answer, saliency, threshold)
            })),
        };
        trace.timings_ms.total = ms(started);
        Ok(Explained { regions, trace })
    }

    /// The answer's regions: each mask is its box ∩ the dilated saliency above τ (the box
    /// alone when that is empty); the tool is the one the answer named (validated) or the
    /// category's route.
    fn regions(&self, answer: &Answer, saliency: &Map, threshold: f32) -> Vec<Region> {
        let (w, h) = (saliency.width, saliency.height);
        let above = GrayImage::from_fn(w, h, |x, y| {
            let v = saliency
                .data
                .get((y * w + x) as usize)
                .copied()
                .unwrap_or(0.0);
            Luma([if v > threshold { 255 } else { 0 }])
        });
        let salient = dilate(&above, self.bundle.manifest.reasoning.dilate_pixels);
        answer
            .regions
            .iter()
            .enumerate()
            .map(|(id, r)| {
                // The validator clipped the box to the image, which the map has the size of.
                let [x1, y1, x2, y2] = r.bbox;
                let (x2, y2) = (x2.min(w), y2.min(h));
                let (x1, y1) = (x1.min(x2), y1.min(y2));
                let in_box = || (y1..y2).flat_map(move |y| (x1..x2).map(move |x| (x, y)));
                let mut mask = GrayImage::new(w, h);
                for (x, y) in in_box().filter(|&(x, y)| salient.get_pixel(x, y)[0] > 0) {
                    mask.put_pixel(x, y, Luma([255]));
                }
                if in_box().all(|(x, y)| mask.get_pixel(x, y)[0] == 0) {
                    for (x, y) in in_box() {
                        mask.put_pixel(x, y, Luma([255]));
                    }
                }
                // The perception agent's confidence: the highest saliency inside the mask.
                let score = in_box()
                    .filter(|&(x, y)| mask.get_pixel(x, y)[0] > 0)
                    .map(|(x, y)| {
                        saliency
                            .data
                            .get((y * w + x) as usize)
                            .copied()
                            .unwrap_or(0.0)
                    })
                    .fold(0.0f32, f32::max);
                let tool = r
                    .tool
                    .as_deref()
                    .and_then(|t| ToolName::parse(t).ok())
                    .unwrap_or_else(|| self.bundle.tool_for(&r.category));
                Region {
                    id,
                    category: r.category.clone(),
                    bbox: [x1, y1, x2.saturating_sub(x1), y2.saturating_sub(y1)],
                    score,
                    description: r.instruction.clone(),
                    tool,
                    mask,
                }
            })
            .collect()
    }

    /// Runs every graph once (a small image, two tokens) so a broken bundle fails at start and
    /// the first job is not slow.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        let image = RgbImage::from_pixel(56, 56, image::Rgb([128, 128, 128]));
        let prepared = self
            .prepare(&image, "warm up", &[[0, 0, 28, 28]])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.generate(prepared, (56, 56), "warm-up".into(), Some(2))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// The stop tokens' ids.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }
}

/// Why a prompt could not be prepared.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrepareError {
    /// The image cannot be shown to the model (too small, too elongated): a model outcome.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The bundle's template or tokenizer does not work (a bundle defect).
    #[error("{0}")]
    Model(String),
}
