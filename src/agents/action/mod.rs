//! Action agent: repairs each region with the tool its category is routed to (or, when the
//! bundle allows it, the tool reasoning named), and composites the result back only inside the
//! region's (feathered) mask.
//!
//! Every tool sees the union of all regions as its hole, so no repair copies pixels from
//! another distorted region; composition then touches only the region's own mask, so pixels
//! outside every mask stay byte-for-byte equal to the input. The tools themselves are in
//! [`tool::REGISTRY`].

pub mod diffusion;
pub mod onnx_inpaint;
pub mod patchmatch;
pub mod tool;

use std::collections::BTreeMap;

use image::{imageops, GrayImage, RgbImage};

use super::reasoning::Region;
use super::{LoadContext, ModelInfo, ServedModel};
use crate::engine::cpu_bound;
use crate::error::{ErrorClass, JobError};
use crate::imaging::{composite, feather, grow_rect};

pub use tool::{JobContext, RepairInput, Tool, ToolName};

pub struct Action {
    /// The bundle's tools, loaded: every routed one, and every one with a table.
    tools: BTreeMap<ToolName, Box<dyn Tool>>,
    feather_pixels: u32,
}

impl Action {
    /// Loads every tool the bundle routes to or configures (`[action.tools.<name>]`).
    pub fn load(ctx: &LoadContext) -> anyhow::Result<Action> {
        let mut tools = BTreeMap::new();
        for name in Action::tool_names(ctx) {
            let tool = Action::load_tool(ctx, name)
                .map_err(|e| e.context(format!("loading tool {name}")))?;
            tools.insert(name, tool);
        }
        Ok(Action {
            tools,
            feather_pixels: ctx.bundle.manifest.reasoning.feather_pixels,
        })
    }

    /// The tools the bundle routes to or configures, in name order.
    pub fn tool_names(ctx: &LoadContext) -> Vec<ToolName> {
        let action = &ctx.bundle.manifest.action;
        let mut names: Vec<ToolName> = action.routing.values().copied().collect();
        names.push(action.default_tool);
        for name in action.tools.keys() {
            // Unknown names were refused when the bundle was loaded.
            names.extend(ToolName::parse(name).ok());
        }
        names.sort();
        names.dedup();
        names
    }

    /// Loads one tool from its `[action.tools.<name>]` table (`bundle check` loads each on its
    /// own, to report every tool that fails).
    pub fn load_tool(ctx: &LoadContext, name: ToolName) -> anyhow::Result<Box<dyn Tool>> {
        let spec = ctx.bundle.manifest.action.tools.get(name.as_str());
        (name.entry().load)(ctx, spec)
    }

    /// Whether the bundle has this tool loaded.
    pub fn has(&self, name: ToolName) -> bool {
        self.tools.contains_key(&name)
    }

    /// The batched models of every tool.
    pub fn served(&self) -> Vec<&ServedModel> {
        self.tools.values().flat_map(|t| t.served()).collect()
    }

    /// The model of each tool that has one, by tool name.
    pub fn models(&self) -> Vec<(ToolName, ModelInfo)> {
        self.tools
            .iter()
            .filter_map(|(name, tool)| tool.info().map(|info| (*name, info.clone())))
            .collect()
    }

    /// Repairs every region of `image`; returns the edited image.
    pub async fn apply(
        &self,
        image: &RgbImage,
        regions: &[Region],
        job: JobContext<'_>,
    ) -> Result<RgbImage, JobError> {
        if regions.is_empty() {
            return Ok(image.clone());
        }
        let holes = cpu_bound(|| union_of_masks(image.dimensions(), regions));
        // Repairs run concurrently (those of batched models batch together), then are
        // composited one after another.
        let repairs = regions
            .iter()
            .map(|region| self.repair(image, &holes, region, job));
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
        job: JobContext<'_>,
    ) -> Result<([u32; 4], RgbImage), JobError> {
        let tool = self.tools.get(&region.tool).ok_or_else(|| {
            JobError::new(
                ErrorClass::ModelError,
                format!("tool {} is not in this bundle", region.tool),
            )
        })?;
        let (w, h) = image.dimensions();
        let rect = grow_rect(region.bbox, tool.context(), w, h);
        let [x, y, cw, ch] = rect;
        let (crop, hole) = cpu_bound(|| {
            (
                imageops::crop_imm(image, x, y, cw, ch).to_image(),
                imageops::crop_imm(holes, x, y, cw, ch).to_image(),
            )
        });
        let patch = tool
            .repair(RepairInput {
                crop,
                hole,
                rect,
                region,
                job,
            })
            .await?;
        if patch.dimensions() != (cw, ch) {
            return Err(JobError::new(
                ErrorClass::Internal,
                format!(
                    "tool {} returned a {}x{} repair for a {cw}x{ch} crop",
                    region.tool,
                    patch.width(),
                    patch.height()
                ),
            ));
        }
        Ok((rect, patch))
    }
}

/// The union of every region's mask, image-sized (255 inside any region).
fn union_of_masks((w, h): (u32, u32), regions: &[Region]) -> GrayImage {
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
}
