//! `retoucher run`: the embedded default. Processes local images, folders of images, JSONL
//! files of jobs or evaluation manifests (design §4.8) with the same pipeline and result layout
//! as the worker, with no broker or S3, and writes an `index.html` contact sheet (original |
//! ground truth, when the job came from a manifest | saliency | retouched, per job).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use futures_util::StreamExt;

use crate::config::Settings;
use crate::diagnostics::layout;
use crate::error::{ErrorClass, JobError};
use crate::eval::manifest::{Case, Manifest};
use crate::execute::{Executor, JobReport, JobSpec};
use crate::job::{validate_job_id, JobMessage, JobOptions};
use crate::storage::Location;

/// What `run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub inputs: Vec<PathBuf>,
    /// Evaluation manifests: each line is a job (its id, image and prompt) with a ground truth.
    pub manifests: Vec<PathBuf>,
    pub out: PathBuf,
    /// Prompt for inputs that are plain images (JSONL jobs carry their own).
    pub prompt: String,
    pub concurrency: usize,
    pub options: JobOptions,
}

/// One local job before it runs.
#[derive(Debug, Clone)]
struct LocalJob {
    job_id: String,
    image: PathBuf,
    prompt: String,
    options: JobOptions,
    metadata: Option<serde_json::Value>,
    /// The manifest line it came from, whose mask is the ground truth.
    case: Option<Case>,
}

/// One job's line in the summary and the contact sheet.
#[derive(Debug)]
pub struct JobLine {
    pub job_id: String,
    pub prompt: String,
    pub input_name: Option<String>,
    /// File name of the ground-truth picture next to the result set, when the job has one.
    pub ground_truth: Option<String>,
    pub result: Result<JobReport, JobError>,
}

/// Everything `run` did.
pub struct RunSummary {
    pub jobs: Vec<JobLine>,
    pub sheet: PathBuf,
    /// Input lines that were not valid jobs (source, reason).
    pub rejected: Vec<(String, String)>,
}

impl RunSummary {
    pub fn failed(&self) -> usize {
        self.jobs.iter().filter(|j| j.result.is_err()).count() + self.rejected.len()
    }
}

/// An input line that was not a valid job: (source `file:line`, reason).
type Rejected = (String, String);

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// The ground truth drawn next to a job's result set.
const GROUND_TRUTH: &str = "ground-truth.png";

/// A job id from a file name: the stem with anything outside `[A-Za-z0-9._-]` replaced.
fn job_id_for(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut id: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        id = "image".to_string();
    }
    id
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Expands the inputs into jobs: JSONL files, folders of images, single images.
fn collect_jobs(
    options: &RunOptions,
    settings: &Settings,
) -> anyhow::Result<(Vec<LocalJob>, Vec<Rejected>)> {
    let mut jobs = Vec::new();
    let mut rejected = Vec::new();
    let plain = |path: PathBuf| LocalJob {
        job_id: job_id_for(&path),
        image: path,
        prompt: options.prompt.clone(),
        options: options.options,
        metadata: None,
        case: None,
    };
    for path in &options.manifests {
        let manifest = Manifest::load(path, settings.limits.max_prompt_bytes)?;
        rejected.extend(
            manifest
                .problems
                .into_iter()
                .map(|p| (format!("{}:{}", path.display(), p.line), p.reason)),
        );
        jobs.extend(manifest.cases.into_iter().map(|case| {
            LocalJob {
                job_id: case.id.clone(),
                image: case.image.clone(),
                prompt: case.prompt.clone(),
                options: options.options,
                metadata: case
                    .class
                    .as_ref()
                    .map(|c| serde_json::json!({ "class": c })),
                case: Some(case),
            }
        }));
    }
    for input in &options.inputs {
        if input.is_dir() {
            let mut images: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("reading folder {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            images.sort();
            if images.is_empty() {
                bail!("folder {} has no .png/.jpg/.jpeg images", input.display());
            }
            jobs.extend(images.into_iter().map(plain));
        } else if input.extension().is_some_and(|e| e == "jsonl") {
            let text = std::fs::read_to_string(input)
                .with_context(|| format!("reading {}", input.display()))?;
            let base = input.parent().unwrap_or(Path::new("."));
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let source = format!("{}:{}", input.display(), n + 1);
                match JobMessage::parse(line.as_bytes(), &settings.limits) {
                    Ok(m) => {
                        let mut job_options = m.options;
                        // Command-line options win over the file's.
                        if options.options.max_iterations.is_some() {
                            job_options.max_iterations = options.options.max_iterations;
                        }
                        if options.options.saliency_threshold.is_some() {
                            job_options.saliency_threshold = options.options.saliency_threshold;
                        }
                        if options.options.diffusion_steps.is_some() {
                            job_options.diffusion_steps = options.options.diffusion_steps;
                        }
                        jobs.push(LocalJob {
                            job_id: m.job_id,
                            image: base.join(&m.image),
                            prompt: m.prompt,
                            options: job_options,
                            metadata: m.metadata,
                            case: None,
                        })
                    }
                    Err(e) => rejected.push((source, with_hint(line, e.to_string()))),
                }
            }
        } else if input.is_file() {
            if !is_image(input) {
                bail!(
                    "{} is neither an image (.png, .jpg, .jpeg), a folder nor a .jsonl file of jobs",
                    input.display()
                );
            }
            jobs.push(plain(input.clone()));
        } else {
            bail!("input {} does not exist", input.display());
        }
    }
    let mut seen = std::collections::HashSet::new();
    for job in &jobs {
        validate_job_id(&job.job_id).map_err(|e| anyhow::anyhow!("{e}"))?;
        if !seen.insert(job.job_id.clone()) {
            bail!(
                "two jobs have the id {:?}: their results would overwrite each other",
                job.job_id
            );
        }
    }
    Ok((jobs, rejected))
}

/// A job file line that is an evaluation manifest's says where such lines go.
fn with_hint(line: &str, reason: String) -> String {
    let manifest_line = serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| {
        v.get("job_id").is_none() && v.get("id").is_some() && v.get("mask").is_some()
    });
    if manifest_line {
        format!(
            "{reason} (this looks like an evaluation manifest line: pass the file with --manifest)"
        )
    } else {
        reason
    }
}

/// Runs every job, prints progress to stderr, and writes the contact sheet.
pub async fn run(
    settings: &Settings,
    executor: Executor,
    options: RunOptions,
) -> anyhow::Result<RunSummary> {
    let (jobs, rejected) = collect_jobs(&options, settings)?;
    for (source, reason) in &rejected {
        eprintln!("rejected {source}: {reason}");
    }
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let total = jobs.len();
    let executor = Arc::new(executor);
    let out = options.out.clone();
    let started = Instant::now();
    let mut done = 0;
    let mut lines = Vec::with_capacity(total);
    // Each job is its own task, so jobs' pre- and post-processing run on every runtime thread
    // (polled inside one task they would all share a single thread).
    let mut stream = futures_util::stream::iter(jobs.into_iter().map(|job| {
        let executor = executor.clone();
        let out = out.clone();
        let job_id = job.job_id.clone();
        let prompt = job.prompt.clone();
        let task = tokio::spawn(async move { run_one(&executor, &out, job).await });
        async move {
            task.await.unwrap_or_else(|e| JobLine {
                job_id,
                prompt,
                input_name: None,
                ground_truth: None,
                result: Err(JobError::new(
                    ErrorClass::Internal,
                    format!("job task: {e}"),
                )),
            })
        }
    }))
    .buffer_unordered(options.concurrency.max(1));
    while let Some(line) = stream.next().await {
        done += 1;
        match &line.result {
            Ok(report) => eprintln!(
                "[{done}/{total}] {}: {} ({} regions, {} perception passes, {:.0} ms)",
                line.job_id,
                report.status(),
                report.regions,
                report.iterations(),
                report.diagnostics.timings_ms.total
            ),
            Err(e) => eprintln!("[{done}/{total}] {}: failed: {e}", line.job_id),
        }
        lines.push(line);
    }
    lines.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    let sheet = out.join("index.html");
    std::fs::write(&sheet, contact_sheet(&lines, &rejected))
        .with_context(|| format!("writing {}", sheet.display()))?;
    eprintln!(
        "{} jobs in {:.1} s; contact sheet: {}",
        total,
        started.elapsed().as_secs_f64(),
        sheet.display()
    );
    Ok(RunSummary {
        jobs: lines,
        sheet,
        rejected,
    })
}

async fn run_one(executor: &Executor, out: &Path, job: LocalJob) -> JobLine {
    let results = Location::File(out.to_path_buf()).join(&format!("{}/", job.job_id));
    // The contact sheet shows the original next to the result: keep a copy beside it.
    let ext = job
        .image
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_else(|| "img".into());
    let input_name = format!("input.{ext}");
    let copy = out.join(&job.job_id).join(&input_name);
    let copied = std::fs::create_dir_all(out.join(&job.job_id))
        .and_then(|_| std::fs::copy(&job.image, &copy))
        .is_ok();
    let ground_truth = job.case.as_ref().and_then(|case| {
        let drawn = crate::eval::ground_truth_png(case).and_then(|png| {
            Ok(std::fs::write(out.join(&job.job_id).join(GROUND_TRUTH), png)?)
        });
        match drawn {
            Ok(()) => Some(GROUND_TRUTH.to_string()),
            Err(e) => {
                tracing::warn!(job_id = %job.job_id, error = %format!("{e:#}"), "ground truth not drawn");
                None
            }
        }
    });
    let spec = JobSpec {
        job_id: job.job_id.clone(),
        image: Location::File(job.image.clone()),
        prompt: job.prompt.clone(),
        results,
        options: job.options,
        metadata: job.metadata,
        attempt: 1,
        queue_ms: 0.0,
    };
    let result = executor.execute(&spec).await;
    if let Err(e) = &result {
        tracing::warn!(job_id = %job.job_id, error = %e, "job failed");
    }
    JobLine {
        job_id: job.job_id,
        prompt: job.prompt,
        input_name: copied.then_some(input_name),
        ground_truth,
        result,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What the VLM said in one iteration: token counts, its answer, what was dropped and the
/// fallback that ran.
fn vlm_summary(iteration: usize, vlm: &crate::agents::reasoning::vlm::VlmTrace) -> String {
    let mut notes = Vec::new();
    if let Some(reason) = &vlm.unsupported {
        notes.push(escape(reason));
    }
    if let Some(answer) = &vlm.answer {
        if let Some(error) = answer.error {
            notes.push(format!("malformed answer ({})", error.as_str()));
        }
        for dropped in &answer.dropped {
            notes.push(format!(
                "item {} dropped ({})",
                dropped.index,
                serde_json::to_value(dropped.reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ));
        }
    }
    if let Some(fallback) = vlm.fallback {
        notes.push(format!("fallback: {}", fallback.as_str()));
    }
    format!(
        "<p class=\"vlm\">VLM, iteration {iteration}: {} prompt tokens ({} image), {} generated, \
         first token after {:.0} ms{}<br><code>{}</code></p>\n",
        vlm.prompt_tokens,
        vlm.image_tokens,
        vlm.generated_tokens,
        vlm.timings_ms.time_to_first_token,
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        },
        escape(&vlm.text)
    )
}

/// The contact sheet: one row per job, original | ground truth (when known) | saliency |
/// retouched, regions listed.
fn contact_sheet(lines: &[JobLine], rejected: &[(String, String)]) -> String {
    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>retoucher contact sheet</title>\n<style>\n\
         body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa;color:#222}\n\
         .job{background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em;margin-bottom:1.5em}\n\
         .row{display:flex;gap:1em;flex-wrap:wrap}.row figure{margin:0}\n\
         .row img{max-width:360px;max-height:360px;border:1px solid #ccc;image-rendering:auto}\n\
         figcaption{font-size:.85em;color:#555;text-align:center}\n\
         .retouched{color:#0a7d32;font-weight:600}.clean{color:#555;font-weight:600}.failed{color:#b00020;font-weight:600}\n\
         .vlm{font-size:.85em;color:#333}.vlm code{white-space:pre-wrap;background:#f3f3f3}\n\
         table{border-collapse:collapse;font-size:.9em;margin-top:.5em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left}\n\
         </style></head><body>\n<h1>retoucher contact sheet</h1>\n",
    );
    let ok = lines.iter().filter(|l| l.result.is_ok()).count();
    html.push_str(&format!(
        "<p>{} jobs: {} done, {} failed{}.</p>\n",
        lines.len(),
        ok,
        lines.len() - ok,
        if rejected.is_empty() {
            String::new()
        } else {
            format!(", {} input lines rejected", rejected.len())
        }
    ));
    for line in lines {
        let id = escape(&line.job_id);
        html.push_str(&format!("<div class=\"job\" id=\"{id}\"><h2>{id} "));
        match &line.result {
            Ok(report) => {
                let d = &report.diagnostics;
                html.push_str(&format!(
                    "<span class=\"{0}\">{0}</span></h2>\n<p><em>{1}</em></p>\n<div class=\"row\">",
                    d.status.as_str(),
                    escape(&line.prompt)
                ));
                if let Some(input) = &line.input_name {
                    html.push_str(&format!(
                        "<figure><img src=\"{id}/{input}\" alt=\"original\"><figcaption>original ({}×{}, {})</figcaption></figure>",
                        d.input.width, d.input.height, escape(&d.input.format)
                    ));
                }
                if let Some(truth) = &line.ground_truth {
                    html.push_str(&format!(
                        "<figure><img src=\"{id}/{}\" alt=\"ground truth\"><figcaption>ground truth (defects tinted red)</figcaption></figure>",
                        escape(truth)
                    ));
                }
                if let Some(first) = d.iterations.first() {
                    html.push_str(&format!(
                        "<figure><img src=\"{id}/{}\" alt=\"saliency\"><figcaption>saliency (max {:.2}, {:.2}% above τ)</figcaption></figure>",
                        escape(&first.saliency.map),
                        first.saliency.max,
                        first.saliency.area_above_threshold * 100.0
                    ));
                }
                html.push_str(&format!(
                    "<figure><img src=\"{id}/{}\" alt=\"retouched\"><figcaption>retouched ({} perception passes, {:.0} ms)</figcaption></figure></div>\n",
                    layout::RETOUCHED,
                    d.iterations.len(),
                    d.timings_ms.total
                ));
                let regions: Vec<_> = d
                    .iterations
                    .iter()
                    .flat_map(|it| it.regions.iter().map(move |r| (it.index, r)))
                    .collect();
                if !regions.is_empty() {
                    html.push_str("<table><tr><th>iteration</th><th>region</th><th>category</th><th>score</th><th>bbox</th><th>tool</th><th>instruction</th></tr>\n");
                    for (i, r) in regions {
                        html.push_str(&format!(
                            "<tr><td>{i}</td><td><a href=\"{id}/{}\">{}</a></td><td>{}</td><td>{:.2}</td><td>{:?}</td><td>{}</td><td>{}</td></tr>\n",
                            escape(&r.mask),
                            r.id,
                            escape(&r.category),
                            r.score,
                            r.bbox,
                            escape(&r.tool),
                            escape(&r.description)
                        ));
                    }
                    html.push_str("</table>\n");
                }
                for it in &d.iterations {
                    if let Some(vlm) = &it.vlm {
                        html.push_str(&vlm_summary(it.index, vlm));
                    }
                }
                html.push_str(&format!(
                    "<p><a href=\"{id}/{}\">diagnostics.json</a></p>",
                    layout::DIAGNOSTICS
                ));
            }
            Err(e) => html.push_str(&format!(
                "<span class=\"failed\">failed</span></h2><p>{}</p>",
                escape(&e.to_string())
            )),
        }
        html.push_str("</div>\n");
    }
    if !rejected.is_empty() {
        html.push_str("<h2>Rejected input lines</h2><ul>\n");
        for (source, reason) in rejected {
            html.push_str(&format!(
                "<li><code>{}</code>: {}</li>\n",
                escape(source),
                escape(reason)
            ));
        }
        html.push_str("</ul>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_from_file_names() {
        assert_eq!(job_id_for(Path::new("/x/my photo (1).png")), "my_photo__1_");
        assert_eq!(job_id_for(Path::new("a.b.jpg")), "a.b");
    }

    #[test]
    fn vlm_summaries_show_the_answer_escaped_and_the_fallback() {
        use crate::agents::reasoning::vlm::answer::{Answer, Malformed};
        use crate::agents::reasoning::vlm::spec::FallbackKind;
        use crate::agents::reasoning::vlm::VlmTrace;
        let trace = VlmTrace {
            prompt_tokens: 228,
            image_tokens: 64,
            generated_tokens: 3,
            text: "<script>[".into(),
            answer: Some(Answer {
                error: Some(Malformed::InvalidJson),
                regions: vec![],
                dropped: vec![],
            }),
            fallback: Some(FallbackKind::Saliency),
            ..VlmTrace::default()
        };
        let html = vlm_summary(1, &trace);
        assert!(html.contains("&lt;script&gt;["), "{html}");
        assert!(
            html.contains("invalid_json") && html.contains("fallback: saliency"),
            "{html}"
        );
        assert!(
            html.contains("228 prompt tokens (64 image), 3 generated"),
            "{html}"
        );
    }

    #[test]
    fn sheet_escapes_prompts() {
        let lines = vec![JobLine {
            job_id: "j".into(),
            prompt: "<script>".into(),
            input_name: None,
            ground_truth: None,
            result: Err(JobError::invalid("bad <b>")),
        }];
        let html = contact_sheet(&lines, &[]);
        assert!(html.contains("bad &lt;b&gt;"));
        assert!(!html.contains("<script>"));
    }
}
