//! The model bundle (design §4.7): `bundle.toml` names each agent's ONNX files, tokenizer,
//! sizes, normalisation, taxonomy, thresholds and tool routing, with a sha256 per file.
//!
//! Nothing about the models lives in code: the paper publishes neither weights nor τ nor the
//! exact taxonomy, so everything a model team may change is read from here and verified at load.
//! [`check`] finds everything wrong with a bundle before it is deployed; [`lock`] writes its
//! checksums.

pub(crate) mod check;
pub(crate) mod lock;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::agents::action::ToolName;
use crate::agents::reasoning::vlm::spec::VlmSpec;

/// The manifest's file name in a bundle folder.
pub const MANIFEST: &str = "bundle.toml";

/// A parsed, verified bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub root: PathBuf,
    pub manifest: Manifest,
}

/// Something wrong with a bundle: the part it is in (`manifest`, `files`, an agent, a tool) and
/// a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BundleProblem {
    pub part: String,
    pub message: String,
}

/// Whether a `[files]` name stays inside the bundle folder (relative, no `..`).
pub fn is_inside(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Lower-case hex sha256 of some bytes, as `[files]` records it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub taxonomy: Taxonomy,
    pub defaults: Defaults,
    pub perception: PerceptionSpec,
    pub reasoning: ReasoningSpec,
    pub action: ActionSpec,
    #[serde(default)]
    pub batching: BTreeMap<String, crate::config::BatchingOverride>,
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Taxonomy {
    pub categories: Vec<String>,
    #[serde(default)]
    pub descriptions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Defaults {
    pub saliency_threshold: f32,
    pub max_iterations: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PerceptionSpec {
    pub model: String,
    pub tokenizer: String,
    pub input_size: u32,
    pub max_tokens: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Encode prompts with the tokenizer's post-processor (its special tokens). Default on.
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    /// The text encoder's pad id; default: the tokenizer's (see [`crate::agents::text`]).
    #[serde(default)]
    pub pad_id: Option<u32>,
}

fn yes() -> bool {
    true
}

/// How reasoning finds and explains regions (`reasoning.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningMode {
    /// Connected regions of the saliency map, each classified by a small model.
    Regions,
    /// A vision-language model looks at the image and writes the regions.
    Vlm,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReasoningSpec {
    pub mode: ReasoningMode,
    /// The region classifier (`regions` mode).
    #[serde(default)]
    pub classifier: Option<String>,
    /// C: the classifier's input size.
    #[serde(default)]
    pub input_size: Option<u32>,
    #[serde(default = "zeros")]
    pub mean: [f32; 3],
    #[serde(default = "ones")]
    pub std: [f32; 3],
    pub min_region_pixels: u32,
    pub dilate_pixels: u32,
    pub feather_pixels: u32,
    pub max_regions: usize,
    pub context: f32,
    /// `[reasoning.vlm]`: the vision-language model (`vlm` mode).
    #[serde(default)]
    pub vlm: Option<VlmSpec>,
}

fn zeros() -> [f32; 3] {
    [0.0; 3]
}

fn ones() -> [f32; 3] {
    [1.0; 3]
}

#[derive(Debug, Clone, Deserialize)]
pub struct ActionSpec {
    /// Tool for every category not in `routing`.
    pub default_tool: ToolName,
    /// Category → tool.
    #[serde(default)]
    pub routing: BTreeMap<String, ToolName>,
    /// `[action.tools.<name>]`: each tool's own table, read by the tool when it loads.
    #[serde(default)]
    pub tools: BTreeMap<String, toml::Value>,
}

impl Bundle {
    /// Reads `bundle.toml` from `root`, checks it is coherent, and verifies every file's sha256.
    /// The error names every problem found, not only the first.
    pub fn load(root: &Path) -> anyhow::Result<Bundle> {
        let (bundle, problems) = Bundle::open(root)?;
        match problems.as_slice() {
            [] => Ok(bundle),
            [one] => bail!("{}", one.message),
            many => bail!(
                "the model bundle {} has {} problems: {}",
                root.display(),
                many.len(),
                many.iter()
                    .map(|p| p.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }

    /// Reads and parses `bundle.toml` (an error when it cannot be read or is not a manifest) and
    /// returns the bundle with every problem of coherence and of checksums it has, so that
    /// `bundle check` can go on and report them all.
    pub fn open(root: &Path) -> anyhow::Result<(Bundle, Vec<BundleProblem>)> {
        let manifest_path = root.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path).with_context(|| {
            format!(
                "cannot read the model bundle manifest {} (models.bundle = {})",
                manifest_path.display(),
                root.display()
            )
        })?;
        let manifest: Manifest = toml::from_str(&text).with_context(|| {
            format!("{} is not a valid bundle manifest", manifest_path.display())
        })?;
        let bundle = Bundle {
            root: root.to_path_buf(),
            manifest,
        };
        let mut problems = bundle.coherence_problems();
        problems.extend(bundle.checksum_problems());
        Ok((bundle, problems))
    }

    fn coherence_problems(&self) -> Vec<BundleProblem> {
        let m = &self.manifest;
        let mut problems = Vec::new();
        let mut problem = |message: String| {
            problems.push(BundleProblem {
                part: "manifest".into(),
                message,
            })
        };
        if m.schema != 1 {
            problem(format!(
                "bundle schema {} is not supported (this build reads schema 1)",
                m.schema
            ));
        }
        let categories = &m.taxonomy.categories;
        if categories.is_empty() {
            problem("bundle taxonomy has no categories".into());
        }
        for (i, category) in categories.iter().enumerate() {
            if categories[..i].contains(category) {
                problem(format!(
                    "taxonomy category {category:?} is listed twice (the classifier's logits \
                     follow the list, so each category needs its own place)"
                ));
            }
        }
        for key in m.taxonomy.descriptions.keys() {
            if key != "default" && !categories.contains(key) {
                problem(format!(
                    "[taxonomy.descriptions] has a template for {key:?}, which is not in the \
                     taxonomy"
                ));
            }
        }
        for name in m.action.tools.keys() {
            if let Err(e) = ToolName::parse(name) {
                problem(format!("[action.tools.{name}]: {e}"));
            }
        }
        if m.reasoning.mode == ReasoningMode::Vlm {
            match &m.reasoning.vlm {
                None => problem(
                    "reasoning.mode = \"vlm\" needs a [reasoning.vlm] table (models/README.md)"
                        .into(),
                ),
                Some(vlm) => {
                    if let Err(e) = vlm.check(m.reasoning.classifier.is_some()) {
                        problem(format!("{e:#}"));
                    }
                }
            }
        }
        for category in m.action.routing.keys() {
            if !categories.contains(category) {
                problem(format!(
                    "action routing names category {category:?}, which is not in the taxonomy"
                ));
            }
        }
        problems
    }

    fn checksum_problems(&self) -> Vec<BundleProblem> {
        let mut problems = Vec::new();
        for (name, expected) in &self.manifest.files {
            let mut problem = |message: String| {
                problems.push(BundleProblem {
                    part: "files".into(),
                    message,
                })
            };
            if !is_inside(name) {
                problem(format!(
                    "bundle file name {name:?} must be relative and inside the bundle"
                ));
                continue;
            }
            let path = self.root.join(name);
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    problem(format!(
                        "bundle file {} cannot be read: {e}",
                        path.display()
                    ));
                    continue;
                }
            };
            let actual = sha256_hex(&bytes);
            if !actual.eq_ignore_ascii_case(expected) {
                problem(format!(
                    "bundle file {} has sha256 {actual}, but bundle.toml says {expected}: \
                     the file was changed or the manifest is stale (`retoucher bundle lock` \
                     rewrites the checksums)",
                    path.display()
                ));
            }
        }
        problems
    }

    /// The path of a file the manifest refers to. It must have a checksum in `[files]`, so
    /// that every file a model is loaded from was verified.
    pub fn file(&self, file: &str) -> anyhow::Result<PathBuf> {
        if !self.manifest.files.contains_key(file) {
            bail!(
                "bundle file {file:?} has no sha256 in [files] of {}",
                self.root.join("bundle.toml").display()
            );
        }
        Ok(self.root.join(file))
    }

    /// The checksum recorded for a file (verified at load).
    pub fn sha256(&self, file: &str) -> &str {
        self.manifest
            .files
            .get(file)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The tool that repairs regions of a category.
    pub fn tool_for(&self, category: &str) -> ToolName {
        self.manifest
            .action
            .routing
            .get(category)
            .copied()
            .unwrap_or(self.manifest.action.default_tool)
    }

    /// The description of a region, from the bundle's templates.
    pub fn describe(&self, category: &str, score: f32, area: u32) -> String {
        let templates = &self.manifest.taxonomy.descriptions;
        let template = templates
            .get(category)
            .or_else(|| templates.get("default"))
            .map(String::as_str)
            .unwrap_or("{category} distortion (confidence {score})");
        template
            .replace("{category}", category)
            .replace("{score}", &format!("{score:.2}"))
            .replace("{area}", &area.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/reference")
    }

    #[test]
    fn reference_bundle_loads_and_routes() {
        let bundle = Bundle::load(&reference()).unwrap();
        assert_eq!(bundle.manifest.taxonomy.categories.len(), 12);
        assert_eq!(bundle.tool_for("hand").as_str(), "onnx-inpaint");
        assert_eq!(bundle.tool_for("object").as_str(), "patchmatch");
        assert!(bundle.describe("hand", 0.9, 10).len() > 5);
    }

    #[test]
    fn tampered_file_is_named_with_both_checksums() {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(reference()).unwrap() {
            let entry = entry.unwrap();
            if entry.path().is_file() {
                std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
        }
        let mut bytes = std::fs::read(dir.path().join("classifier.onnx")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(dir.path().join("classifier.onnx"), bytes).unwrap();
        let err = format!("{:#}", Bundle::load(dir.path()).unwrap_err());
        assert!(err.contains("classifier.onnx"), "{err}");
        assert!(err.contains("bundle.toml says"), "{err}");
    }

    /// Loads `models/vlm-reference/bundle.toml` with one line replaced (or removed when
    /// `with` is empty); returns the load error.
    fn vlm_bundle_error(line: &str, with: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vlm-reference/bundle.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text
            .find(line)
            .unwrap_or_else(|| panic!("no line {line:?}"));
        let end = start + text[start..].find('\n').unwrap() + 1;
        let edited = format!("{}{with}{}", &text[..start], &text[end..]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.toml"), edited).unwrap();
        format!("{:#}", Bundle::load(dir.path()).unwrap_err())
    }

    #[test]
    fn bad_vlm_keys_are_refused_by_name() {
        let cases = [
            (
                "bbox_coordinates =",
                "bbox_coordinates = \"pixels\"\n",
                "bbox_coordinates",
            ),
            ("fallback =", "fallback = \"retry\"\n", "fallback"),
            (
                "max_new_tokens =",
                "max_new_tokens = 0\n",
                "reasoning.vlm.max_new_tokens",
            ),
            ("max_new_tokens =", "", "max_new_tokens"),
            (
                "merge_size =",
                "merge_size = 0\n",
                "reasoning.vlm.merge_size",
            ),
            (
                "max_pixels =",
                "max_pixels = 100\n",
                "reasoning.vlm.max_pixels",
            ),
            (
                "stop_tokens =",
                "stop_tokens = []\n",
                "reasoning.vlm.stop_tokens",
            ),
            (
                "std = [0.26862954",
                "std = [0.0, 1.0, 1.0]\n",
                "reasoning.vlm.std",
            ),
            ("classifier = ", "", "reasoning.vlm.fallback"),
            (
                "template =",
                "template = \"no image {{prompt}}\"\n",
                "reasoning.vlm.template",
            ),
            (
                "template =",
                "template = \"<|image_pad|> {{question}}\"\n",
                "{{question}}",
            ),
            ("[reasoning.vlm]", "[reasoning.other]\n", "[reasoning.vlm]"),
        ];
        for (line, with, key) in cases {
            let err = vlm_bundle_error(line, with);
            assert!(err.contains(key), "{line} -> {with:?}: {err}");
        }
    }

    #[test]
    fn missing_bundle_says_which_key_to_fix() {
        let err = format!("{:#}", Bundle::load(Path::new("/nonexistent")).unwrap_err());
        assert!(err.contains("models.bundle"), "{err}");
    }
}
