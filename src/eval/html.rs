//! `report.html`: the evaluation for a person to look at rather than read. One self-contained
//! page (inline CSS and SVG, no scripts): the figures, per-class bars, the ROC curves, and the
//! worst cases as rows of input | ground truth | saliency | retouched, whose image files are
//! referenced relative to the report's folder.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::score::{CaseScore, Figures, Summary};
use super::Report;

/// Rows per worst-case section.
const WORST_ROWS: usize = 5;

const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// The image files of one case, relative to the report's folder.
pub struct CaseFiles {
    pub input: String,
    pub ground_truth: String,
    pub saliency: String,
    pub retouched: String,
}

/// One group of worst cases and what they are worst at.
pub struct Section<'a> {
    pub title: &'static str,
    pub rows: Vec<&'a CaseScore>,
}

/// The worst cases: localisation (lowest IoU), false alarms (most area above τ on defect-free
/// images), restoration (least PSNR gained in the mask) and harm (largest rise of the
/// whole-image error against `clean`).
pub fn worst(cases: &[CaseScore]) -> Vec<Section<'_>> {
    let defect = || cases.iter().filter(|c| c.is_defect());
    vec![
        Section {
            title: "Localisation: defect images with the lowest IoU",
            rows: lowest(defect(), |c| {
                c.iou.unwrap_or(0.0) + 1e-3 * c.auc.unwrap_or(0.0)
            }),
        },
        Section {
            title: "False alarms: defect-free images with the most area above τ",
            rows: lowest(
                cases
                    .iter()
                    .filter(|c| c.false_positive_area.is_some_and(|a| a > 0.0)),
                |c| -c.false_positive_area.unwrap_or(0.0),
            ),
        },
        Section {
            title: "Restoration: defect images whose PSNR in the mask gained least",
            rows: lowest(defect().filter(|c| c.psnr_in_mask_before.is_some()), |c| {
                c.psnr_in_mask_after.unwrap_or(0.0) - c.psnr_in_mask_before.unwrap_or(0.0)
            }),
        },
        Section {
            title: "Harm: images whose error against the clean image rose most",
            rows: lowest(cases.iter().filter(|c| c.worse == Some(true)), |c| {
                c.mse_before.unwrap_or(0.0) - c.mse_after.unwrap_or(0.0)
            }),
        },
    ]
}

/// The [`WORST_ROWS`] cases with the lowest `key`, ties in manifest order.
fn lowest<'a>(
    cases: impl Iterator<Item = &'a CaseScore>,
    key: impl Fn(&CaseScore) -> f64,
) -> Vec<&'a CaseScore> {
    let mut rows: Vec<&CaseScore> = cases.collect();
    rows.sort_by(|a, b| key(a).total_cmp(&key(b)).then_with(|| a.line.cmp(&b.line)));
    rows.truncate(WORST_ROWS);
    rows
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}"))
}

fn db(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn percent(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.2}%", v * 100.0))
}

/// A horizontal grouped bar chart: one group per row label, one bar per series.
fn bars(
    title: &str,
    rows: &[(String, Vec<Option<f64>>)],
    series: &[&str],
    max: f64,
    label: fn(f64) -> String,
) -> String {
    let (left, width, bar, gap) = (90.0, 300.0, 11.0, 8.0);
    let group = bar * series.len() as f64 + gap;
    let top = 34.0;
    let height = top + group * rows.len() as f64 + 6.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" role=\"img\" aria-label=\"{t}\">\
         <text x=\"0\" y=\"13\" class=\"title\">{t}</text>",
        w = left + width + 60.0,
        t = escape(title)
    );
    let mut x = left;
    for (i, name) in series.iter().enumerate() {
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"20\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"29\">{}</text>",
            PALETTE[i % PALETTE.len()],
            x + 14.0,
            escape(name)
        );
        x += 24.0 + 7.0 * name.len() as f64;
    }
    for (r, (name, values)) in rows.iter().enumerate() {
        let y0 = top + group * r as f64;
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y0 + group / 2.0,
            escape(name)
        );
        for (i, value) in values.iter().enumerate() {
            let y = y0 + bar * i as f64;
            match value {
                Some(v) => {
                    let w = (v / max).clamp(0.0, 1.0) * width;
                    let _ = write!(
                        svg,
                        "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/>\
                         <text x=\"{:.1}\" y=\"{}\" class=\"value\">{}</text>",
                        bar - 1.0,
                        PALETTE[i % PALETTE.len()],
                        left + w + 3.0,
                        y + bar - 2.0,
                        label(*v)
                    );
                }
                None => {
                    let _ = write!(
                        svg,
                        "<text x=\"{}\" y=\"{}\" class=\"value\">–</text>",
                        left + 3.0,
                        y + bar - 2.0
                    );
                }
            }
        }
    }
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#999\"/></svg>",
        height - 4.0
    );
    svg
}

/// ROC curves: the overall one thick, one thin line per class with defects.
fn roc_chart(overall: &Summary, per_class: &BTreeMap<String, Summary>) -> String {
    let (m, size) = (40.0, 300.0);
    let at = |(fpr, tpr): (f64, f64)| (m + fpr * size, m + (1.0 - tpr) * size);
    let line = |points: &[(f64, f64)]| {
        points
            .iter()
            .map(|&p| {
                let (x, y) = at(p);
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"ROC curves\">\
         <rect x=\"{m}\" y=\"{m}\" width=\"{size}\" height=\"{size}\" fill=\"#fff\" stroke=\"#999\"/>\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{m}\" stroke=\"#ccc\" stroke-dasharray=\"4 4\"/>\
         <text x=\"{cx}\" y=\"{xl}\" text-anchor=\"middle\">false positive rate (pixels)</text>\
         <text x=\"12\" y=\"{cy}\" text-anchor=\"middle\" transform=\"rotate(-90 12 {cy})\">true positive rate (pixels)</text>",
        w = m + size + 200.0,
        h = m + size + 45.0,
        b = m + size,
        r = m + size,
        cx = m + size / 2.0,
        cy = m + size / 2.0,
        xl = m + size + 36.0,
    );
    for t in [0.0, 0.5, 1.0] {
        let (x, y) = at((t, t));
        let _ = write!(
            svg,
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" class=\"value\">{t}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\" class=\"value\">{t}</text>",
            m + size + 14.0,
            m - 4.0,
            y + 4.0
        );
    }
    let mut legend_y = m + 8.0;
    let mut legend = |svg: &mut String, color: &str, width: f64, name: &str, auc: Option<f64>| {
        let _ = write!(
            svg,
            "<line x1=\"{x}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"{color}\" stroke-width=\"{width}\"/>\
             <text x=\"{tx}\" y=\"{ty}\">{} ({})</text>",
            escape(name),
            ratio(auc),
            x = m + size + 12.0,
            x2 = m + size + 32.0,
            y = legend_y,
            tx = m + size + 36.0,
            ty = legend_y + 4.0,
        );
        legend_y += 16.0;
    };
    for (i, (class, summary)) in per_class
        .iter()
        .filter(|(_, s)| !s.roc.is_empty())
        .enumerate()
    {
        let color = PALETTE[i % PALETTE.len()];
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.2\" opacity=\"0.8\"/>",
            line(&summary.roc)
        );
        legend(
            &mut svg,
            color,
            1.2,
            class,
            summary.figures.localisation.auc,
        );
    }
    if !overall.roc.is_empty() {
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#000\" stroke-width=\"2.5\"/>",
            line(&overall.roc)
        );
        legend(
            &mut svg,
            "#000",
            2.5,
            "all",
            overall.figures.localisation.auc,
        );
    }
    svg.push_str("</svg>");
    svg
}

fn figures_row(name: &str, f: &Figures) -> String {
    let l = &f.localisation;
    let r = &f.restoration;
    format!(
        "<tr><th>{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} → {}</td><td>{} → {}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td></tr>\n",
        escape(name),
        f.images,
        ratio(l.auc),
        ratio(l.iou),
        ratio(l.recall),
        percent(l.false_positive_area),
        db(r.psnr_in_mask_before),
        db(r.psnr_in_mask_after),
        ratio(r.ssim_in_mask_before),
        ratio(r.ssim_in_mask_after),
        percent(f.harm.worse_share),
        f.harm.outside_mask_changed_pixels,
        f.loop_figures.mean_iterations,
        f.loop_figures.clean_share,
    )
}

fn case_caption(c: &CaseScore) -> String {
    let mut parts = vec![format!(
        "line {}, {}, {} repair iteration{}",
        c.line,
        c.status,
        c.iterations,
        if c.iterations == 1 { "" } else { "s" }
    )];
    if c.is_defect() {
        parts.push(format!(
            "IoU {}, AUC {}, {}/{} defects hit",
            ratio(c.iou),
            ratio(c.auc),
            c.defects_hit,
            c.defects
        ));
    } else {
        parts.push(format!("area above τ {}", percent(c.false_positive_area)));
    }
    if c.psnr_in_mask_before.is_some() {
        parts.push(format!(
            "PSNR in mask {} → {} dB, SSIM {} → {}",
            db(c.psnr_in_mask_before),
            db(c.psnr_in_mask_after),
            ratio(c.ssim_in_mask_before),
            ratio(c.ssim_in_mask_after)
        ));
    }
    if let (Some(b), Some(a)) = (c.mse_before, c.mse_after) {
        parts.push(format!("image MSE vs clean {b:.1} → {a:.1}"));
    }
    if c.outside_mask_changed_pixels > 0 {
        parts.push(format!(
            "<b>{} pixels changed outside the repair masks</b>",
            c.outside_mask_changed_pixels
        ));
    }
    parts.join("; ")
}

/// The whole page. `files` gives each shown case's images (relative paths).
pub fn render(
    report: &Report,
    overall: &Summary,
    per_class: &BTreeMap<String, Summary>,
    sections: &[Section],
    files: &dyn Fn(&CaseScore) -> CaseFiles,
) -> String {
    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>retoucher eval</title>\n<style>\n\
         body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa;color:#222;max-width:1400px}\n\
         table{border-collapse:collapse;font-size:.9em;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}\n\
         th{text-align:left;background:#f0f0f0}.charts{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}\n\
         svg{font-size:11px;background:#fff;border:1px solid #e5e5e5;padding:6px}svg .title{font-weight:600;font-size:12px}svg .value{fill:#444;font-size:10px}\n\
         .case{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.6em;margin-bottom:1em}\n\
         .row{display:flex;gap:.6em;flex-wrap:wrap}.row figure{margin:0}.row img{width:220px;height:auto;border:1px solid #ccc;image-rendering:pixelated}\n\
         figcaption{font-size:.8em;color:#555;text-align:center}.note{color:#555;font-size:.9em}.bad{color:#b00020;font-weight:600}\n\
         </style></head><body>\n",
    );
    let f = &report.overall;
    let l = &f.localisation;
    let _ = write!(
        html,
        "<h1>retoucher eval</h1>\n<p>Bundle <b>{}</b> {} on <code>{}</code>: {} images evaluated{}, τ = {}, {:.0} s.</p>\n",
        escape(&report.bundle.name),
        escape(&report.bundle.version),
        escape(&report.manifest),
        f.images,
        if report.failed > 0 {
            format!(", <span class=\"bad\">{} not evaluated</span>", report.failed)
        } else {
            String::new()
        },
        l.threshold,
        report.wall_seconds
    );
    let outside = f.harm.outside_mask_changed_pixels;
    let _ = writeln!(
        html,
        "<table><tr><th>pixel AUC</th><td>{}</td><th>IoU @ τ</th><td>{}</td><th>recall</th><td>{} of {} defects</td><th>false-positive area</th><td>{}</td></tr>\
         <tr><th>PSNR in mask</th><td>{} → {} dB</td><th>SSIM in mask</th><td>{} → {}</td><th>worse</th><td>{} ({} of {})</td><th>changed outside masks</th><td{}>{} px</td></tr>\
         <tr><th>repair iterations</th><td>{:.2}</td><th>clean</th><td>{}</td><th>converged</th><td>{}</td><th>ms per image</th><td>{:.0} (perception {:.0}, reasoning {:.0}, action {:.0})</td></tr></table>",
        ratio(l.auc),
        ratio(l.iou),
        ratio(l.recall),
        l.defects,
        percent(l.false_positive_area),
        db(f.restoration.psnr_in_mask_before),
        db(f.restoration.psnr_in_mask_after),
        ratio(f.restoration.ssim_in_mask_before),
        ratio(f.restoration.ssim_in_mask_after),
        percent(f.harm.worse_share),
        f.harm.worse_images,
        f.harm.images_with_clean,
        if outside > 0 { " class=\"bad\"" } else { "" },
        outside,
        f.loop_figures.mean_iterations,
        percent(Some(f.loop_figures.clean_share)),
        percent(Some(f.loop_figures.converged_share)),
        f.loop_figures.stage_ms.total,
        f.loop_figures.stage_ms.perception,
        f.loop_figures.stage_ms.reasoning,
        f.loop_figures.stage_ms.action,
    );

    html.push_str("<h2>Per class</h2>\n<div class=\"charts\">");
    let rows = |get: &dyn Fn(&Figures) -> Vec<Option<f64>>, only_defects: Option<bool>| {
        per_class
            .iter()
            .filter(|(_, s)| {
                only_defects.is_none_or(|d| (s.figures.localisation.defect_images > 0) == d)
            })
            .map(|(c, s)| (c.clone(), get(&s.figures)))
            .collect::<Vec<_>>()
    };
    html.push_str(&bars(
        "Localisation (first perception pass)",
        &rows(
            &|f| {
                vec![
                    f.localisation.auc,
                    f.localisation.iou,
                    f.localisation.recall,
                ]
            },
            Some(true),
        ),
        &["AUC", "IoU @ τ", "recall"],
        1.0,
        |v| format!("{v:.3}"),
    ));
    let psnr_max = per_class
        .values()
        .flat_map(|s| {
            [
                s.figures.restoration.psnr_in_mask_before,
                s.figures.restoration.psnr_in_mask_after,
            ]
        })
        .flatten()
        .fold(1.0f64, f64::max);
    html.push_str(&bars(
        "PSNR in the mask against clean (dB)",
        &rows(
            &|f| {
                vec![
                    f.restoration.psnr_in_mask_before,
                    f.restoration.psnr_in_mask_after,
                ]
            },
            Some(true),
        ),
        &["before", "after"],
        psnr_max * 1.1,
        |v| format!("{v:.1}"),
    ));
    html.push_str(&bars(
        "SSIM in the mask against clean",
        &rows(
            &|f| {
                vec![
                    f.restoration.ssim_in_mask_before,
                    f.restoration.ssim_in_mask_after,
                ]
            },
            Some(true),
        ),
        &["before", "after"],
        1.0,
        |v| format!("{v:.3}"),
    ));
    html.push_str(&bars(
        "Harm and false alarms",
        &rows(
            &|f| vec![f.harm.worse_share, f.localisation.false_positive_area],
            None,
        ),
        &["worse share", "false-positive area"],
        1.0,
        |v| format!("{:.1}%", v * 100.0),
    ));
    html.push_str("</div>\n<h2>ROC (pixels of the first perception pass)</h2>\n");
    html.push_str(&roc_chart(overall, per_class));
    html.push_str(
        "\n<h2>Figures</h2>\n<table><tr><th>class</th><th>images</th><th>AUC</th><th>IoU</th><th>recall</th><th>FP area</th>\
         <th>PSNR in mask (dB)</th><th>SSIM in mask</th><th>worse</th><th>changed outside (px)</th><th>iterations</th><th>clean share</th></tr>\n",
    );
    html.push_str(&figures_row("all", f));
    // Defect classes first, then the defect-free ones.
    let mut classes: Vec<(&String, &Summary)> = per_class.iter().collect();
    classes.sort_by_key(|(c, s)| (s.figures.localisation.defect_images == 0, *c));
    for (class, s) in classes {
        html.push_str(&figures_row(class, &s.figures));
    }
    html.push_str("</table>\n<p class=\"note\">Definitions: README, section Quality; per image: <a href=\"cases.jsonl\">cases.jsonl</a>; all figures: <a href=\"report.json\">report.json</a>.</p>\n");

    html.push_str("<h2>Worst cases</h2>\n");
    for section in sections {
        let _ = writeln!(html, "<h3>{}</h3>", escape(section.title));
        if section.rows.is_empty() {
            html.push_str("<p class=\"note\">None.</p>\n");
        }
        for c in &section.rows {
            let files = files(c);
            let _ = write!(
                html,
                "<div class=\"case\"><b>{}</b> ({})<br><span class=\"note\">{}</span><div class=\"row\">",
                escape(&c.id),
                escape(c.class.as_deref().unwrap_or("no class")),
                case_caption(c)
            );
            for (src, caption) in [
                (&files.input, "input"),
                (&files.ground_truth, "ground truth"),
                (&files.saliency, "saliency, first pass"),
                (&files.retouched, "retouched"),
            ] {
                let _ = write!(
                    html,
                    "<figure><img src=\"{}\" alt=\"{caption}\"><figcaption>{caption}</figcaption></figure>",
                    escape(src)
                );
            }
            html.push_str("</div></div>\n");
        }
    }
    if !report.errors.is_empty() {
        html.push_str("<h2>Not evaluated</h2><ul>\n");
        for p in &report.errors {
            let _ = writeln!(
                html,
                "<li>line {}{}: {}</li>",
                p.line,
                p.id.as_deref()
                    .map(|id| format!(" ({})", escape(id)))
                    .unwrap_or_default(),
                escape(&p.reason)
            );
        }
        html.push_str("</ul>\n");
    }
    html.push_str("</body></html>\n");
    html
}
