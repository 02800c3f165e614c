//! From one evaluated image to its figures ([`CaseScore`]), and from all of them to the
//! report's figures, overall and per class ([`Figures`], design §4.8). The metrics themselves
//! are in [`super::metrics`]; this module says which pixels and which images each is taken over:
//!
//! - localisation, on the first perception pass (the map at the image's size, before any
//!   repair): `auc` over every pixel of the images considered (defect-free images add
//!   negatives); `iou` pooled over defect images, Σ|S>τ ∩ M| / Σ|S>τ ∪ M|; `recall` over the
//!   ground-truth defects (8-connected components of the mask) of all defect images;
//!   `false_positive_area` the mean share of pixels above τ on defect-free images;
//! - restoration, on defect images with a `clean` image: per-image PSNR (capped at
//!   [`PSNR_CAP_DB`]) and SSIM inside the mask against `clean`, before (the input) and after
//!   (the retouched image), averaged over images;
//! - harm: `outside_mask_changed_pixels` summed over images (pixels changed outside the union
//!   of every repair mask of every iteration), `worse_share` the share of images with `clean`
//!   whose whole-image MSE against it went up;
//! - loop: repair iterations (perception passes that repaired something), the share of images
//!   left `clean`, the share whose last pass had nothing above τ, and mean stage times.

use std::collections::BTreeMap;

use image::{GrayImage, RgbImage};
use serde::Serialize;

use super::metrics::{self, Overlap, PSNR_CAP_DB};
use crate::diagnostics::{Diagnostics, JobStatus};
use crate::pipeline::Retouched;

/// Points per kind of pixel on the drawn ROC curves.
const ROC_STEPS: usize = 200;

/// Everything one image contributes, also written to `cases.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct CaseScore {
    pub id: String,
    pub line: usize,
    pub class: Option<String>,
    pub defect_pixels: u64,
    /// This image's own pixel AUC (defect images).
    pub auc: Option<f64>,
    pub iou: Option<f64>,
    pub defects: usize,
    pub defects_hit: usize,
    /// Share above τ (defect-free images).
    pub false_positive_area: Option<f64>,
    pub psnr_in_mask_before: Option<f64>,
    pub psnr_in_mask_after: Option<f64>,
    pub ssim_in_mask_before: Option<f64>,
    pub ssim_in_mask_after: Option<f64>,
    /// Whole-image mean squared error against `clean`, before and after.
    pub mse_before: Option<f64>,
    pub mse_after: Option<f64>,
    pub worse: Option<bool>,
    pub outside_mask_changed_pixels: u64,
    pub iterations: usize,
    pub status: JobStatus,
    pub converged: bool,
    pub stage_ms: StageMs,
    #[serde(skip)]
    pub overlap: Overlap,
}

impl CaseScore {
    pub fn is_defect(&self) -> bool {
        self.defect_pixels > 0
    }
}

/// The first pass's saliency of one image's pixels, by ground truth, sorted ascending.
#[derive(Debug, Default)]
pub struct PixelScores {
    pub defect: Vec<f32>,
    pub other: Vec<f32>,
}

/// What scoring one image needs.
pub struct Evaluated<'a> {
    pub id: &'a str,
    pub line: usize,
    pub class: Option<&'a str>,
    pub input: &'a RgbImage,
    /// Ground truth as read: > 127 = defect.
    pub truth: &'a GrayImage,
    pub clean: Option<&'a RgbImage>,
    pub retouched: &'a Retouched,
    pub diagnostics: &'a Diagnostics,
    pub tau: f32,
}

/// Scores one image; an error names what does not fit (sizes, a missing perception pass).
pub fn score(e: &Evaluated) -> Result<(CaseScore, PixelScores), String> {
    let (w, h) = e.input.dimensions();
    let n = (w as usize) * (h as usize);
    if e.truth.dimensions() != (w, h) {
        return Err(format!(
            "the mask is {}x{}, the image {w}x{h}",
            e.truth.width(),
            e.truth.height()
        ));
    }
    if let Some(clean) = e.clean.filter(|c| c.dimensions() != (w, h)) {
        return Err(format!(
            "the clean image is {}x{}, the image {w}x{h}",
            clean.width(),
            clean.height()
        ));
    }
    let first = e
        .retouched
        .iterations
        .first()
        .ok_or("the loop made no perception pass")?;
    let map = &first.saliency_map;
    if map.data.len() != n {
        return Err(format!(
            "the saliency map is {}x{}, the image {w}x{h}",
            map.width, map.height
        ));
    }
    let defect: Vec<bool> = e.truth.as_raw().iter().map(|&v| v > 127).collect();
    let defect_pixels = defect.iter().filter(|d| **d).count() as u64;
    let is_defect = defect_pixels > 0;

    let mut pixels = PixelScores::default();
    for (&s, &d) in map.data.iter().zip(&defect) {
        // NaN is never salient in the loop; here it scores lowest.
        let s = if s.is_nan() { 0.0 } else { s };
        if d {
            pixels.defect.push(s);
        } else {
            pixels.other.push(s);
        }
    }
    metrics::sort_scores(&mut pixels.defect);
    metrics::sort_scores(&mut pixels.other);

    let overlap = metrics::overlap(&map.data, &defect, e.tau);
    let (defects, defects_hit) = if is_defect {
        metrics::defects_hit(&defect, map, e.tau)
    } else {
        (0, 0)
    };

    let image = &e.retouched.image;
    let in_mask = |a: &RgbImage, b: &RgbImage| {
        let psnr = metrics::mse(a, b, Some(&defect)).map(|m| capped(metrics::psnr(m)));
        (psnr, metrics::ssim_within(a, b, &defect))
    };
    let (before, after) = match e.clean.filter(|_| is_defect) {
        Some(clean) => (in_mask(e.input, clean), in_mask(image, clean)),
        None => ((None, None), (None, None)),
    };
    let mse_before = e.clean.and_then(|c| metrics::mse(e.input, c, None));
    let mse_after = e.clean.and_then(|c| metrics::mse(image, c, None));

    let masks: Vec<&GrayImage> = e.retouched.masks().map(|(_, _, m)| m).collect();
    let allowed = metrics::union_of(&masks, n);
    let d = e.diagnostics;
    let last_max = d.iterations.last().map_or(0.0, |i| i.saliency.max);
    Ok((
        CaseScore {
            id: e.id.to_string(),
            line: e.line,
            class: e.class.map(str::to_string),
            defect_pixels,
            auc: metrics::auc(&pixels.defect, &pixels.other),
            iou: if is_defect { overlap.iou() } else { None },
            defects,
            defects_hit,
            false_positive_area: (!is_defect).then(|| overlap.above_share()),
            psnr_in_mask_before: before.0,
            psnr_in_mask_after: after.0,
            ssim_in_mask_before: before.1,
            ssim_in_mask_after: after.1,
            mse_before,
            mse_after,
            worse: mse_before.zip(mse_after).map(|(b, a)| a > b),
            outside_mask_changed_pixels: metrics::changed_outside(e.input, image, &allowed),
            iterations: d
                .iterations
                .iter()
                .filter(|i| !i.regions.is_empty())
                .count(),
            status: d.status,
            converged: last_max <= e.tau,
            stage_ms: StageMs {
                perception: d.timings_ms.perception,
                reasoning: d.timings_ms.reasoning,
                action: d.timings_ms.action,
                total: d.timings_ms.total,
            },
            overlap,
        },
        pixels,
    ))
}

fn capped(psnr: f64) -> f64 {
    psnr.min(PSNR_CAP_DB)
}

/// Milliseconds per stage of one job, or their means.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct StageMs {
    pub perception: f64,
    pub reasoning: f64,
    pub action: f64,
    /// The whole job: fetch, decode, the loop, encode and store.
    pub total: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Localisation {
    pub auc: Option<f64>,
    pub iou: Option<f64>,
    pub recall: Option<f64>,
    pub false_positive_area: Option<f64>,
    /// τ: saliency above it counts as a detection.
    pub threshold: f32,
    pub defect_images: usize,
    /// Ground-truth defects (connected components) that `recall` is over.
    pub defects: usize,
    pub defect_free_images: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Restoration {
    pub psnr_in_mask_before: Option<f64>,
    pub psnr_in_mask_after: Option<f64>,
    pub ssim_in_mask_before: Option<f64>,
    pub ssim_in_mask_after: Option<f64>,
    /// Defect images with a `clean` image (what the means are over).
    pub images: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Harm {
    pub outside_mask_changed_pixels: u64,
    pub worse_share: Option<f64>,
    pub worse_images: usize,
    /// Images with a `clean` image (what `worse_share` is over).
    pub images_with_clean: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoopFigures {
    /// Mean repair iterations per image.
    pub mean_iterations: f64,
    /// Share of images that came back `clean` (nothing repaired).
    pub clean_share: f64,
    /// Share of images whose last perception pass had no pixel above τ.
    pub converged_share: f64,
    /// Mean milliseconds per image (they include waiting for shared model batches).
    pub stage_ms: StageMs,
}

/// The figures of a set of images: all of them, or one class.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figures {
    pub images: usize,
    pub localisation: Localisation,
    pub restoration: Restoration,
    pub harm: Harm,
    #[serde(rename = "loop")]
    pub loop_figures: LoopFigures,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// The figures of `cases`, whose first-pass pixels are `pixels` (sorted).
pub fn figures(cases: &[&CaseScore], pixels: &PixelScores, tau: f32) -> Figures {
    let defect: Vec<&&CaseScore> = cases.iter().filter(|c| c.is_defect()).collect();
    let free: Vec<&&CaseScore> = cases.iter().filter(|c| !c.is_defect()).collect();
    let (inter, union) = defect.iter().fold((0u64, 0u64), |(i, u), c| {
        (i + c.overlap.intersection, u + c.overlap.union)
    });
    let defects: usize = defect.iter().map(|c| c.defects).sum();
    let hit: usize = defect.iter().map(|c| c.defects_hit).sum();
    let restored: Vec<&&CaseScore> = defect
        .iter()
        .copied()
        .filter(|c| c.psnr_in_mask_before.is_some())
        .collect();
    let with_clean: Vec<&&CaseScore> = cases.iter().filter(|c| c.worse.is_some()).collect();
    let worse = with_clean.iter().filter(|c| c.worse == Some(true)).count();
    let n = cases.len().max(1) as f64;
    let stage = |f: fn(&StageMs) -> f64| cases.iter().map(|c| f(&c.stage_ms)).sum::<f64>() / n;
    Figures {
        images: cases.len(),
        localisation: Localisation {
            auc: metrics::auc(&pixels.defect, &pixels.other),
            iou: (union > 0).then(|| inter as f64 / union as f64),
            recall: (defects > 0).then(|| hit as f64 / defects as f64),
            false_positive_area: mean(free.iter().filter_map(|c| c.false_positive_area)),
            threshold: tau,
            defect_images: defect.len(),
            defects,
            defect_free_images: free.len(),
        },
        restoration: Restoration {
            psnr_in_mask_before: mean(restored.iter().filter_map(|c| c.psnr_in_mask_before)),
            psnr_in_mask_after: mean(restored.iter().filter_map(|c| c.psnr_in_mask_after)),
            ssim_in_mask_before: mean(restored.iter().filter_map(|c| c.ssim_in_mask_before)),
            ssim_in_mask_after: mean(restored.iter().filter_map(|c| c.ssim_in_mask_after)),
            images: restored.len(),
        },
        harm: Harm {
            outside_mask_changed_pixels: cases.iter().map(|c| c.outside_mask_changed_pixels).sum(),
            worse_share: (!with_clean.is_empty()).then(|| worse as f64 / with_clean.len() as f64),
            worse_images: worse,
            images_with_clean: with_clean.len(),
        },
        loop_figures: LoopFigures {
            mean_iterations: cases.iter().map(|c| c.iterations as f64).sum::<f64>() / n,
            clean_share: cases
                .iter()
                .filter(|c| c.status == JobStatus::Clean)
                .count() as f64
                / n,
            converged_share: cases.iter().filter(|c| c.converged).count() as f64 / n,
            stage_ms: StageMs {
                perception: stage(|s| s.perception),
                reasoning: stage(|s| s.reasoning),
                action: stage(|s| s.action),
                total: stage(|s| s.total),
            },
        },
    }
}

/// ROC points of a set of pixels, for the report's chart.
pub fn roc(pixels: &PixelScores) -> Vec<(f64, f64)> {
    metrics::roc(&pixels.defect, &pixels.other, ROC_STEPS)
}

/// The scored images, with their pixels pooled by class as they arrive (so memory holds one
/// f32 per pixel, not one per pixel and image kept aside).
#[derive(Default)]
pub struct Tally {
    pub cases: Vec<CaseScore>,
    /// By class; images without a class under `None`.
    pixels: BTreeMap<Option<String>, PixelScores>,
}

/// Figures and ROC points of one set of images.
pub struct Summary {
    pub figures: Figures,
    pub roc: Vec<(f64, f64)>,
}

impl Tally {
    pub fn add(&mut self, case: CaseScore, pixels: PixelScores) {
        let pool = self.pixels.entry(case.class.clone()).or_default();
        pool.defect.extend(pixels.defect);
        pool.other.extend(pixels.other);
        self.cases.push(case);
    }

    /// Overall and per-class summaries (classes in name order).
    pub fn summarise(mut self, tau: f32) -> (Summary, BTreeMap<String, Summary>, Vec<CaseScore>) {
        let mut all = PixelScores::default();
        for pool in self.pixels.values_mut() {
            metrics::sort_scores(&mut pool.defect);
            metrics::sort_scores(&mut pool.other);
            all.defect.extend_from_slice(&pool.defect);
            all.other.extend_from_slice(&pool.other);
        }
        metrics::sort_scores(&mut all.defect);
        metrics::sort_scores(&mut all.other);
        let every: Vec<&CaseScore> = self.cases.iter().collect();
        let overall = Summary {
            figures: figures(&every, &all, tau),
            roc: roc(&all),
        };
        drop(all);
        let mut per_class = BTreeMap::new();
        for (class, pool) in &self.pixels {
            let Some(class) = class else { continue };
            let cases: Vec<&CaseScore> = self
                .cases
                .iter()
                .filter(|c| c.class.as_ref() == Some(class))
                .collect();
            per_class.insert(
                class.clone(),
                Summary {
                    figures: figures(&cases, pool, tau),
                    roc: roc(pool),
                },
            );
        }
        self.cases.sort_by_key(|c| c.line);
        (overall, per_class, self.cases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::{
        InputInfo, IterationInfo, JobTimings, LoopInfo, OutputInfo, SaliencyInfo, WorkerInfo,
    };
    use crate::imaging::Map;
    use crate::pipeline::{Iteration, SaliencyStats, StageTimings};
    use image::{Luma, Rgb};

    fn diagnostics(status: JobStatus, passes: &[(f32, usize)]) -> Diagnostics {
        Diagnostics {
            job_id: "j".into(),
            status,
            attempt: 1,
            input: InputInfo {
                uri: String::new(),
                width: 4,
                height: 1,
                format: "png".into(),
                sha256: String::new(),
            },
            output: OutputInfo { uri: String::new() },
            settings: LoopInfo {
                max_iterations: 3,
                saliency_threshold: 0.5,
                diffusion_steps: None,
            },
            iterations: passes
                .iter()
                .enumerate()
                .map(|(index, &(max, regions))| IterationInfo {
                    index,
                    saliency: SaliencyInfo {
                        max,
                        mean: 0.0,
                        area_above_threshold: 0.0,
                        map: String::new(),
                    },
                    regions: (0..regions)
                        .map(|id| crate::diagnostics::RegionInfo {
                            id,
                            category: "blur".into(),
                            bbox: [0, 0, 1, 1],
                            score: 1.0,
                            description: String::new(),
                            tool: "patchmatch".into(),
                            mask: String::new(),
                        })
                        .collect(),
                    vlm: None,
                    timings_ms: StageTimings::default(),
                })
                .collect(),
            models: BTreeMap::new(),
            timings_ms: JobTimings {
                perception: 10.0,
                total: 40.0,
                ..JobTimings::default()
            },
            worker: WorkerInfo::current(),
            metadata: None,
        }
    }

    /// A 4x1 image whose pixel 1 is a defect; the loop repaired pixel 1 (mask) exactly.
    #[test]
    fn one_image_scored_by_hand() {
        let clean = RgbImage::from_fn(4, 1, |_, _| Rgb([100, 100, 100]));
        let mut input = clean.clone();
        input.put_pixel(1, 0, Rgb([160, 100, 100]));
        let mut after = clean.clone();
        after.put_pixel(1, 0, Rgb([110, 100, 100]));
        let truth = GrayImage::from_raw(4, 1, vec![0, 255, 0, 0]).unwrap();
        let saliency = Map {
            width: 4,
            height: 1,
            data: vec![0.2, 0.9, 0.6, 0.1],
        };
        let mut mask = GrayImage::new(4, 1);
        mask.put_pixel(1, 0, Luma([255]));
        let retouched = Retouched {
            image: after,
            iterations: vec![Iteration {
                index: 0,
                saliency: SaliencyStats {
                    max: 0.9,
                    mean: 0.45,
                    area_above_threshold: 0.5,
                },
                saliency_map: saliency,
                regions: vec![crate::agents::reasoning::Region {
                    id: 0,
                    category: "blur".into(),
                    bbox: [1, 0, 1, 1],
                    score: 1.0,
                    description: String::new(),
                    tool: crate::agents::action::ToolName::parse("patchmatch").unwrap(),
                    mask,
                }],
                vlm: None,
                timings_ms: StageTimings::default(),
            }],
            timings_ms: StageTimings::default(),
        };
        let d = diagnostics(JobStatus::Retouched, &[(0.9, 1), (0.3, 0)]);
        let e = Evaluated {
            id: "a",
            line: 1,
            class: Some("blur"),
            input: &input,
            truth: &truth,
            clean: Some(&clean),
            retouched: &retouched,
            diagnostics: &d,
            tau: 0.5,
        };
        let (case, pixels) = score(&e).unwrap();
        assert_eq!(pixels.defect, [0.9]);
        assert_eq!(pixels.other, [0.1, 0.2, 0.6]);
        assert_eq!(case.auc, Some(1.0));
        // Above τ: pixels 1 and 2; defect: 1 → IoU 1/2, the one defect hit.
        assert_eq!(case.iou, Some(0.5));
        assert_eq!((case.defects, case.defects_hit), (1, 1));
        assert_eq!(case.false_positive_area, None);
        // In the mask: error 60 in one channel before (MSE 1200), 10 after (MSE 100/3).
        let before = 10.0 * (65025.0f64 / 1200.0).log10();
        let after = 10.0 * (65025.0f64 / (100.0 / 3.0)).log10();
        assert!((case.psnr_in_mask_before.unwrap() - before).abs() < 1e-9);
        assert!((case.psnr_in_mask_after.unwrap() - after).abs() < 1e-9);
        assert!(case.ssim_in_mask_after.unwrap() > case.ssim_in_mask_before.unwrap());
        assert_eq!(case.worse, Some(false));
        assert_eq!(case.outside_mask_changed_pixels, 0);
        assert_eq!(case.iterations, 1);
        assert!(case.converged);

        // The same image, but the repair also touched pixel 3, outside every mask.
        let mut spilled = retouched.clone();
        spilled.image.put_pixel(3, 0, Rgb([0, 0, 0]));
        let (case2, _) = score(&Evaluated {
            retouched: &spilled,
            ..e
        })
        .unwrap();
        assert_eq!(case2.outside_mask_changed_pixels, 1);
        assert_eq!(case2.worse, Some(true));

        // A mask of another size is an error, not a figure.
        let small = GrayImage::new(2, 1);
        let err = score(&Evaluated { truth: &small, ..e }).unwrap_err();
        assert!(err.contains("the mask is 2x1, the image 4x1"), "{err}");
    }

    fn case(class: &str, defect: bool, overlap: Overlap, worse: bool) -> CaseScore {
        CaseScore {
            id: class.into(),
            line: 1,
            class: Some(class.into()),
            defect_pixels: u64::from(defect),
            auc: None,
            iou: None,
            defects: usize::from(defect) * 2,
            defects_hit: usize::from(defect),
            false_positive_area: (!defect).then(|| overlap.above_share()),
            psnr_in_mask_before: defect.then_some(20.0),
            psnr_in_mask_after: defect.then_some(30.0),
            ssim_in_mask_before: defect.then_some(0.5),
            ssim_in_mask_after: defect.then_some(0.7),
            mse_before: Some(1.0),
            mse_after: Some(if worse { 2.0 } else { 0.5 }),
            worse: Some(worse),
            outside_mask_changed_pixels: 0,
            iterations: usize::from(defect),
            status: if defect {
                JobStatus::Retouched
            } else {
                JobStatus::Clean
            },
            converged: true,
            stage_ms: StageMs::default(),
            overlap,
        }
    }

    #[test]
    fn figures_pool_iou_and_recall_and_average_the_rest() {
        let o = |intersection, union, above| Overlap {
            intersection,
            union,
            above,
            pixels: 100,
        };
        let a = case("blur", true, o(10, 40, 20), false);
        let b = case("blur", true, o(30, 40, 35), false);
        let c = case("none", false, o(0, 5, 5), true);
        let d = case("none", false, o(0, 15, 15), false);
        let pixels = PixelScores {
            defect: vec![0.5, 0.9],
            other: vec![0.1, 0.5],
        };
        let f = figures(&[&a, &b, &c, &d], &pixels, 0.5);
        // Pooled: (10 + 30) / (40 + 40), not the mean of 0.25 and 0.75.
        assert_eq!(f.localisation.iou, Some(0.5));
        assert_eq!(f.localisation.recall, Some(0.5));
        assert_eq!(f.localisation.defects, 4);
        assert_eq!(f.localisation.false_positive_area, Some(0.1));
        // Pairs: 0.5 vs {0.1, 0.5} = 1.5, 0.9 vs both = 2 → 3.5 / 4.
        assert_eq!(f.localisation.auc, Some(0.875));
        assert_eq!(f.restoration.images, 2);
        assert_eq!(f.restoration.psnr_in_mask_after, Some(30.0));
        assert_eq!(f.harm.worse_share, Some(0.25));
        assert_eq!(f.loop_figures.mean_iterations, 0.5);
        assert_eq!(f.loop_figures.clean_share, 0.5);
        // The defect-free class has no restoration or IoU figures, only a false-alarm area.
        let none = figures(&[&c, &d], &PixelScores::default(), 0.5);
        assert_eq!(none.localisation.iou, None);
        assert_eq!(none.localisation.auc, None);
        assert_eq!(none.restoration.psnr_in_mask_before, None);
        assert_eq!(none.localisation.false_positive_area, Some(0.1));
    }
}
