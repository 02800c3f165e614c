//! The VLM's vision encoder behind a batcher: pre-processed images in, image features out (one
//! row per merged image token). Several images go into one call when the export's grid input
//! takes several rows (`[images, 3]`) and a probe at load shows that two images encoded together
//! give the features they give alone; otherwise (a grid fixed at `[1, 3]`, as in the test bundle
//! and traced exports) images are encoded one per call.

use anyhow::{bail, Context};

use super::preprocess::VisionInput;
use crate::engine::batcher::BatchModel;
use crate::engine::failure::ModelFailure;
use crate::engine::tensor::{Graph, HostTensor};

/// Feature rows of one image, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures {
    pub rows: usize,
    pub hidden: usize,
    pub values: Vec<f32>,
}

/// The vision encoder session and what was read from it.
pub struct VisionEncoder {
    graph: Graph,
    /// `image_grid_thw` (Qwen2.5-VL) or `grid_thw` (Qwen2-VL): the input that is not
    /// `pixel_values`.
    pub grid_input: String,
    output: String,
    /// Whether one call takes several images.
    pub multi_image: bool,
    merge: usize,
}

impl VisionEncoder {
    /// Reads the layout; `row_len` is `3 × temporal × patch²` from the bundle and must match
    /// the export's `pixel_values` width when it is fixed.
    pub fn new(graph: Graph, row_len: usize, merge: u32) -> anyhow::Result<VisionEncoder> {
        let pixels = graph.input("pixel_values")?;
        if pixels.shape.len() != 2 {
            bail!(
                "model {}: pixel_values has shape {:?}, expected [patches, {row_len}]",
                graph.name,
                pixels.shape
            );
        }
        if let Some(width) = pixels.dim(1) {
            if width as usize != row_len {
                bail!(
                    "model {} takes pixel rows of {width} values, but reasoning.vlm's \
                     patch_size and temporal_patch_size make {row_len}",
                    graph.name
                );
            }
        }
        let others: Vec<_> = graph
            .inputs
            .iter()
            .filter(|p| p.name != "pixel_values")
            .collect();
        let [grid] = others.as_slice() else {
            bail!(
                "model {} must have exactly one input besides pixel_values (the grid, \
                 image_grid_thw or grid_thw), has {:?}",
                graph.name,
                others.iter().map(|p| &p.name).collect::<Vec<_>>()
            );
        };
        if grid.shape.len() != 2 || grid.dim(1).is_some_and(|d| d != 3) {
            bail!(
                "model {}: grid input {} has shape {:?}, expected [images, 3]",
                graph.name,
                grid.name,
                grid.shape
            );
        }
        let output = match graph.outputs.as_slice() {
            [only] => only.name.clone(),
            _ => graph.output("image_features")?.name.clone(),
        };
        let (grid_input, several) = (grid.name.clone(), grid.dim(0) != Some(1));
        let mut encoder = VisionEncoder {
            grid_input,
            multi_image: false,
            output,
            merge: merge as usize,
            graph,
        };
        if several {
            encoder.multi_image = encoder.batches_faithfully(row_len);
        }
        Ok(encoder)
    }

    /// Whether two small images encoded in one call give the features each gives alone (an
    /// export may declare a dynamic grid and still be correct for one image only).
    fn batches_faithfully(&mut self, row_len: usize) -> bool {
        let m = self.merge as i64;
        let image = |h: i64, w: i64, seed: f32| {
            let patches = (h * w) as usize;
            VisionInput {
                pixel_values: (0..patches * row_len)
                    .map(|i| ((i as f32 * 0.618 + seed).fract() - 0.5) * 2.0)
                    .collect(),
                grid: [1, h, w],
                resized: (0, 0),
            }
        };
        let images = [image(2 * m, 2 * m, 0.1), image(2 * m, 3 * m, 0.7)];
        let together = self.encode(&images);
        let alone: anyhow::Result<Vec<ImageFeatures>> = images
            .iter()
            .map(|i| {
                self.encode(std::slice::from_ref(i))
                    .map(|mut f| f.remove(0))
            })
            .collect();
        let same = match (together, alone) {
            (Ok(a), Ok(b)) => a.iter().zip(&b).all(|(x, y)| {
                x.values.len() == y.values.len()
                    && x.values
                        .iter()
                        .zip(&y.values)
                        .all(|(p, q)| (p - q).abs() <= 1e-3 * (1.0 + q.abs()))
            }),
            _ => false,
        };
        if !same {
            tracing::warn!(
                model = %self.graph.name,
                "the vision encoder declares several images per call but does not encode them \
                 like one at a time: one image per call"
            );
        }
        same
    }

    /// Encodes the images in one call.
    fn encode(&mut self, images: &[VisionInput]) -> anyhow::Result<Vec<ImageFeatures>> {
        let row_len = images.first().map_or(0, VisionInput::row_len);
        let patches: usize = images.iter().map(VisionInput::patches).sum();
        let mut pixels = Vec::with_capacity(patches * row_len);
        let mut grid = Vec::with_capacity(3 * images.len());
        for image in images {
            pixels.extend_from_slice(&image.pixel_values);
            grid.extend_from_slice(&image.grid);
        }
        let pixels = HostTensor::f32(vec![patches as i64, row_len as i64], pixels);
        let grid = HostTensor::i64(vec![images.len() as i64, 3], grid);
        let inputs = [("pixel_values", &pixels), (self.grid_input.as_str(), &grid)];
        let output = self.output.clone();
        let outputs = self.graph.run(&inputs)?;
        let features = outputs.view(&output)?;
        let tokens: Vec<usize> = images
            .iter()
            .map(|i| i.patches() / (self.merge * self.merge))
            .collect();
        let total: usize = tokens.iter().sum();
        let (rows, hidden) = match features.shape {
            [rows, hidden] => (*rows as usize, *hidden as usize),
            other => bail!("{output} has shape {other:?}, expected [image tokens, hidden]"),
        };
        if rows != total {
            bail!("{output} has {rows} rows for {total} image tokens");
        }
        let mut out = Vec::with_capacity(images.len());
        let mut at = 0;
        for n in tokens {
            out.push(ImageFeatures {
                rows: n,
                hidden,
                values: features.values.to_f32(at * hidden..(at + n) * hidden),
            });
            at += n;
        }
        Ok(out)
    }
}

impl BatchModel for VisionEncoder {
    type Input = VisionInput;
    type Output = ImageFeatures;

    fn run(&mut self, inputs: &[VisionInput]) -> Result<Vec<ImageFeatures>, ModelFailure> {
        let result = if self.multi_image || inputs.len() <= 1 {
            self.encode(inputs)
        } else {
            inputs
                .chunks(1)
                .map(|one| self.encode(one).map(|mut f| f.remove(0)))
                .collect()
        };
        result
            .with_context(|| format!("vision encoder {}", self.graph.name))
            .map_err(|e| ModelFailure::of(&e))
    }
}
