//! `retoucher bundle check` and `retoucher bundle lock`, run as an operator would, on real ONNX
//! Runtime sessions: every committed bundle passes `check`; a broken bundle reports all its
//! problems in one run; `lock` after an edit makes `check` pass again, keeping the rest of the manifest.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Every committed bundle (every `bundle.toml` under models/ must be listed here); each must
/// pass `check`. The VLM bundles' tokenizer.json is fetched by their generate.py
/// (scripts/test-services.sh runs it).
const BUNDLES: &[&str] = &[
    "models/reference",
    "models/vlm-reference",
    "models/vlm-reference/fp16",
    "models/vlm-reference/qwen2-vl",
    "models/diffusion-reference",
    "models/blemish",
];

/// Runs `retoucher bundle ARGS`; returns (success, stdout, stderr).
fn bundle(args: &[&str]) -> (bool, String, String) {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .arg("bundle")
            .args(args)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(120),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bundle check --json DIR`: (success, the report).
fn check_json(dir: &Path) -> (bool, Value) {
    let (ok, stdout, stderr) = bundle(&["check", "--json", &path_str(dir)]);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a JSON report ({e}):\n{stdout}\n{stderr}"));
    (ok, report)
}

fn problems(report: &Value) -> Vec<(String, String)> {
    report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["part"].as_str().unwrap().to_string(),
                p["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn manifests_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            manifests_under(&path, out);
        } else if path.file_name().is_some_and(|n| n == "bundle.toml") {
            out.push(path.parent().unwrap().to_path_buf());
        }
    }
}

#[test]
fn every_committed_bundle_passes_check() {
    let mut committed = Vec::new();
    manifests_under(&repo().join("models"), &mut committed);
    for dir in &committed {
        let name = dir.strip_prefix(repo()).unwrap().to_string_lossy();
        assert!(
            BUNDLES.iter().any(|b| *b == name),
            "{name}/bundle.toml is not in BUNDLES (tests/bundle_check.rs)"
        );
    }
    for dir in BUNDLES {
        let (ok, report) = check_json(&repo().join(dir));
        let found = problems(&report);
        assert!(ok && found.is_empty(), "{dir}: {found:#?}");
        let parts = report["parts"].as_array().unwrap();
        let names: Vec<&str> = parts.iter().map(|p| p["part"].as_str().unwrap()).collect();
        assert_eq!(names[..2], ["perception", "reasoning"], "{dir}");
        assert!(
            names[2..].iter().all(|n| n.starts_with("tool ")),
            "{dir}: {names:?}"
        );
        for part in parts {
            assert_eq!(part["loaded"], true, "{dir}: {part}");
            for model in part["models"].as_array().unwrap() {
                assert!(model["warm_up_ms"].as_f64().is_some(), "{dir}: {model}");
            }
        }
        // Perception is a model, checked and warmed up.
        assert_eq!(parts[0]["models"].as_array().unwrap().len(), 1, "{dir}");
    }
}

/// A copy of the reference bundle in a temporary folder.
fn reference_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("models/reference")).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn a_broken_bundle_reports_every_problem_at_once() {
    let dir = reference_copy();
    let root = dir.path();
    // Perception's input renamed (same length, so the graph stays valid); its checksum is now
    // stale too.
    let model = std::fs::read(root.join("perception.onnx")).unwrap();
    let renamed = String::from_utf8_lossy(&model)
        .matches("pixel_values")
        .count();
    assert!(renamed >= 1);
    let mut patched = model.clone();
    let mut at = 0;
    while let Some(i) = patched[at..].windows(12).position(|w| w == b"pixel_values") {
        patched[at + i + 11] = b'Z';
        at += i + 12;
    }
    std::fs::write(root.join("perception.onnx"), patched).unwrap();
    // A missing file.
    std::fs::remove_file(root.join("inpaint.onnx")).unwrap();
    let manifest = root.join("bundle.toml");
    // Routing to a category that is not in the taxonomy.
    edit(
        &manifest,
        "hand = \"onnx-inpaint\"",
        "hand = \"onnx-inpaint\"\nhands = \"patchmatch\"",
    );
    // A thirteenth category: the classifier has twelve logits.
    edit(&manifest, "\"background\"]", "\"background\", \"sky\"]");

    let (ok, report) = check_json(root);
    assert!(!ok);
    let found = problems(&report);
    let has = |part: &str, text: &str| found.iter().any(|(p, m)| p == part && m.contains(text));
    assert!(
        has("files", "perception.onnx has sha256"),
        "bad checksum: {found:#?}"
    );
    assert!(
        has("files", "inpaint.onnx cannot be read"),
        "missing file: {found:#?}"
    );
    assert!(
        has(
            "manifest",
            "category \"hands\", which is not in the taxonomy"
        ),
        "bad routing: {found:#?}"
    );
    assert!(
        has("perception", "has no input \"pixel_values\""),
        "wrong input name: {found:#?}"
    );
    assert!(
        has(
            "reasoning",
            "outputs 12 logits but the taxonomy has 13 categories"
        ),
        "wrong logits count: {found:#?}"
    );
    assert!(
        has("tool onnx-inpaint", "inpaint.onnx"),
        "the tool cannot load: {found:#?}"
    );
    assert_eq!(found.len(), 6, "{found:#?}");

    // The same, for people.
    let (ok, text, _) = bundle(&["check", &path_str(root)]);
    assert!(!ok);
    assert!(text.contains("6 problems:"), "{text}");
    assert!(
        text.contains("  tool patchmatch: loaded, no model"),
        "{text}"
    );
}

#[test]
fn lock_after_an_edit_makes_check_pass_and_keeps_the_manifest() {
    let dir = reference_copy();
    let root = dir.path();
    let manifest = root.join("bundle.toml");
    edit(&manifest, "[perception]", "# tuned by hand\n[perception]");
    // A changed file: the tokenizer, still valid JSON.
    let tokenizer = root.join("tokenizer.json");
    let mut bytes = std::fs::read(&tokenizer).unwrap();
    bytes.push(b'\n');
    std::fs::write(&tokenizer, bytes).unwrap();
    let (ok, report) = check_json(root);
    assert!(!ok, "a stale checksum fails check");
    assert_eq!(problems(&report).len(), 1, "{report}");

    let before = std::fs::read_to_string(&manifest).unwrap();
    let (ok, stdout, stderr) = bundle(&["lock", &path_str(root)]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("3 unchanged, 1 updated, 0 added"),
        "{stdout}"
    );
    let after = std::fs::read_to_string(&manifest).unwrap();
    let changed: Vec<(&str, &str)> = before
        .lines()
        .zip(after.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(before.lines().count(), after.lines().count());
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(changed[0].1.starts_with("\"tokenizer.json\" = \""));
    assert!(after.contains("# tuned by hand\n[perception]"));

    let (ok, report) = check_json(root);
    assert!(ok, "{report}");
}
