//! Shared harness for the end-to-end tests: the real RabbitMQ, the real S3 server (SeaweedFS)
//! and worker processes started from the built binary. No mocks.
//!
//! `scripts/test.sh` starts the servers and exports their addresses; without them these tests
//! fail with a hint instead of skipping, so a green run means every path was exercised.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::primitives::ByteStream;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use retoucher::broker::Endpoint;

pub fn env_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: run scripts/test.sh (it starts RabbitMQ, the S3 server and ONNX Runtime)"),
    }
}

pub fn amqp_url() -> String {
    std::env::var("RETOUCHER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// A free loopback port for a worker's metrics server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The test broker: `RETOUCHER_TEST_AMQP_URL`, without TLS.
pub fn test_broker() -> Endpoint {
    Endpoint::new(amqp_url())
}

/// The environment that points a `retoucher` process at `broker`: the URL and the TLS files.
pub fn broker_env(broker: &Endpoint) -> Vec<(String, String)> {
    let mut env = vec![("RETOUCHER__BROKER__URL".to_string(), broker.url.clone())];
    for (key, path) in [
        ("RETOUCHER__BROKER__TLS__CA_FILE", &broker.tls.ca_file),
        ("RETOUCHER__BROKER__TLS__CERT_FILE", &broker.tls.cert_file),
        ("RETOUCHER__BROKER__TLS__KEY_FILE", &broker.tls.key_file),
    ] {
        if !path.as_os_str().is_empty() {
            env.push((key.to_string(), path.display().to_string()));
        }
    }
    env
}

/// An S3 client for the test S3 server (`RETOUCHER_TEST_S3_ENDPOINT`, credentials from the
/// environment).
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .endpoint_url(endpoint)
            .force_path_style(true)
            .build(),
    )
}

/// How long tearing a world down may take when a test did not do it itself.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(60);

/// One test's world: its own queue, input and output buckets, and a disallowed bucket, on the
/// test broker or another one ([`World::on`]).
///
/// [`World::cleanup`] deletes all of it at the end of a test; a test that fails before gets the
/// same from `Drop`, best effort and bounded, so failures do not leak queues and buckets.
pub struct World {
    pub queue: String,
    pub input: String,
    pub output: String,
    pub forbidden: String,
    pub s3: aws_sdk_s3::Client,
    pub conn: Connection,
    pub endpoint: String,
    /// The broker this world lives on.
    pub broker: Endpoint,
    /// Queues a test declared besides the topology, deleted with it.
    extra_queues: Mutex<Vec<String>>,
    cleaned: AtomicBool,
}

impl World {
    pub async fn new() -> World {
        World::on(test_broker()).await
    }

    /// A world on `broker` (e.g. over TLS): `retoucher migrate` and the harness's own
    /// connection use it, and so do the workers it starts.
    pub async fn on(broker: Endpoint) -> World {
        let endpoint = env_var("RETOUCHER_TEST_S3_ENDPOINT");
        env_var("AWS_ACCESS_KEY_ID");
        env_var("AWS_SECRET_ACCESS_KEY");
        env_var("ORT_DYLIB_PATH");
        let world = World {
            queue: format!("{}.jobs", unique("retoucher-test")),
            input: unique("rt-in"),
            output: unique("rt-out"),
            forbidden: unique("rt-forbidden"),
            s3: s3_client(&endpoint).await,
            conn: retoucher::broker::connect(&broker, "retoucher-tests")
                .await
                .unwrap_or_else(|e| panic!("the test broker: {e}")),
            endpoint,
            broker,
            extra_queues: Mutex::new(Vec::new()),
            cleaned: AtomicBool::new(false),
        };
        for bucket in [&world.input, &world.output, &world.forbidden] {
            world
                .s3
                .create_bucket()
                .bucket(bucket)
                .send()
                .await
                .expect("create bucket");
        }
        let migrate = output_within(
            Command::new(env!("CARGO_BIN_EXE_retoucher"))
                .args(["migrate", "--queue", &world.queue])
                .envs(broker_env(&world.broker)),
            CLI_LIMIT,
        );
        assert!(
            migrate.status.success(),
            "retoucher migrate failed:\n{}",
            String::from_utf8_lossy(&migrate.stderr)
        );
        world
    }

    /// Has `queue` deleted with this world (a queue the test declared itself).
    pub fn track_queue(&self, queue: &str) {
        self.extra_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(queue.to_string());
    }

    /// What is left to delete when the world goes.
    fn leftovers(&self) -> Leftovers {
        Leftovers {
            queue: self.queue.clone(),
            extra_queues: self
                .extra_queues
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            buckets: vec![
                self.input.clone(),
                self.output.clone(),
                self.forbidden.clone(),
            ],
        }
    }

    /// Deletes this world's queues (topology, markers, tracked queues) and buckets with
    /// everything in them. Best effort: errors are ignored.
    pub async fn cleanup(&self) {
        self.cleaned.store(true, Ordering::SeqCst);
        self.leftovers().remove(&self.conn, &self.s3).await;
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Environment of a worker process in this world.
    pub fn worker_env(&self, metrics_port: u16) -> Vec<(String, String)> {
        let mut env = broker_env(&self.broker);
        env.extend([
            ("RETOUCHER__BROKER__QUEUE".into(), self.queue.clone()),
            ("RETOUCHER__S3__ENDPOINT".into(), self.endpoint.clone()),
            ("RETOUCHER__S3__FORCE_PATH_STYLE".into(), "true".into()),
            (
                "RETOUCHER__S3__ALLOWED_BUCKETS".into(),
                format!("{},{}", self.input, self.output),
            ),
            (
                "RETOUCHER__S3__OUTPUT".into(),
                format!("s3://{}/results/", self.output),
            ),
            (
                "RETOUCHER__MODELS__BUNDLE".into(),
                repo().join("models/reference").display().to_string(),
            ),
            (
                "RETOUCHER__METRICS__LISTEN".into(),
                format!("127.0.0.1:{metrics_port}"),
            ),
        ]);
        env
    }

    /// Starts a worker process and waits until `/readyz` says ready.
    pub fn start_worker(&self, extra: &[(&str, &str)]) -> Worker {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_retoucher"));
        cmd.arg("worker")
            .envs(self.worker_env(port))
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env("RUST_LOG", "info,lapin=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let log = std::env::temp_dir().join(format!("{}-{port}.log", self.queue));
        let file = std::fs::File::create(&log).expect("worker log");
        cmd.stderr(file);
        let child = cmd.spawn().expect("start retoucher worker");
        let mut worker = Worker {
            child: Some(child),
            port,
            log,
        };
        worker.wait_ready(Duration::from_secs(60));
        worker
    }

    pub async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .expect("put object");
    }

    pub async fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let out = self
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        Some(out.body.collect().await.ok()?.into_bytes().to_vec())
    }

    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let out = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .expect("list objects");
        let mut keys: Vec<String> = out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect();
        keys.sort();
        keys
    }

    /// Publishes a raw job body to the jobs queue (persistent, JSON).
    pub async fn publish(&self, body: &[u8]) {
        let channel = self.conn.create_channel().await.expect("channel");
        channel
            .confirm_select(Default::default())
            .await
            .expect("confirms");
        channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let _ = channel.close(0, "done".into()).await;
    }

    /// A temporary queue bound to `retoucher.events` (`job.*`) to watch this test's events.
    pub async fn events(&self) -> Events {
        let (channel, consumer) = event_consumer(&self.conn, "events").await;
        Events {
            _channel: channel,
            consumer,
        }
    }

    /// Messages ready in a queue (passive declare).
    pub async fn ready(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = channel.close(0, "done".into()).await;
        q.message_count()
    }

    /// Takes every message from the dead-letter queue: (body, error class, error message).
    pub async fn drain_dead(&self) -> Vec<(Vec<u8>, String, String)> {
        let channel = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Ok(Some(msg)) = channel
            .basic_get(
                self.dead_queue().as_str().into(),
                BasicGetOptions::default(),
            )
            .await
        {
            let header = |name: &str| {
                msg.delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(name).cloned())
                    .map(|v| match v {
                        lapin::types::AMQPValue::LongString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default()
            };
            out.push((
                msg.delivery.data.clone(),
                header("x-retoucher-error-class"),
                header("x-retoucher-error"),
            ));
            msg.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack dead letter");
        }
        let _ = channel.close(0, "done".into()).await;
        out
    }
}

/// Tears down a world that the test did not clean up itself (it failed, or returned early):
/// on a thread of its own with its own runtime and connections, since `drop` cannot await and
/// the test's runtime may be the one unwinding; bounded by [`TEARDOWN_LIMIT`].
impl Drop for World {
    fn drop(&mut self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        let leftovers = self.leftovers();
        let broker = self.broker.clone();
        let endpoint = self.endpoint.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    let teardown = async {
                        let conn = retoucher::broker::connect(&broker, "retoucher-tests-teardown")
                            .await
                            .ok()?;
                        let s3 = s3_client(&endpoint).await;
                        leftovers.remove(&conn, &s3).await;
                        let _ = conn.close(200, "teardown".into()).await;
                        Some(())
                    };
                    if tokio::time::timeout(TEARDOWN_LIMIT, teardown)
                        .await
                        .is_err()
                    {
                        eprintln!("world teardown: gave up after {TEARDOWN_LIMIT:?}");
                    }
                });
            }
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(TEARDOWN_LIMIT + Duration::from_secs(5));
    }
}

/// The queues and buckets of a world.
struct Leftovers {
    queue: String,
    extra_queues: Vec<String>,
    buckets: Vec<String>,
}

impl Leftovers {
    async fn remove(&self, conn: &Connection, s3: &aws_sdk_s3::Client) {
        delete_topology(conn, &self.queue).await;
        for queue in &self.extra_queues {
            if let Ok(channel) = conn.create_channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = channel.close(0, "done".into()).await;
            }
        }
        // Each bucket is a SeaweedFS collection holding volume slots of its own: free them.
        for bucket in &self.buckets {
            empty_and_delete_bucket(s3, bucket).await;
        }
    }
}

/// Empties a bucket with batched `DeleteObjects` (1,000 keys a request, enough for the tens
/// of thousands of files of a load run) and deletes it. Best effort: errors are ignored.
pub async fn empty_and_delete_bucket(s3: &aws_sdk_s3::Client, bucket: &str) {
    use aws_sdk_s3::types::{Delete, ObjectIdentifier};
    let keys = try_all_keys(s3, bucket, "").await.unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let objects: Vec<ObjectIdentifier> = chunk
            .iter()
            .filter_map(|k| ObjectIdentifier::builder().key(k).build().ok())
            .collect();
        if let Ok(delete) = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
        {
            let _ = s3
                .delete_objects()
                .bucket(bucket)
                .delete(delete)
                .send()
                .await;
        }
    }
    let _ = s3.delete_bucket().bucket(bucket).send().await;
}

/// A consumer of everything published to `retoucher.events` (`job.*`), on a new exclusive
/// queue of `conn`; keep the channel alive as long as the consumer.
pub async fn event_consumer(conn: &Connection, tag: &str) -> (lapin::Channel, lapin::Consumer) {
    let channel = conn.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare event queue");
    channel
        .queue_bind(
            q.name().clone(),
            "retoucher.events".into(),
            "job.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind event queue");
    let consumer = channel
        .basic_consume(
            q.name().clone(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume events");
    (channel, consumer)
}

pub struct Events {
    _channel: lapin::Channel,
    consumer: lapin::Consumer,
}

impl Events {
    /// Waits for one event per listed job id (events of other tests are ignored); returns
    /// (routing key, event JSON) per job id, in the order of `job_ids`.
    pub async fn wait_for(
        &mut self,
        job_ids: &[String],
        timeout: Duration,
    ) -> Vec<(String, serde_json::Value)> {
        let mut found: std::collections::HashMap<String, (String, serde_json::Value)> =
            Default::default();
        let deadline = tokio::time::Instant::now() + timeout;
        while found.len() < job_ids.len() {
            let next = tokio::time::timeout_at(deadline, self.consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for events; got {} of {}: {:?}",
                        found.len(),
                        job_ids.len(),
                        found.keys().collect::<Vec<_>>()
                    )
                })
                .expect("event stream ended")
                .expect("event delivery");
            let event: serde_json::Value =
                serde_json::from_slice(&next.data).expect("event is JSON");
            let id = event["job_id"].as_str().unwrap_or_default().to_string();
            if job_ids.contains(&id) && event["status"] != "retrying" {
                let previous = found.insert(id.clone(), (next.routing_key.to_string(), event));
                assert!(previous.is_none(), "job {id} finished twice");
            }
        }
        job_ids
            .iter()
            .map(|id| found.remove(id).expect("event"))
            .collect()
    }

    /// Every event that arrives within `window` (to check that nothing more comes).
    pub async fn collect_for(&mut self, window: Duration) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, self.consumer.next()).await {
            if let Ok(v) = serde_json::from_slice(&d.data) {
                out.push(v);
            }
        }
        out
    }
}

/// A worker process; killed when dropped.
pub struct Worker {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Worker {
    fn wait_ready(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "worker exited with {status} before it was ready:\n{}",
                        self.log_text()
                    );
                }
            }
            if http_get(self.port, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            if started.elapsed() > timeout {
                panic!("worker not ready after {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A metric's value summed over every series of that name whose labels contain `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Minimal HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// Pixels within distance 0.35 of pure magenta (the reference perception's definition).
pub fn near_magenta(img: &image::RgbImage) -> usize {
    img.pixels()
        .filter(|p| {
            let (r, g, b) = (
                f32::from(p[0]) / 255.0,
                f32::from(p[1]) / 255.0,
                f32::from(p[2]) / 255.0,
            );
            ((r - 1.0).powi(2) + g * g + (b - 1.0).powi(2)).sqrt() < 0.35
        })
        .count()
}

pub fn example(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("examples").join(name)).expect("example image")
}

pub fn decode(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes)
        .expect("decodable image")
        .to_rgb8()
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---- Fault tests: workers that may crash, and dead letters the broker wrote itself. ----

/// A dead letter with every header the fault tests look at.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    /// `x-retoucher-error-class`; empty when the broker dead-lettered the message itself.
    pub class: String,
    /// `x-retoucher-error`.
    pub reason: String,
    /// `reason` of the first `x-death` entry (`delivery_limit`, `rejected`, ...), when present.
    pub death_reason: String,
}

impl World {
    /// Starts a worker process without waiting for it to be ready: for workers that are meant
    /// to crash, or whose start the test times itself.
    pub fn spawn_worker(&self, extra: &[(&str, &str)]) -> Worker {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{}-{port}.log", self.queue));
        let file = std::fs::File::create(&log).expect("worker log");
        let child = Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .arg("worker")
            .envs(self.worker_env(port))
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env("RUST_LOG", "info,lapin=warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start retoucher worker");
        Worker {
            child: Some(child),
            port,
            log,
        }
    }

    /// Takes every message from the dead-letter queue, with its `x-death` reason.
    pub async fn drain_dead_letters(&self) -> Vec<DeadLetter> {
        use lapin::types::AMQPValue;
        let channel = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Ok(Some(msg)) = channel
            .basic_get(
                self.dead_queue().as_str().into(),
                BasicGetOptions::default(),
            )
            .await
        {
            let headers = msg
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            let text = |name: &str| match headers.inner().get(name) {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            let death_reason = match headers.inner().get("x-death") {
                Some(AMQPValue::FieldArray(deaths)) => deaths
                    .as_slice()
                    .first()
                    .and_then(|d| match d {
                        AMQPValue::FieldTable(t) => t.inner().get("reason").cloned(),
                        _ => None,
                    })
                    .map(|r| match r {
                        AMQPValue::LongString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default(),
                _ => String::new(),
            };
            out.push(DeadLetter {
                body: msg.delivery.data.clone(),
                class: text("x-retoucher-error-class"),
                reason: text("x-retoucher-error"),
                death_reason,
            });
            msg.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack dead letter");
        }
        let _ = channel.close(0, "done".into()).await;
        out
    }

    /// Waits until the dead-letter queue has held `count` messages in all (draining it), or
    /// the timeout passes; returns what it took.
    pub async fn wait_dead_letters(&self, count: usize, timeout: Duration) -> Vec<DeadLetter> {
        let deadline = Instant::now() + timeout;
        let mut dead = Vec::new();
        loop {
            dead.extend(self.drain_dead_letters().await);
            if dead.len() >= count || Instant::now() > deadline {
                return dead;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Worker {
    /// The process id, while the process is held.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until `/readyz` says ready; `Err` (with the log) if the process exits first or the
    /// timeout passes.
    pub fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "worker exited with {status} before it was ready:\n{}",
                        self.log_text()
                    ));
                }
            }
            if http_get(self.port, "/readyz").is_some_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "worker not ready after {timeout:?}:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, then reaps the process: a worker dying at an arbitrary instant.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM without waiting (see [`Worker::wait_exit`]).
    pub fn signal_term(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit and returns its status; `None` if it is
    /// still running (it is left running) or was already reaped.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for `needle` to appear in the worker's log.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() <= timeout {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// How many versions past the built-in ones [`delete_topology`] clears markers for: tests that
/// rehearse upgrades with migration folders of their own go a few versions further.
const MARKERS_PAST_LATEST: u32 = 4;

/// Deletes every queue and marker (version and additive) of the topology of jobs queue `queue`
/// (dead-letter and retry delay queues included). Each delete gets its own channel, since a
/// failure closes it.
pub async fn delete_topology(conn: &Connection, queue: &str) {
    use retoucher::broker::topology;
    let queues = topology::queue_names(queue).unwrap_or_default();
    let markers = (1..=topology::latest_version() + MARKERS_PAST_LATEST).flat_map(|v| {
        [
            topology::marker_exchange(queue, v),
            topology::additive_marker(queue, v),
        ]
    });
    for q in queues {
        if let Ok(channel) = conn.create_channel().await {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(0, "done".into()).await;
        }
    }
    for marker in markers {
        if let Ok(channel) = conn.create_channel().await {
            let _ = channel
                .exchange_delete(marker.as_str().into(), Default::default())
                .await;
            let _ = channel.close(0, "done".into()).await;
        }
    }
}

// ---- Broker restarts and load runs: controlling RabbitMQ, reconnecting, bulk result checks. ----

/// The RabbitMQ node that the tests restarting their broker control: `RETOUCHER_TEST_RABBITMQ_NODE`
/// (e.g. the private node of `scripts/rabbitmq-tls.sh`, whose plain listener is then
/// `RETOUCHER_TEST_AMQP_URL`), or `None` for rabbitmqctl's default node, the machine's broker.
pub fn test_node() -> Option<String> {
    std::env::var("RETOUCHER_TEST_RABBITMQ_NODE")
        .ok()
        .filter(|n| !n.is_empty())
}

/// Runs `rabbitmqctl ARGS` against the test node ([`test_node`]).
pub fn rabbitmqctl_test_node(args: &[&str], timeout: Duration) -> Result<String, String> {
    let node = test_node();
    let mut all: Vec<&str> = Vec::new();
    if let Some(node) = node.as_deref() {
        all.extend(["-n", node]);
    }
    all.extend(args);
    rabbitmqctl(&all, timeout)
}

/// Starts the test broker's application again when dropped, so that a failing (panicking) test
/// that stopped it never leaves it stopped. `start_app` on a running broker is a no-op.
pub struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let limit = Duration::from_secs(120);
        if let Err(e) = rabbitmqctl_test_node(&["start_app"], limit) {
            eprintln!("broker guard: {e}");
        }
        if let Err(e) = rabbitmqctl_test_node(&["await_startup"], limit) {
            eprintln!("broker guard: {e}");
        }
    }
}

/// Runs `rabbitmqctl ARGS` with a deadline; `Err` (with its output) when it is missing, fails or
/// overruns. Tests that restart the broker need it (and the rights to run it: root, or the
/// rabbitmq user's Erlang cookie).
pub fn rabbitmqctl(args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `rabbitmqctl {}`: {e}", args.join(" ")))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(mut s) = child.stdout.take() {
                    let _ = s.read_to_string(&mut out);
                }
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut out);
                }
                return if status.success() {
                    Ok(out)
                } else {
                    Err(format!(
                        "`rabbitmqctl {}` exited with {status}:\n{out}",
                        args.join(" ")
                    ))
                };
            }
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`rabbitmqctl {}` did not finish within {timeout:?}",
                    args.join(" ")
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for rabbitmqctl: {e}")),
        }
    }
}

/// Opens an AMQP connection to the test broker, retrying until `timeout` (a broker that is
/// starting refuses connections for a while).
pub async fn connect_amqp_retry(timeout: Duration) -> Connection {
    let deadline = Instant::now() + timeout;
    loop {
        match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
            Ok(conn) => return conn,
            Err(e) if Instant::now() > deadline => {
                panic!("RabbitMQ did not accept a connection within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Every key under `prefix` (all pages, unlike [`World::keys`]); panics if S3 fails.
pub async fn all_keys(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    try_all_keys(s3, bucket, prefix)
        .await
        .unwrap_or_else(|e| panic!("listing s3://{bucket}/{prefix}: {e}"))
}

/// Every key under `prefix` (all pages), or the S3 error.
pub async fn try_all_keys(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let out = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token.clone())
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        match out.next_continuation_token() {
            Some(next) if out.is_truncated() == Some(true) => token = Some(next.to_string()),
            _ => break,
        }
    }
    keys.sort();
    Ok(keys)
}

/// Checks one job's result set under `{results}{job_id}/` in the output bucket, given the
/// bucket's listing: `diagnostics.json` (the commit marker) names the job, `retouched.png`
/// decodes to `size`, and every file the diagnostics list is stored. Returns the diagnostics,
/// or why the set is not complete.
pub async fn check_result_set(
    world: &World,
    keys: &std::collections::HashSet<String>,
    id: &str,
    size: (u32, u32),
) -> Result<serde_json::Value, String> {
    let prefix = format!("results/{id}/");
    let marker = world
        .get(&world.output, &format!("{prefix}diagnostics.json"))
        .await
        .ok_or_else(|| format!("{id}: diagnostics.json missing"))?;
    let diagnostics: serde_json::Value = serde_json::from_slice(&marker)
        .map_err(|e| format!("{id}: diagnostics.json is not JSON: {e}"))?;
    if diagnostics["job_id"] != id {
        return Err(format!("{id}: diagnostics name {}", diagnostics["job_id"]));
    }
    let retouched = world
        .get(&world.output, &format!("{prefix}retouched.png"))
        .await
        .ok_or_else(|| format!("{id}: retouched.png missing"))?;
    let retouched = image::load_from_memory(&retouched)
        .map_err(|e| format!("{id}: retouched.png does not decode: {e}"))?;
    if (retouched.width(), retouched.height()) != size {
        return Err(format!(
            "{id}: retouched.png is {}x{}, the input {}x{}",
            retouched.width(),
            retouched.height(),
            size.0,
            size.1
        ));
    }
    for iteration in diagnostics["iterations"].as_array().into_iter().flatten() {
        let mut files = vec![iteration["saliency"]["map"].as_str().unwrap_or_default()];
        for region in iteration["regions"].as_array().into_iter().flatten() {
            files.push(region["mask"].as_str().unwrap_or_default());
        }
        for file in files {
            if !keys.contains(&format!("{prefix}{file}")) {
                return Err(format!("{id}: {file} is listed but not stored"));
            }
        }
    }
    Ok(diagnostics)
}

/// Engine options for the in-process engine tests: CPU, `intra_threads` per session.
pub fn cpu_engine(intra_threads: usize) -> retoucher::engine::EngineOptions {
    retoucher::engine::EngineOptions {
        device: retoucher::engine::Device::Cpu,
        fallback_to_cpu: false,
        intra_threads,
        ort_library: String::new(),
        ..Default::default()
    }
}

/// The names of this process's threads (Linux keeps 15 bytes of each).
pub fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// How long a short `retoucher` command (migrate, replay, enqueue) may take in a test.
pub const CLI_LIMIT: Duration = Duration::from_secs(120);

/// Runs a command to the end and returns its output, like `Command::output`, but kills it and
/// fails the test (with what it printed) if it has not exited within `limit`: a command that
/// hangs must fail the test, not hang the suite.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    // Read both pipes while waiting, so a chatty command cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the command") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "{command:?} did not exit within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A v1 job message for the world's `in.png` with a fixed prompt.
pub fn cat_job(world: &World, id: &str) -> Vec<u8> {
    serde_json::json!({
        "job_id": id,
        "image": format!("s3://{}/in.png", world.input),
        "prompt": "close up photo of a tabby cat",
    })
    .to_string()
    .into_bytes()
}

/// Records the batch sizes each model ran, in order (a [`BatchObserver`] for in-process
/// engines).
#[derive(Default)]
pub struct BatchSizes(Mutex<std::collections::BTreeMap<String, Vec<usize>>>);

impl retoucher::engine::batcher::BatchObserver for BatchSizes {
    fn batch(&self, model: &str, record: &retoucher::engine::batcher::BatchRecord) {
        let mut sizes = self.0.lock().unwrap();
        sizes
            .entry(model.to_string())
            .or_default()
            .push(record.size);
    }
    fn queue_depth(&self, _: &str, _: usize) {}
}

impl BatchSizes {
    /// The sizes `model` ran since the last take.
    pub fn take(&self, model: &str) -> Vec<usize> {
        self.0.lock().unwrap().remove(model).unwrap_or_default()
    }

    /// Every model's sizes since the last take.
    pub fn take_all(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}
