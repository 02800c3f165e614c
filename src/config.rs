//! Layered configuration (design §4.2): built-in defaults ← `config/default.toml` ← `--config` /
//! `RETOUCHER_CONFIG` ← `RETOUCHER__SECTION__KEY` environment variables ← command-line overrides.
//!
//! The built-in defaults are `config/default.toml` itself, compiled in, so the documented file and
//! the behaviour of a binary run from anywhere cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::engine::staging::IoMode;
use crate::engine::{ConvSearch, Cudnn, Device, EngineOptions};

const BUILT_IN: &str = include_str!("../config/default.toml");

/// Keys whose values are lists: comma-separated in environment variables and `--set`.
const LIST_KEYS: &[&str] = &["s3.allowed_buckets", "retry.delays_ms"];

/// Every setting of the worker, as read from all layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub s3: S3Config,
    pub models: ModelSettings,
    pub metrics: MetricsSettings,
    pub worker: WorkerSettings,
    pub limits: Limits,
    pub retry: RetrySettings,
    #[serde(default)]
    pub batching: BTreeMap<String, BatchingOverride>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerSettings {
    pub url: String,
    pub queue: String,
    pub prefetch: u16,
    pub connect_timeout_secs: u64,
    /// Files for `amqps://` URLs (`broker.tls.*`).
    #[serde(default)]
    pub tls: crate::broker::TlsFiles,
    /// A folder of migration files used instead of the built-in ones; empty = built-in.
    #[serde(default)]
    pub migrations: PathBuf,
}

impl BrokerSettings {
    /// The URL and TLS files, as [`crate::broker::connect`] takes them.
    pub fn endpoint(&self) -> crate::broker::Endpoint {
        crate::broker::Endpoint::new(self.url.clone()).with_tls(self.tls.clone())
    }

    /// The broker topology's migrations: built in, or `broker.migrations`.
    pub fn migrations(&self) -> Result<crate::broker::Migrations, crate::broker::BrokerError> {
        crate::broker::Migrations::configured(&self.migrations)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub force_path_style: bool,
    pub allowed_buckets: Vec<String>,
    pub output: String,
    /// Attempts per S3 request inside one job attempt (the SDK's own retries, with backoff).
    pub max_attempts: u32,
    pub connect_timeout_secs: u64,
    pub attempt_timeout_secs: u64,
    pub operation_timeout_secs: u64,
}

impl S3Config {
    /// The S3 client's timeouts and retries.
    pub fn tuning(&self) -> crate::storage::S3Tuning {
        crate::storage::S3Tuning {
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            attempt_timeout: Duration::from_secs(self.attempt_timeout_secs),
            operation_timeout: Duration::from_secs(self.operation_timeout_secs),
            max_attempts: self.max_attempts,
        }
    }
}

/// How transient job failures are retried through the delay queues (see [`crate::broker::retry`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrySettings {
    /// Attempts per job, the first included, before a transient failure is dead-lettered.
    pub max_attempts: u32,
    /// Delay before each retry in milliseconds, at most the delay queue's TTL; empty = the
    /// topology's ladder. The last entry repeats.
    #[serde(deserialize_with = "one_or_many")]
    pub delays_ms: Vec<u64>,
    /// Fraction of each delay that is randomised away (0 = none, 0.5 = between half and all).
    pub jitter: f64,
}

/// A list, or a single value standing for a list of one: the environment layer reads
/// `RETOUCHER__RETRY__DELAYS_MS=500` as the number 500 before it would split it into a list.
/// Items may come as text (`--set retry.delays_ms=100,250` gives `["100", "250"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Number(u64),
        Text(String),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Item),
        Many(Vec<Item>),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(item) => vec![item],
        OneOrMany::Many(items) => items,
    };
    items
        .into_iter()
        .map(|item| match item {
            Item::Number(v) => Ok(v),
            Item::Text(t) => t.trim().parse().map_err(|_| {
                serde::de::Error::custom(format!("{t:?} is not a number of milliseconds"))
            }),
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSettings {
    pub bundle: PathBuf,
    pub device: String,
    pub fallback_to_cpu: bool,
    pub intra_threads: usize,
    pub ort_library: String,
    pub io_binding: String,
    pub cudnn_conv_search: String,
    pub cudnn_max_workspace: bool,
}

impl ModelSettings {
    /// How model sessions are created, as these settings ask. (The settings know the engine's
    /// types, not the other way round: the engine is usable without a configuration.)
    pub fn engine_options(&self) -> anyhow::Result<EngineOptions> {
        Ok(EngineOptions {
            device: Device::parse(&self.device)?,
            fallback_to_cpu: self.fallback_to_cpu,
            intra_threads: self.intra_threads,
            ort_library: self.ort_library.clone(),
            io: IoMode::parse(&self.io_binding)?,
            cudnn: Cudnn {
                conv_search: ConvSearch::parse(&self.cudnn_conv_search)?,
                max_workspace: self.cudnn_max_workspace,
            },
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSettings {
    pub max_inflight: usize,
    pub drain_timeout_secs: u64,
    pub job_timeout_secs: u64,
}

impl WorkerSettings {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
    pub fn job_timeout(&self) -> Duration {
        Duration::from_secs(self.job_timeout_secs)
    }
}

/// Limits that keep hostile or broken input from hurting the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_prompt_bytes: usize,
    pub max_metadata_bytes: usize,
    pub max_image_bytes: u64,
    pub max_image_pixels: u64,
}

/// Per-model batching keys; unset keys fall back to the bundle, then to built-in values
/// (see [`crate::engine::batcher::BatchSettings`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchingOverride {
    pub max_batch_size: Option<usize>,
    pub max_delay_ms: Option<u64>,
    pub max_queue: Option<usize>,
    /// KV cache budget in bytes of a continuously batched decoder (`batching.decoder`).
    pub max_kv_bytes: Option<u64>,
    /// Retries of a request that failed alone for a transient reason.
    pub retries: Option<u32>,
    /// Pause before the first such retry, doubling for each further one.
    pub retry_backoff_ms: Option<u64>,
    /// Transient failures in a row after which the model is unhealthy (worker not ready).
    pub unhealthy_after: Option<u32>,
}

impl Settings {
    /// Reads every layer. `file` is `--config` (falls back to `RETOUCHER_CONFIG`); `overrides` are
    /// `section.key=value` pairs from the command line, applied last.
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> anyhow::Result<Settings> {
        use config::{Config, Environment, File, FileFormat};

        let mut builder = Config::builder().add_source(File::from_str(BUILT_IN, FileFormat::Toml));
        if Path::new("config/default.toml").is_file() {
            builder = builder.add_source(File::new("config/default.toml", FileFormat::Toml));
        }
        let env_file = std::env::var_os("RETOUCHER_CONFIG").map(PathBuf::from);
        if let Some(path) = file.map(Path::to_path_buf).or(env_file) {
            if !path.is_file() {
                anyhow::bail!("configuration file {} does not exist", path.display());
            }
            builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix("RETOUCHER")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("s3.allowed_buckets")
                .with_list_parse_key("retry.delays_ms")
                .try_parsing(true),
        );
        for (key, value) in overrides {
            builder = if LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<String> = value
                    .split(',')
                    .map(|b| b.trim().to_string())
                    .filter(|b| !b.is_empty())
                    .collect();
                builder.set_override(key.as_str(), items)
            } else {
                builder.set_override(key.as_str(), value.as_str())
            }
            .with_context(|| format!("bad override {key}={value}"))?;
        }
        let settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("configuration has a wrong or missing key")?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.broker.queue.is_empty(),
            "broker.queue must not be empty"
        );
        anyhow::ensure!(
            self.broker.prefetch > 0,
            "broker.prefetch must be at least 1"
        );
        anyhow::ensure!(
            self.worker.max_inflight > 0,
            "worker.max_inflight must be at least 1"
        );
        anyhow::ensure!(
            self.s3.max_attempts > 0,
            "s3.max_attempts must be at least 1"
        );
        self.models.engine_options()?;
        self.broker.tls.check_against(&self.broker.url)?;
        // The retry settings must fit the delay queues that the topology declares.
        let migrations = self.broker.migrations().context("broker.migrations")?;
        crate::broker::RetryPolicy::of(&migrations, &self.broker.queue, &self.retry).with_context(
            || {
                format!(
                    "checking retry.* against the broker topology of `{}`",
                    self.broker.queue
                )
            },
        )?;
        Ok(())
    }
}

/// Parses `key=value` command-line overrides.
pub fn parse_override(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected section.key=value, got {text:?}"))?;
    if key.trim().is_empty() {
        return Err(format!("empty key in {text:?}"));
    }
    Ok((key.trim().to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_match_the_contract() {
        let s = Settings::load(None, &[]).unwrap();
        assert_eq!(s.broker.queue, "retoucher.jobs");
        assert_eq!(s.metrics.listen, "127.0.0.1:9898");
        assert_eq!(s.models.device, "cpu");
        assert!(s.s3.allowed_buckets.is_empty());
    }

    #[test]
    fn overrides_win_and_lists_split() {
        let s = Settings::load(
            None,
            &[
                ("s3.allowed_buckets".into(), "a,b".into()),
                ("broker.prefetch".into(), "3".into()),
            ],
        )
        .unwrap();
        assert_eq!(s.s3.allowed_buckets, vec!["a", "b"]);
        assert_eq!(s.broker.prefetch, 3);
    }

    #[test]
    fn bad_device_is_rejected() {
        let err = Settings::load(None, &[("models.device".into(), "tpu".into())]).unwrap_err();
        assert!(format!("{err:#}").contains("tpu"), "{err:#}");
    }

    #[test]
    fn retry_settings_default_to_the_ladder_and_lists_split() {
        let s = Settings::load(None, &[]).unwrap();
        assert_eq!(s.retry.max_attempts, 5);
        assert!(s.retry.delays_ms.is_empty());
        let s = Settings::load(
            None,
            &[
                ("retry.delays_ms".into(), "100, 250".into()),
                ("retry.max_attempts".into(), "3".into()),
            ],
        )
        .unwrap();
        assert_eq!(s.retry.delays_ms, vec![100, 250]);
        assert_eq!(s.retry.max_attempts, 3);
        let err = Settings::load(None, &[("retry.delays_ms".into(), "2000".into())]).unwrap_err();
        assert!(format!("{err:#}").contains("TTL"), "{err:#}");
    }

    #[test]
    fn broker_tls_keys_are_read_and_checked() {
        let s = Settings::load(None, &[]).unwrap();
        assert!(!s.broker.tls.is_set());
        let s = Settings::load(
            None,
            &[
                ("broker.url".into(), "amqps://mq.example:5671/%2f".into()),
                ("broker.tls.ca_file".into(), "/etc/retoucher/ca.pem".into()),
                (
                    "broker.tls.cert_file".into(),
                    "/etc/retoucher/client.pem".into(),
                ),
                (
                    "broker.tls.key_file".into(),
                    "/etc/retoucher/client.key".into(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(s.broker.tls.ca_file, Path::new("/etc/retoucher/ca.pem"));
        assert_eq!(
            s.broker.endpoint().tls.key_file,
            Path::new("/etc/retoucher/client.key")
        );
        let err =
            Settings::load(None, &[("broker.tls.ca_file".into(), "ca.pem".into())]).unwrap_err();
        assert!(format!("{err:#}").contains("amqps://"), "{err:#}");
    }

    #[test]
    fn a_single_retry_delay_is_a_list_of_one() {
        // What the environment layer hands over for RETOUCHER__RETRY__DELAYS_MS=100.
        let one: RetrySettings =
            serde_json::from_str(r#"{"max_attempts": 2, "delays_ms": 100, "jitter": 0}"#).unwrap();
        assert_eq!(one.delays_ms, vec![100]);
        let many: RetrySettings =
            serde_json::from_str(r#"{"max_attempts": 2, "delays_ms": [1, 2], "jitter": 0}"#)
                .unwrap();
        assert_eq!(many.delays_ms, vec![1, 2]);
    }

    #[test]
    fn override_parsing() {
        assert_eq!(
            parse_override("a.b=c=d").unwrap(),
            ("a.b".to_string(), "c=d".to_string())
        );
        assert!(parse_override("novalue").is_err());
    }
}
