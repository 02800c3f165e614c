//! `retoucher bundle check`: everything a worker would find wrong with a bundle, found before it
//! is deployed, and reported all at once.
//!
//! The manifest is parsed and checked for coherence (schema, taxonomy, routing) and every file of
//! `[files]` against its sha256; then each part is loaded on its own through the loaders the
//! worker uses (perception with its tokenizer, reasoning in whatever mode the bundle names, each
//! tool the bundle routes to or configures), so one broken part does not hide another, and a new
//! reasoning mode or tool is checked by its own loader without this module knowing it. Every
//! batched model of a part that loads has its declared inputs and output compared with what its
//! agent feeds and reads (names, ranks, fixed dimensions, element types, values per item), and
//! runs one warm-up request.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::{Bundle, BundleProblem};
use crate::agents::action::{Action, Tool};
use crate::agents::perception::Perception;
use crate::agents::reasoning::Reasoning;
use crate::agents::{LoadContext, ServedModel};
use crate::config::BatchingOverride;
use crate::engine::batcher::NoObserver;
use crate::engine::EngineOptions;

/// What `bundle check` found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The bundle folder.
    pub bundle: String,
    /// `name` and `version` of the manifest, when it parses.
    pub name: Option<String>,
    pub version: Option<String>,
    /// Files listed in `[files]` (each verified against its sha256).
    pub files: usize,
    /// Each part loaded (or not), in pipeline order.
    pub parts: Vec<PartReport>,
    /// Every problem found; the bundle is fit to deploy when there is none.
    pub problems: Vec<BundleProblem>,
}

/// One part of the bundle: `perception`, `reasoning`, or `tool <name>`.
#[derive(Debug, Serialize)]
pub struct PartReport {
    pub part: String,
    pub loaded: bool,
    pub models: Vec<ModelReport>,
}

/// One batched model of a part.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    /// Its role (`perception`, `classifier`, `inpaint`, …).
    pub role: String,
    pub max_batch_size: usize,
    /// Duration of the warm-up request, when it succeeded.
    pub warm_up_ms: Option<f64>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report for people: one line per part, then every problem.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let identity = match (&self.name, &self.version) {
            (Some(name), Some(version)) => format!("{name} {version}"),
            _ => "manifest not readable".to_string(),
        };
        out.push_str(&format!("bundle {} ({identity})\n", self.bundle));
        if self.name.is_some() {
            out.push_str(&format!("  files: {} listed in [files]\n", self.files));
        }
        for part in &self.parts {
            let models: Vec<String> = part
                .models
                .iter()
                .map(|m| match m.warm_up_ms {
                    Some(ms) => format!(
                        "{} (batch up to {}, warm-up {ms:.1} ms)",
                        m.role, m.max_batch_size
                    ),
                    None => format!("{} (warm-up failed)", m.role),
                })
                .collect();
            let state = match (part.loaded, models.is_empty()) {
                (false, _) => "not loaded".to_string(),
                (true, true) => "loaded, no model".to_string(),
                (true, false) => format!("loaded: {}", models.join(", ")),
            };
            out.push_str(&format!("  {}: {state}\n", part.part));
        }
        match self.problems.len() {
            0 => out.push_str("ok: no problems\n"),
            n => {
                out.push_str(&format!("{n} problem{}:\n", if n == 1 { "" } else { "s" }));
                for p in &self.problems {
                    out.push_str(&format!("  - {}: {}\n", p.part, p.message));
                }
            }
        }
        out
    }
}

/// A part that loaded, kept alive while its models are probed.
enum Loaded {
    Perception(Box<Perception>),
    Reasoning(Box<Reasoning>),
    Tool(Box<dyn Tool>),
}

impl Loaded {
    fn served(&self) -> Vec<&ServedModel> {
        match self {
            Loaded::Perception(p) => vec![p.served()],
            Loaded::Reasoning(r) => r.served(),
            Loaded::Tool(t) => t.served(),
        }
    }
}

/// Checks the bundle in `root` with these engine options and batching overrides (the worker's
/// configuration). Needs a tokio runtime (the models' batchers run on it).
pub async fn check(
    root: &Path,
    engine: &EngineOptions,
    batching: &BTreeMap<String, BatchingOverride>,
) -> CheckReport {
    let mut report = CheckReport {
        bundle: root.display().to_string(),
        name: None,
        version: None,
        files: 0,
        parts: Vec::new(),
        problems: Vec::new(),
    };
    let bundle = match Bundle::open(root) {
        Ok((bundle, problems)) => {
            report.problems = problems;
            bundle
        }
        Err(e) => {
            report.problems.push(problem("manifest", &e));
            return report;
        }
    };
    report.name = Some(bundle.manifest.name.clone());
    report.version = Some(bundle.manifest.version.clone());
    report.files = bundle.manifest.files.len();
    if let Err(e) = crate::engine::environment(engine) {
        report.problems.push(problem("engine", &e));
        return report;
    }

    let bundle = Arc::new(bundle);
    let ctx = LoadContext {
        bundle: &bundle,
        engine,
        batching,
        observer: Arc::new(NoObserver),
    };
    let mut parts: Vec<(String, anyhow::Result<Loaded>)> = vec![
        (
            "perception".into(),
            Perception::load(&ctx).map(|p| Loaded::Perception(Box::new(p))),
        ),
        (
            "reasoning".into(),
            Reasoning::load(&ctx).map(|r| Loaded::Reasoning(Box::new(r))),
        ),
    ];
    for name in Action::tool_names(&ctx) {
        parts.push((
            format!("tool {name}"),
            Action::load_tool(&ctx, name).map(Loaded::Tool),
        ));
    }
    for (part, loaded) in &parts {
        let mut part_report = PartReport {
            part: part.clone(),
            loaded: loaded.is_ok(),
            models: Vec::new(),
        };
        match loaded {
            Err(e) => report.problems.push(problem(part, e)),
            Ok(loaded) => {
                for model in loaded.served() {
                    let warm_up = model.probe_once().await;
                    if let Err(e) = &warm_up {
                        report.problems.push(problem(part, e));
                    }
                    part_report.models.push(ModelReport {
                        role: model.role.to_string(),
                        max_batch_size: model.max_batch_size,
                        warm_up_ms: warm_up.ok().map(|d| d.as_secs_f64() * 1000.0),
                    });
                }
            }
        }
        report.parts.push(part_report);
    }
    report
}

fn problem(part: &str, error: &anyhow::Error) -> BundleProblem {
    BundleProblem {
        part: part.to_string(),
        message: format!("{error:#}").replace(['\n', '\r'], " "),
    }
}
