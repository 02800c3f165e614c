//! `retoucher bundle lock`: writes the sha256 of every file a bundle's manifest refers to into
//! its `[files]` table, so a bundle edited by hand (or exported by a script) is verifiable.
//!
//! The files are those already listed in `[files]` plus every string value of the manifest
//! that names a file or folder inside the bundle (a folder stands for every file under it:
//! `export = "sd-inpaint"` locks the whole diffusers export). The rest of `bundle.toml` is kept as
//! it is, comments and order included (`toml_edit`); entries already in `[files]` keep their
//! place and new ones are appended in name order. A value naming a path that leaves the bundle
//! (absolute, through `..` or a symbolic link) is refused, and so is a listed file that does not
//! exist: nothing is written then.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;
use toml_edit::{DocumentMut, Item, Table, Value};

use super::{is_inside, sha256_hex, MANIFEST};

/// What `bundle lock` wrote.
#[derive(Debug, Default, Serialize)]
pub struct LockReport {
    /// Entries whose checksum was already right.
    pub unchanged: Vec<String>,
    /// Entries whose checksum changed.
    pub updated: Vec<String>,
    /// Files added to `[files]`.
    pub added: Vec<String>,
}

impl LockReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} unchanged, {} updated, {} added\n",
            self.unchanged.len(),
            self.updated.len(),
            self.added.len()
        );
        for name in &self.updated {
            out.push_str(&format!("  updated {name}\n"));
        }
        for name in &self.added {
            out.push_str(&format!("  added {name}\n"));
        }
        out
    }
}

/// Locks the bundle in `root`: rewrites `bundle.toml` with the checksums of its files.
pub fn lock(root: &Path) -> anyhow::Result<LockReport> {
    let manifest = root.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let mut doc: DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", manifest.display()))?;
    let canonical_root = root
        .canonicalize()
        .with_context(|| format!("cannot resolve the bundle folder {}", root.display()))?;

    let mut problems = Vec::new();
    let listed: Vec<String> = match doc.get("files") {
        Some(item) => match item.as_table_like() {
            Some(table) => table.iter().map(|(k, _)| k.to_string()).collect(),
            None => bail!("[files] of {} is not a table", manifest.display()),
        },
        None => Vec::new(),
    };
    let mut files = BTreeSet::new();
    for name in &listed {
        match resolve(root, &canonical_root, name) {
            Ok(Some(found)) => files.extend(found),
            Ok(None) => problems.push(format!(
                "[files] lists {name:?}, which does not exist in the bundle"
            )),
            Err(why) => problems.push(why),
        }
    }
    let mut strings = Vec::new();
    for (key, item) in doc.iter() {
        if key != "files" {
            collect_strings(item, &mut strings);
        }
    }
    for value in strings {
        match resolve(root, &canonical_root, &value) {
            Ok(Some(found)) => files.extend(found),
            // Most strings are not paths (names, templates, tokens).
            Ok(None) => {}
            Err(why) => problems.push(why),
        }
    }
    files.remove(MANIFEST);
    if !problems.is_empty() {
        bail!(
            "not locking {}: {}",
            manifest.display(),
            problems.join("; ")
        );
    }

    if doc.get("files").is_none() {
        doc["files"] = Item::Table(Table::new());
    }
    let table = doc["files"]
        .as_table_like_mut()
        .context("[files] is not a table")?;
    let mut report = LockReport::default();
    // Existing entries first, in their order, then new ones by name.
    let mut order: Vec<String> = listed.clone();
    order.extend(files.iter().filter(|f| !listed.contains(f)).cloned());
    for name in order {
        let bytes = std::fs::read(root.join(&name))
            .with_context(|| format!("reading {}", root.join(&name).display()))?;
        let sha = sha256_hex(&bytes);
        match table.get(&name).and_then(Item::as_str) {
            Some(old) if old.eq_ignore_ascii_case(&sha) => report.unchanged.push(name),
            Some(_) => {
                set_keeping_decor(table.get_mut(&name), &sha);
                report.updated.push(name);
            }
            None if table.contains_key(&name) => {
                set_keeping_decor(table.get_mut(&name), &sha);
                report.updated.push(name);
            }
            None => {
                table.insert(&name, toml_edit::value(sha));
                report.added.push(name);
            }
        }
    }
    let tmp = root.join(format!(".{MANIFEST}.lock-tmp"));
    std::fs::write(&tmp, doc.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &manifest)
        .with_context(|| format!("replacing {}", manifest.display()))?;
    Ok(report)
}

/// Sets a string value, keeping the comment and spacing around the old one.
fn set_keeping_decor(item: Option<&mut Item>, sha: &str) {
    if let Some(item) = item {
        let decor = item.as_value().map(|v| v.decor().clone());
        let mut value = Value::from(sha);
        if let Some(decor) = decor {
            *value.decor_mut() = decor;
        }
        *item = Item::Value(value);
    }
}

/// Every string value under an item (tables, arrays, inline tables).
fn collect_strings(item: &Item, out: &mut Vec<String>) {
    match item {
        Item::Value(value) => collect_value_strings(value, out),
        Item::Table(table) => table.iter().for_each(|(_, i)| collect_strings(i, out)),
        Item::ArrayOfTables(tables) => tables
            .iter()
            .for_each(|t| t.iter().for_each(|(_, i)| collect_strings(i, out))),
        Item::None => {}
    }
}

fn collect_value_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.value().clone()),
        Value::Array(array) => array.iter().for_each(|v| collect_value_strings(v, out)),
        Value::InlineTable(table) => table
            .iter()
            .for_each(|(_, v)| collect_value_strings(v, out)),
        _ => {}
    }
}

/// The bundle files a manifest string names: `Some(files)` when it names a file or folder in the
/// bundle (a folder: every file under it), `None` when it names nothing there (it is not a
/// path), an error when it names something outside the bundle.
fn resolve(root: &Path, canonical_root: &Path, name: &str) -> Result<Option<Vec<String>>, String> {
    let path = Path::new(name);
    let plausible = path.components().any(|c| matches!(c, Component::Normal(_)));
    if name.is_empty() || !plausible || name.contains('\n') {
        return Ok(None);
    }
    let outside = || {
        format!("{name:?} names a file outside the bundle: a bundle must hold every file it uses")
    };
    if !is_inside(name) {
        // Only a path that exists is a file reference; other strings are just text.
        let exists = if path.is_absolute() {
            path.exists()
        } else {
            root.join(path).exists()
        };
        return if exists { Err(outside()) } else { Ok(None) };
    }
    let full = root.join(path);
    let Ok(canonical) = full.canonicalize() else {
        return Ok(None);
    };
    if !canonical.starts_with(canonical_root) {
        return Err(outside());
    }
    if canonical.is_file() {
        return Ok(Some(vec![relative_name(path)]));
    }
    let mut found = Vec::new();
    walk(root, canonical_root, path, &mut found).map_err(|e| format!("{name:?}: {e}"))?;
    Ok(Some(found))
}

/// The files under folder `dir` (relative to `root`), by relative name.
fn walk(
    root: &Path,
    canonical_root: &Path,
    dir: &Path,
    out: &mut Vec<String>,
) -> Result<(), String> {
    let entries = std::fs::read_dir(root.join(dir)).map_err(|e| e.to_string())?;
    let mut entries: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| dir.join(e.file_name())))
        .collect();
    entries.sort();
    for entry in entries {
        let canonical = root
            .join(&entry)
            .canonicalize()
            .map_err(|e| e.to_string())?;
        if !canonical.starts_with(canonical_root) {
            return Err(format!(
                "{} links outside the bundle: a bundle must hold every file it uses",
                entry.display()
            ));
        }
        if canonical.is_dir() {
            walk(root, canonical_root, &entry, out)?;
        } else {
            out.push(relative_name(&entry));
        }
    }
    Ok(())
}

/// A relative path as `[files]` writes it: `/`-separated.
fn relative_name(path: &Path) -> String {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keeps_comments_and_order_and_refuses_outside_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.onnx"), b"model a").unwrap();
        std::fs::create_dir_all(root.join("export/unet")).unwrap();
        std::fs::write(root.join("export/unet/model.onnx"), b"unet").unwrap();
        std::fs::write(root.join("export/model_index.json"), b"{}").unwrap();
        std::fs::write(root.join("b.json"), b"listed only").unwrap();
        let manifest = "\
# a hand-written bundle
name = \"x\" # its name

[perception]
model = \"a.onnx\"
tokenizer = \"missing.json\"
template = \"not a path at all\"

[action.tools.diffusion]
export = \"export\"

[files]
# kept in place
\"b.json\" = \"stale\"
";
        std::fs::write(root.join(MANIFEST), manifest).unwrap();
        let report = lock(root).unwrap();
        assert_eq!(report.updated, vec!["b.json"]);
        assert_eq!(
            report.added,
            vec![
                "a.onnx",
                "export/model_index.json",
                "export/unet/model.onnx"
            ]
        );
        let text = std::fs::read_to_string(root.join(MANIFEST)).unwrap();
        assert!(text.starts_with("# a hand-written bundle\nname = \"x\" # its name\n"));
        assert!(text.contains("# kept in place\n\"b.json\" = \""), "{text}");
        assert!(text.contains(&format!("\"a.onnx\" = \"{}\"", sha256_hex(b"model a"))));
        // Locking again changes nothing.
        let again = lock(root).unwrap();
        assert!(again.updated.is_empty() && again.added.is_empty());
        assert_eq!(std::fs::read_to_string(root.join(MANIFEST)).unwrap(), text);

        // A value naming a file outside the bundle is refused, and nothing is written.
        let outside = tempfile::NamedTempFile::new().unwrap();
        let bad = text.replace(
            "template = \"not a path at all\"",
            &format!("template = {:?}", outside.path().display().to_string()),
        );
        std::fs::write(root.join(MANIFEST), &bad).unwrap();
        let err = lock(root).unwrap_err().to_string();
        assert!(err.contains("outside the bundle"), "{err}");
        assert_eq!(std::fs::read_to_string(root.join(MANIFEST)).unwrap(), bad);
    }

    #[test]
    fn a_listed_file_that_is_gone_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MANIFEST),
            "name = \"x\"\n[files]\n\"gone.onnx\" = \"00\"\n",
        )
        .unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(err.contains("\"gone.onnx\", which does not exist"), "{err}");
    }
}
