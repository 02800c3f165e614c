//! Assembles the process from its settings: the model bundle and its agents (loaded, batched,
//! warmed up), the storage (S3 or local files), and the [`Executor`] that runs jobs with them.
//! Every command that runs jobs (`worker`, `run`, `bench`, `eval`) builds them here, so they
//! all run the same pipeline the same way.

use std::sync::Arc;

use anyhow::Context;

use crate::agents::Agents;
use crate::bundle::Bundle;
use crate::config::Settings;
use crate::engine::batcher::BatchObserver;
use crate::execute::Executor;
use crate::metrics::{metrics, BatchMetrics};
use crate::storage::{S3Settings, Storage};

/// Where a command's jobs read their images and write their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// Local files (`run`, `bench`, `eval`).
    Local,
    /// S3 as `s3.*` configures it (`worker`, `bench --through-broker`).
    S3,
}

/// Loads the bundle, starts the agents' batchers (reporting to `observer`) and warms every
/// model up.
pub async fn agents(
    settings: &Settings,
    observer: Arc<dyn BatchObserver>,
) -> anyhow::Result<Arc<Agents>> {
    let load = async {
        let bundle = Bundle::load(&settings.models.bundle)?;
        let engine = settings.models.engine_options()?;
        let agents = Agents::load(bundle, &engine, &settings.batching, observer)?;
        agents.warm_up().await?;
        Ok::<_, anyhow::Error>(Arc::new(agents))
    };
    load.await.with_context(|| {
        format!(
            "loading the model bundle {}",
            settings.models.bundle.display()
        )
    })
}

/// The storage of a kind; S3 requests are counted in the metrics.
pub async fn storage(settings: &Settings, kind: StorageKind) -> anyhow::Result<Storage> {
    match kind {
        StorageKind::Local => Ok(Storage::local()),
        StorageKind::S3 => {
            let s3 = S3Settings {
                endpoint: settings.s3.endpoint.clone(),
                region: settings.s3.region.clone(),
                force_path_style: settings.s3.force_path_style,
                allowed_buckets: settings.s3.allowed_buckets.clone(),
            };
            let storage = Storage::s3_tuned(&s3, &settings.s3.tuning())
                .await
                .map_err(|e| anyhow::anyhow!("configuring S3: {e}"))?;
            Ok(storage.with_observer(Arc::new(|op, outcome| {
                metrics()
                    .s3_requests_total
                    .with_label_values(&[op, outcome])
                    .inc();
            })))
        }
    }
}

/// Agents (batches reported to the Prometheus metrics) and storage, ready to run jobs.
pub async fn executor(settings: &Settings, kind: StorageKind) -> anyhow::Result<Executor> {
    let agents = agents(settings, Arc::new(BatchMetrics)).await?;
    let storage = storage(settings, kind).await?;
    Ok(Executor::new(agents, storage, settings.limits.clone()))
}
