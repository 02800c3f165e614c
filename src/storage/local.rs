//! Local files as storage, for the `run` command (no broker, no S3).
//!
//! Same contract as S3: a missing file is `ImageNotFound`, a file over the limit is
//! `ImageTooLarge`, and writes are atomic (temporary file in the same folder, then rename), so an
//! interrupted run never leaves a truncated result that a re-run would trust.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::show_path;
use crate::error::{ErrorClass, JobError};

pub(super) async fn get(path: &Path, max_bytes: u64) -> Result<Bytes, JobError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| read_error(path, &e))?;
    let meta = file.metadata().await.map_err(|e| read_error(path, &e))?;
    // Devices and FIFOs could stream forever, and a folder is never an image.
    if !meta.is_file() {
        return Err(JobError::new(
            ErrorClass::ImageNotFound,
            format!("{} is not a regular file", show_path(path)),
        ));
    }
    if meta.len() > max_bytes {
        return Err(too_large(path, meta.len(), max_bytes));
    }
    // The file may grow between the check and the read: read at most one byte past the limit.
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut buf)
        .await
        .map_err(|e| read_error(path, &e))?;
    if buf.len() as u64 > max_bytes {
        return Err(too_large(path, buf.len() as u64, max_bytes));
    }
    Ok(Bytes::from(buf))
}

pub(super) async fn put(path: &Path, body: Bytes) -> Result<(), JobError> {
    let write_error = |e: std::io::Error| {
        JobError::new(
            ErrorClass::StorageUnavailable,
            format!("cannot write {}: {e}", show_path(path)),
        )
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    tokio::fs::create_dir_all(dir).await.map_err(write_error)?;
    let tmp = temp_path(dir, path);
    let written = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        file.write_all(&body).await?;
        // No fsync: the rename already makes the file appear whole or not at all to a process
        // that crashes and retries; surviving power loss is not worth an fsync per result file
        // for local runs.
        file.flush().await?;
        drop(file);
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if let Err(e) = written {
        // Best effort: the temporary file is hidden and harmless if this fails too.
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(write_error(e));
    }
    Ok(())
}

pub(super) async fn exists(path: &Path) -> Result<bool, JobError> {
    tokio::fs::try_exists(path).await.map_err(|e| {
        JobError::new(
            ErrorClass::StorageUnavailable,
            format!("cannot check {}: {e}", show_path(path)),
        )
    })
}

/// A hidden name next to `path`, unique within this process and across processes.
fn temp_path(dir: &Path, path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn read_error(path: &Path, e: &std::io::Error) -> JobError {
    let class = match e.kind() {
        ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::IsADirectory => {
            ErrorClass::ImageNotFound
        }
        _ => ErrorClass::StorageUnavailable,
    };
    let what = if class == ErrorClass::ImageNotFound {
        "does not exist".to_owned()
    } else {
        format!("cannot be read: {e}")
    };
    JobError::new(class, format!("file {} {what}", show_path(path)))
}

fn too_large(path: &Path, size: u64, max_bytes: u64) -> JobError {
    JobError::new(
        ErrorClass::ImageTooLarge,
        format!(
            "file {} is {size} bytes, over the limit of {max_bytes} bytes",
            show_path(path)
        ),
    )
}
