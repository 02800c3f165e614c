//! The evaluation manifest (design §4.8): one JSON object per line, `{"id", "image", "prompt",
//! "mask", "clean"?, "class"?}`, paths relative to the manifest. Every line that cannot be
//! evaluated is reported with its line number and the reason, and the others still run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use serde_json::{Map as JsonMap, Value};

use crate::job::validate_job_id;

/// One image to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// 1-based line of the manifest.
    pub line: usize,
    pub id: String,
    pub image: PathBuf,
    pub prompt: String,
    /// Ground truth: 8-bit grey, > 127 = defect, all zero = a defect-free image.
    pub mask: PathBuf,
    /// The image before its defects, when known.
    pub clean: Option<PathBuf>,
    pub class: Option<String>,
}

/// A manifest line, or an image of one, that was not evaluated, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub reason: String,
}

/// The cases of a manifest and the lines that are not cases.
#[derive(Debug)]
pub struct Manifest {
    pub path: PathBuf,
    pub cases: Vec<Case>,
    pub problems: Vec<Problem>,
}

impl Manifest {
    /// Reads a manifest; only an unreadable file is an error, bad lines are [`Problem`]s.
    /// Prompts longer than `max_prompt_bytes` (the jobs' limit) are refused as jobs would be.
    pub fn load(path: &Path, max_prompt_bytes: usize) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the manifest {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut manifest = Manifest::parse(&text, base, max_prompt_bytes);
        manifest.path = path.to_path_buf();
        Ok(manifest)
    }

    /// Parses manifest text whose relative paths are relative to `base`; checks that every file
    /// a line names exists and that ids are unique job ids.
    pub fn parse(text: &str, base: &Path, max_prompt_bytes: usize) -> Manifest {
        let mut cases = Vec::new();
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            if raw.trim().is_empty() {
                continue;
            }
            match parse_line(raw, line, base, max_prompt_bytes) {
                Ok(case) if !seen.insert(case.id.clone()) => problems.push(Problem {
                    line,
                    id: Some(case.id.clone()),
                    reason: format!(
                        "the id {:?} is used by an earlier line: results would overwrite each other",
                        case.id
                    ),
                }),
                Ok(case) => cases.push(case),
                Err((id, reason)) => problems.push(Problem { line, id, reason }),
            }
        }
        Manifest {
            path: PathBuf::new(),
            cases,
            problems,
        }
    }
}

fn parse_line(
    raw: &str,
    line: usize,
    base: &Path,
    max_prompt_bytes: usize,
) -> Result<Case, (Option<String>, String)> {
    let value: Value =
        serde_json::from_str(raw).map_err(|e| (None, format!("not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err((None, "not a JSON object".to_string()));
    };
    let id = required(&object, "id").map_err(|e| (None, e))?;
    let fail = |reason: String| (Some(id.clone()), reason);
    validate_job_id(&id).map_err(|e| fail(e.to_string().replace("'job_id'", "'id'")))?;
    let prompt = required(&object, "prompt").map_err(fail)?;
    if prompt.len() > max_prompt_bytes {
        return Err(fail(format!(
            "field 'prompt' is {} bytes, over the limit of {max_prompt_bytes}",
            prompt.len()
        )));
    }
    let file = |key: &str, value: String| {
        let path = base.join(&value);
        if path.is_file() {
            Ok(path)
        } else {
            Err(fail(format!(
                "the {key} file {} does not exist",
                path.display()
            )))
        }
    };
    let image = file("image", required(&object, "image").map_err(fail)?)?;
    let mask = file("mask", required(&object, "mask").map_err(fail)?)?;
    let clean = match optional(&object, "clean").map_err(fail)? {
        Some(c) => Some(file("clean", c)?),
        None => None,
    };
    let class = optional(&object, "class").map_err(fail)?;
    if class.as_deref() == Some("") {
        return Err(fail("field 'class' is empty".to_string()));
    }
    Ok(Case {
        line,
        id: id.clone(),
        image,
        prompt,
        mask,
        clean,
        class,
    })
}

fn required(object: &JsonMap<String, Value>, key: &str) -> Result<String, String> {
    optional(object, key)?.ok_or_else(|| format!("required field '{key}' is missing"))
}

fn optional(object: &JsonMap<String, Value>, key: &str) -> Result<Option<String>, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("field '{key}' must be a string, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_and_bad_lines_are_told_apart_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a.png", "a-mask.png", "a-clean.png", "b.png", "b-mask.png"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let text = [
            r#"{"id": "a", "image": "a.png", "prompt": "p", "mask": "a-mask.png", "clean": "a-clean.png", "class": "blur", "extra": 1}"#,
            "",
            r#"{"id": "b", "image": "b.png", "prompt": "q", "mask": "b-mask.png"}"#,
            r#"{"id": "c", "image": "b.png", "prompt": "q"}"#,
            r#"{"id": "d", "image": "missing.png", "prompt": "q", "mask": "b-mask.png"}"#,
            r#"{"id": "a", "image": "b.png", "prompt": "q", "mask": "b-mask.png"}"#,
            r#"{"id": "e f", "image": "b.png", "prompt": "q", "mask": "b-mask.png"}"#,
            r#"{"id": "g", "image": "b.png", "prompt": 3, "mask": "b-mask.png"}"#,
            "{not json",
            "[1]",
            r#"{"id": "h", "image": "b.png", "prompt": "q", "mask": "b-mask.png", "clean": "nope.png"}"#,
            &format!(r#"{{"id": "i", "image": "b.png", "prompt": "{}", "mask": "b-mask.png"}}"#, "x".repeat(4097)),
        ]
        .join("\n");
        let m = Manifest::parse(&text, dir.path(), 4096);
        assert_eq!(
            m.cases[0],
            Case {
                line: 1,
                id: "a".into(),
                image: dir.path().join("a.png"),
                prompt: "p".into(),
                mask: dir.path().join("a-mask.png"),
                clean: Some(dir.path().join("a-clean.png")),
                class: Some("blur".into()),
            }
        );
        assert_eq!(m.cases[1].line, 3);
        assert_eq!(m.cases[1].clean, None);
        assert_eq!(m.cases.len(), 2);
        let got: Vec<(usize, &str)> = m
            .problems
            .iter()
            .map(|p| (p.line, p.reason.as_str()))
            .collect();
        let expect = [
            (4, "required field 'mask' is missing"),
            (5, "the image file"),
            (6, "used by an earlier line"),
            (7, "field 'id' may only contain"),
            (8, "field 'prompt' must be a string, got 3"),
            (9, "not valid JSON"),
            (10, "not a JSON object"),
            (11, "the clean file"),
            (12, "4097 bytes, over the limit of 4096"),
        ];
        assert_eq!(got.len(), expect.len(), "{got:?}");
        for ((line, reason), (want_line, want)) in got.iter().zip(expect) {
            assert_eq!(*line, want_line);
            assert!(
                reason.contains(want),
                "line {line}: {reason:?} lacks {want:?}"
            );
        }
        assert_eq!(m.problems[1].id.as_deref(), Some("d"));
        assert!(m.problems[1].reason.contains("missing.png"));
    }
}
