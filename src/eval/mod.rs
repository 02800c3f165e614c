//! `retoucher eval` (design §4.8): how well a bundle finds and repairs known defects. Every
//! image of a manifest ([`manifest`]) runs through the same [`Executor`] as `run`, its result set
//! stored under `DIR/jobs/{id}/`; the loop's first perception pass, its repair and its harm are
//! scored against the ground truth ([`score`], [`metrics`]), and the figures go to
//! `report.json`, `report.html` ([`html`]) and one line per image to `cases.jsonl`.

pub mod html;
pub mod manifest;
pub mod metrics;
pub mod score;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use image::{GrayImage, RgbImage};
use serde::Serialize;

use crate::config::Settings;
use crate::diagnostics::layout;
use crate::execute::{Executor, JobSpec};
use crate::imaging::{self, ImageLimits};
use crate::job::JobOptions;
use crate::storage::Location;
use manifest::{Case, Manifest, Problem};
use score::{CaseScore, Evaluated, Figures, PixelScores, Tally};

/// Result sets go under `DIR/jobs/{id}/`.
const JOBS: &str = "jobs";
const GROUND_TRUTH: &str = "ground-truth.png";

/// What `eval` was asked to do.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub out: PathBuf,
    /// Images in flight at once (they share the model batchers).
    pub concurrency: usize,
}

/// The bundle that was evaluated.
#[derive(Debug, Clone, Serialize)]
pub struct BundleRef {
    pub name: String,
    pub version: String,
    pub path: String,
}

/// `report.json`, and what `--json` prints: the overall figures at the top level (`images`,
/// `localisation`, `restoration`, `harm`, `loop`), then `per_class`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub overall: Figures,
    pub per_class: BTreeMap<String, Figures>,
    pub bundle: BundleRef,
    pub manifest: String,
    /// Manifest lines or images that were not evaluated; `errors` says why.
    pub failed: usize,
    pub errors: Vec<Problem>,
    pub wall_seconds: f64,
}

impl Report {
    /// Whether every line of the manifest was evaluated.
    pub fn complete(&self) -> bool {
        self.failed == 0
    }
}

/// Runs and scores every image of the manifest (read with [`Manifest::load`] before the bundle
/// is loaded, so a bad path fails at once), writes the report files, and returns the report.
pub async fn evaluate(
    settings: &Settings,
    executor: Executor,
    manifest: Manifest,
    options: EvalOptions,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let source = manifest.path.display().to_string();
    for p in &manifest.problems {
        eprintln!("{source}:{}: {}", p.line, p.reason);
    }
    if manifest.cases.is_empty() {
        bail!(
            "{source}: no image to evaluate ({} lines refused)",
            manifest.problems.len()
        );
    }
    let jobs = options.out.join(JOBS);
    std::fs::create_dir_all(&jobs).with_context(|| format!("creating {}", jobs.display()))?;
    let tau = executor
        .loop_settings(&JobOptions::default())
        .saliency_threshold;
    let bundle = BundleRef {
        name: executor.agents.bundle.manifest.name.clone(),
        version: executor.agents.bundle.manifest.version.clone(),
        path: settings.models.bundle.display().to_string(),
    };

    let total = manifest.cases.len();
    let executor = Arc::new(executor);
    let limits = ImageLimits {
        max_bytes: settings.limits.max_image_bytes,
        max_pixels: settings.limits.max_image_pixels,
    };
    // Each image is its own task, as in `run`, so pre- and post-processing use every thread.
    let mut stream = futures_util::stream::iter(manifest.cases.iter().cloned().map(|case| {
        let executor = executor.clone();
        let jobs = jobs.clone();
        let (line, id) = (case.line, case.id.clone());
        let task =
            tokio::spawn(async move { evaluate_one(&executor, &jobs, case, tau, limits).await });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Problem {
                    line,
                    id: Some(id),
                    reason: format!("evaluation task: {e}"),
                })
            })
        }
    }))
    .buffer_unordered(options.concurrency.max(1));

    let mut tally = Tally::default();
    let mut errors = manifest.problems.clone();
    let mut done = 0;
    while let Some(result) = stream.next().await {
        done += 1;
        match result {
            Ok((case, pixels)) => {
                eprintln!("[{done}/{total}] {}", progress(&case));
                tally.add(case, pixels);
            }
            Err(p) => {
                eprintln!(
                    "[{done}/{total}] {}: not evaluated: {}",
                    p.id.as_deref().unwrap_or("?"),
                    p.reason
                );
                errors.push(p);
            }
        }
    }
    if tally.cases.is_empty() {
        bail!("{source}: no image could be evaluated");
    }
    errors.sort_by_key(|p| p.line);

    let (overall, per_class, cases) = tally.summarise(tau);
    let report = Report {
        overall: overall.figures.clone(),
        per_class: per_class
            .iter()
            .map(|(c, s)| (c.clone(), s.figures.clone()))
            .collect(),
        bundle,
        manifest: source,
        failed: errors.len(),
        errors,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    write_reports(
        &options.out,
        &report,
        &overall,
        &per_class,
        &cases,
        &manifest,
    )?;
    eprintln!(
        "{} images in {:.1} s, {} not evaluated; report: {}",
        report.overall.images,
        report.wall_seconds,
        report.failed,
        options.out.join("report.html").display()
    );
    Ok(report)
}

fn progress(c: &CaseScore) -> String {
    let class = c.class.as_deref().unwrap_or("no class");
    let found = if c.is_defect() {
        format!(
            "IoU {:.3}, {}/{} defects hit",
            c.iou.unwrap_or(0.0),
            c.defects_hit,
            c.defects
        )
    } else {
        format!(
            "{:.2}% above τ",
            c.false_positive_area.unwrap_or(0.0) * 100.0
        )
    };
    let repaired = match (c.psnr_in_mask_before, c.psnr_in_mask_after) {
        (Some(b), Some(a)) => format!(", PSNR in mask {b:.2} → {a:.2} dB"),
        _ => String::new(),
    };
    format!(
        "{} ({class}): {}, {} repair iterations, {found}{repaired}",
        c.id, c.status, c.iterations
    )
}

/// Runs one image through the executor and scores it.
async fn evaluate_one(
    executor: &Executor,
    jobs: &Path,
    case: Case,
    tau: f32,
    limits: ImageLimits,
) -> Result<(CaseScore, PixelScores), Problem> {
    let (line, id) = (case.line, case.id.clone());
    let problem = |reason: String| Problem {
        line,
        id: Some(id.clone()),
        reason,
    };
    let spec = JobSpec {
        job_id: case.id.clone(),
        image: Location::File(case.image.clone()),
        prompt: case.prompt.clone(),
        results: Location::File(jobs.to_path_buf()).join(&format!("{}/", case.id)),
        options: JobOptions::default(),
        metadata: Some(serde_json::json!({"eval": {"line": case.line, "class": case.class}})),
        attempt: 1,
        queue_ms: 0.0,
    };
    let report = executor
        .execute(&spec)
        .await
        .map_err(|e| problem(e.to_string()))?;
    let scored = tokio::task::spawn_blocking(move || {
        let input = read_rgb(&case.image, &limits)?;
        let truth = read_mask(&case.mask)?;
        let clean = case
            .clean
            .as_deref()
            .map(|p| read_rgb(p, &limits))
            .transpose()?;
        score::score(&Evaluated {
            id: &case.id,
            line: case.line,
            class: case.class.as_deref(),
            input: &input,
            truth: &truth,
            clean: clean.as_ref(),
            retouched: &report.retouched,
            diagnostics: &report.diagnostics,
            tau,
        })
    })
    .await;
    match scored {
        Ok(result) => result.map_err(problem),
        Err(e) => Err(problem(format!("scoring task: {e}"))),
    }
}

fn read_rgb(path: &Path, limits: &ImageLimits) -> Result<RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    imaging::decode(&bytes, limits)
        .map(|d| d.rgb)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read_mask(path: &Path) -> Result<GrayImage, String> {
    image::open(path)
        .map(|m| m.to_luma8())
        .map_err(|e| format!("reading the mask {}: {e}", path.display()))
}

/// `report.json`, `cases.jsonl`, the worst cases' input and ground-truth images, `report.html`.
fn write_reports(
    out: &Path,
    report: &Report,
    overall: &score::Summary,
    per_class: &BTreeMap<String, score::Summary>,
    cases: &[CaseScore],
    manifest: &Manifest,
) -> anyhow::Result<()> {
    let write = |name: &str, body: Vec<u8>| {
        let path = out.join(name);
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))
    };
    write("report.json", serde_json::to_vec_pretty(report)?)?;
    let mut lines = Vec::new();
    for c in cases {
        serde_json::to_writer(&mut lines, c)?;
        lines.push(b'\n');
    }
    write("cases.jsonl", lines)?;

    let by_id: BTreeMap<&str, &Case> = manifest.cases.iter().map(|c| (c.id.as_str(), c)).collect();
    let sections = html::worst(cases);
    let mut inputs = BTreeMap::new();
    for c in sections.iter().flat_map(|s| &s.rows) {
        let Some(case) = by_id.get(c.id.as_str()) else {
            continue;
        };
        if inputs.contains_key(&c.id) {
            continue;
        }
        let name = show_case(&out.join(JOBS).join(&c.id), case)
            .with_context(|| format!("writing the images of {}", c.id))?;
        inputs.insert(c.id.clone(), name);
    }
    let files = |c: &CaseScore| {
        let dir = format!("{JOBS}/{}", c.id);
        html::CaseFiles {
            input: format!("{dir}/{}", inputs.get(&c.id).map_or("", String::as_str)),
            ground_truth: format!("{dir}/{GROUND_TRUTH}"),
            saliency: format!("{dir}/{}", layout::saliency(0)),
            retouched: format!("{dir}/{}", layout::RETOUCHED),
        }
    };
    let page = html::render(report, overall, per_class, &sections, &files);
    write("report.html", page.into_bytes())
}

/// Copies a case's input next to its result set and draws its ground truth (the input with the
/// defects tinted); returns the input copy's file name.
fn show_case(dir: &Path, case: &Case) -> anyhow::Result<String> {
    let ext = case
        .image
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_else(|| "png".into());
    let name = format!("input.{ext}");
    std::fs::copy(&case.image, dir.join(&name))?;
    std::fs::write(dir.join(GROUND_TRUTH), ground_truth_png(case)?)?;
    Ok(name)
}

/// A case's ground truth as people look at it: its input with the defects tinted red (PNG).
pub fn ground_truth_png(case: &Case) -> anyhow::Result<Vec<u8>> {
    let image = image::open(&case.image)
        .with_context(|| format!("reading {}", case.image.display()))?
        .to_rgb8();
    let mask = image::open(&case.mask)
        .with_context(|| format!("reading {}", case.mask.display()))?
        .to_luma8();
    Ok(imaging::encode_png(&highlight(&image, &mask)))
}

/// The image with the pixels a mask marks (> 127, the ground truth's convention) tinted half
/// red; a mask of another size leaves the image as it is.
fn highlight(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let mut out = image.clone();
    if mask.dimensions() == image.dimensions() {
        for (p, m) in out.pixels_mut().zip(mask.pixels()) {
            if m[0] > 127 {
                p.0 = [p[0] / 2 + 128, p[1] / 2, p[2] / 2];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlight_tints_only_the_marked_pixels() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([100, 50, 255]));
        let mask = GrayImage::from_raw(2, 1, vec![128, 127]).unwrap();
        let out = highlight(&img, &mask);
        assert_eq!(out.get_pixel(0, 0).0, [178, 25, 127]);
        assert_eq!(out.get_pixel(1, 0).0, [100, 50, 255]);
        assert_eq!(highlight(&img, &GrayImage::new(1, 1)), img);
    }
}
