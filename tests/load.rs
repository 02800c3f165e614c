//! The load run of issue 4, with the broker restart of issue 9: jobs through two worker
//! processes with faults injected along the way, ending with every job accounted for (a complete
//! result set in S3 or a dead letter with the right class) and the counts reconciled with the
//! workers' `/metrics`. Two sizes of the same run:
//!
//! - [`ci_load_run_with_a_kill_and_a_broker_restart`]: 300 jobs, worker A SIGKILLed at 30 % and
//!   the broker restarted at 60 %; not ignored, so CI runs it (about a minute on 2 cores);
//! - [`load_run_every_job_accounted_for`]: 2,000 jobs by default, ignored (minutes);
//!   `scripts/load-test.sh` runs it, with the servers up:
//!
//!       cargo test --test load -- --ignored --nocapture
//!
//! The broker restart stops and starts the broker on `RETOUCHER_TEST_AMQP_URL` with `rabbitmqctl`
//! (the node `RETOUCHER_TEST_RABBITMQ_NODE` names, else the machine's), as `tests/broker_restart.rs`
//! does: where others share the machine's broker, run it against the private node of
//! `scripts/rabbitmq-tls.sh` (`RETOUCHER_TEST_BROKER=private scripts/test.sh --test load`).
//!
//! What it does, against the real RabbitMQ and S3 server (no mocks):
//! 1. its own jobs queue (`retoucher migrate`, via `World::new`), buckets, and two inputs: the
//!    451×300 `examples/chelsea-blemished.png` and a generated 128×128 blemished image;
//! 2. a durable event queue bound to `retoucher.events` before anything is published, so that
//!    events survive the broker restart; its consumer reconnects by itself;
//! 3. two workers, A and B, both with
//!    `RETOUCHER_FAULTS=panic@after_fetch:boom-,sleep@after_diagnostics=4000:commit-`;
//! 4. `retoucher enqueue @jobs.jsonl` with the jobs: 82 % small images, 10 % chelsea, 1 % small
//!    `commit-` jobs held 4 s after their commit marker, 5 % missing images, 1 % a bucket outside
//!    the allowlist, 1 % `boom-` jobs that panic; plus invalid messages published raw (enqueue
//!    would refuse them), half before and half after the batch;
//! 5. when the workers have settled the kill share of the messages, and as soon as worker A holds
//!    a `commit-` job past its commit marker (at most 60 s later), A is scraped one last time and
//!    SIGKILLed at once; [`RESTART_DELAY`] later it is restarted (A′). The held job must come back
//!    as a `duplicate`: acked without recomputing, no second event;
//! 6. when the restart share is settled (if the run has one): the broker is stopped
//!    (`rabbitmqctl stop_app`) for [`OUTAGE`] with jobs in flight, started again, and the workers
//!    must reconnect by themselves;
//! 7. once every job has an outcome and the queues are idle: every expected success has a
//!    complete result set, every expected failure exactly the right dead-letter class, nothing
//!    both and nothing neither; the counts are reconciled (see [`reconcile`]) and a summary is
//!    printed, and written as JSON to `LOAD_REPORT` when set.
//!
//! Every wait is bounded.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// `boom-` jobs panic; `commit-` jobs wait 4 s between their commit marker and their event and
/// ack, so that the SIGKILL can catch one with a complete result set that was never acked.
const FAULTS: &str = "panic@after_fetch:boom-,sleep@after_diagnostics=4000:commit-";
const READY: Duration = Duration::from_secs(120);
/// `broker.prefetch` of the workers (the default, set explicitly: the reconciliation's bound).
const PREFETCH: u64 = 8;
/// How long after A's SIGKILL its replacement A′ is started, as an orchestrator would: long
/// enough for B to take over A's unacknowledged deliveries first.
const RESTART_DELAY: Duration = Duration::from_secs(3);
/// How long the broker stays stopped in a run with a broker restart.
const OUTAGE: Duration = Duration::from_secs(3);
/// Bound on one `rabbitmqctl` command, and on the workers' reconnection after the restart.
const CTL: Duration = Duration::from_secs(120);

/// The shape of one load run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Jobs published with `retoucher enqueue`.
    jobs: usize,
    /// Invalid messages published raw.
    invalid: usize,
    /// SIGKILL worker A once this share of the messages is settled.
    kill_at: f64,
    /// Restart the broker once this share is settled (after the kill), if at all.
    restart_at: Option<f64>,
    /// How long the kill may wait for A to hold a `commit-` job past its commit marker.
    commit_wait: Duration,
    /// Hold every job this long after its fetch (fault injection), so that a short run still
    /// has a worker's prefetch of jobs in flight when the kill and the restart come.
    pace: Option<Duration>,
    /// Bound on the whole run.
    timeout: Duration,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// 128×128 generated image: succeeds.
    Small,
    /// The 451×300 example: succeeds.
    Chelsea,
    /// The image does not exist: `image_not_found`.
    Missing,
    /// The image is in a bucket outside `s3.allowed_buckets`: `bucket_not_allowed`.
    Forbidden,
    /// The worker panics on it (fault injection): `internal`.
    Boom,
    /// Small, held 4 s after its commit marker (fault injection): succeeds, and the one A holds
    /// at the kill comes back as a `duplicate`.
    Commit,
}

impl Kind {
    fn of(i: usize) -> Kind {
        match i % 100 {
            0..=4 => Kind::Missing,
            5 => Kind::Forbidden,
            6 => Kind::Boom,
            7..=16 => Kind::Chelsea,
            17 => Kind::Commit,
            _ => Kind::Small,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Kind::Small => "small",
            Kind::Chelsea => "chelsea",
            Kind::Missing => "missing",
            Kind::Forbidden => "forbidden",
            Kind::Boom => "boom",
            Kind::Commit => "commit",
        }
    }

    /// The dead-letter class expected, `None` for a job that must succeed.
    fn dead_class(self) -> Option<&'static str> {
        match self {
            Kind::Small | Kind::Chelsea | Kind::Commit => None,
            Kind::Missing => Some("image_not_found"),
            Kind::Forbidden => Some("bucket_not_allowed"),
            Kind::Boom => Some("internal"),
        }
    }
}

/// A 128×128 skin-toned gradient with three magenta blemishes.
fn small_image() -> Vec<u8> {
    let img = image::RgbImage::from_fn(128, 128, |x, y| {
        let blemish = [(30u32, 40u32), (80, 90), (100, 25)]
            .iter()
            .any(|&(cx, cy)| (x as i32 - cx as i32).pow(2) + (y as i32 - cy as i32).pow(2) <= 16);
        if blemish {
            image::Rgb([255, 0, 255])
        } else {
            image::Rgb([
                (180 + x / 4) as u8,
                (140 + y / 5) as u8,
                (120 + (x + y) / 8) as u8,
            ])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode the small input");
    out.into_inner()
}

/// Raw messages `retoucher enqueue` would refuse; each must be dead-lettered `invalid_message`.
fn invalid_bodies(tag: &str, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| match i % 6 {
            0 => format!("not json at all {tag}-{i}").into_bytes(),
            1 => json!({"job_id": i, "image": "s3://x/y.png", "prompt": tag})
                .to_string()
                .into_bytes(),
            2 => json!({"job_id": format!("invalid-{tag}-{i}"), "prompt": "no image"})
                .to_string()
                .into_bytes(),
            3 => json!([tag, i]).to_string().into_bytes(),
            4 => json!({"job_id": format!("invalid-{tag}-{i}"), "image": "s3://x/y.png",
                        "prompt": "p".repeat(5000)})
            .to_string()
            .into_bytes(),
            _ => json!({"job_id": format!("invalid-{tag}-{i}"), "image": "s3://x/y.png",
                        "prompt": "p", "options": {"max_iterations": "three"}})
            .to_string()
            .into_bytes(),
        })
        .collect()
}

/// One event seen on `retoucher.events`.
#[derive(Debug, Clone)]
struct Seen {
    job_id: String,
    status: String,
}

/// Every `job.*` event of this run, from a durable quorum queue bound to `retoucher.events`
/// before the first job is published: events confirmed to a worker are in that queue even if
/// the broker restarts before they are read.
struct EventLog {
    queue: String,
    state: Arc<Mutex<EventState>>,
    stop: tokio::sync::watch::Sender<bool>,
    consumer: tokio::task::JoinHandle<()>,
}

/// The events recorded so far, and the bodies seen (to recognise redeliveries).
struct EventState {
    tag: String,
    seen: Vec<Seen>,
    bodies: HashSet<Vec<u8>>,
}

impl EventState {
    /// Records one delivered event of this run. A redelivery of an event already recorded (its
    /// ack was lost with the connection) is skipped; a second event published for the same job
    /// (a duplicate delivery publishes `job.succeeded` again) is a new message, never a
    /// redelivery, so it counts.
    fn record(&mut self, body: &[u8], redelivered: bool) {
        if !self.bodies.insert(body.to_vec()) && redelivered {
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let job_id = event["job_id"].as_str().unwrap_or_default().to_string();
        if job_id.contains(&self.tag) {
            self.seen.push(Seen {
                job_id,
                status: event["status"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
}

impl EventLog {
    /// Declares and binds the queue (deleted with `world`), then consumes it on a connection
    /// of its own that comes back after a broker restart.
    async fn start(world: &World, tag: &str) -> EventLog {
        use lapin::options::{QueueBindOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable, LongString};
        let queue = format!("{}.load-events", world.queue);
        world.track_queue(&queue);
        let channel = world.conn.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .expect("declare the event queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                "retoucher.events".into(),
                "job.*".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the event queue");
        let _ = channel.close(0, "done".into()).await;

        let state = Arc::new(Mutex::new(EventState {
            tag: tag.to_string(),
            seen: Vec::new(),
            bodies: HashSet::new(),
        }));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let consumer = tokio::spawn(consume_events(
            world.broker.clone(),
            queue.clone(),
            state.clone(),
            stopped,
        ));
        EventLog {
            queue,
            state,
            stop,
            consumer,
        }
    }

    /// Once nothing publishes any more: stops the consumer (what it took but did not ack goes
    /// back to the queue) and takes what is left in the queue, so that every event is counted.
    async fn finish(self, world: &World) -> Vec<Seen> {
        use lapin::options::{BasicAckOptions, BasicGetOptions};
        let _ = self.stop.send(true);
        if tokio::time::timeout(CTL, self.consumer).await.is_err() {
            panic!("the event consumer did not stop within {CTL:?}");
        }
        let channel = world.conn.create_channel().await.expect("channel");
        while let Ok(Some(message)) = channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
            .await
        {
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(&message.delivery.data, message.delivery.redelivered);
            let _ = message.delivery.acker.ack(BasicAckOptions::default()).await;
        }
        let _ = channel.close(0, "done".into()).await;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut state.seen)
    }
}

/// The event consumer: records and acks each event; reconnects (every 250 ms) when the broker
/// goes away, until told to stop.
async fn consume_events(
    broker: retoucher::broker::Endpoint,
    queue: String,
    state: Arc<Mutex<EventState>>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions};
    use lapin::types::FieldTable;
    while !*stopped.borrow() {
        let Ok(conn) = retoucher::broker::connect(&broker, "load-events").await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        if let Ok(channel) = conn.create_channel().await {
            let consuming = channel
                .basic_consume(
                    queue.as_str().into(),
                    "load-events".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await;
            if let Ok(mut consumer) = consuming {
                loop {
                    let delivery = tokio::select! {
                        delivery = consumer.next() => delivery,
                        _ = stopped.changed() => None,
                    };
                    let Some(Ok(delivery)) = delivery else { break };
                    state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&delivery.data, delivery.redelivered);
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
            }
            let _ = channel.close(200, "done".into()).await;
        }
        retoucher::broker::close(&conn, "done").await;
        if !*stopped.borrow() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The counters of one worker process, from its last `/metrics` scrape.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Counters {
    succeeded: u64,
    duplicate: u64,
    dead: u64,
    retried: u64,
    inflight: u64,
    errors: BTreeMap<String, u64>,
}

impl Counters {
    fn parse(text: &str) -> Option<Counters> {
        if !text.contains("retoucher_jobs_total") && !text.contains("retoucher_inflight_jobs") {
            return None;
        }
        let jobs = |o: &str| {
            metric_sum(text, "retoucher_jobs_total", &format!("outcome=\"{o}\"")).max(0.0) as u64
        };
        let mut errors = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("retoucher_job_errors_total{"))
        {
            let class = line
                .split("class=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default();
            let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let Some(v) = value {
                *errors.entry(class.to_string()).or_default() += v as u64;
            }
        }
        Some(Counters {
            succeeded: jobs("retouched") + jobs("clean"),
            duplicate: jobs("duplicate"),
            dead: jobs("dead"),
            retried: jobs("retried"),
            inflight: metric_sum(text, "retoucher_inflight_jobs", "").max(0.0) as u64,
            errors,
        })
    }

    /// Deliveries this process settled for good (acked as done, duplicate or dead).
    fn settled(&self) -> u64 {
        self.succeeded + self.duplicate + self.dead
    }
}

/// Reads what a log file gained since the last read (a worker's log grows to megabytes).
struct LogTail {
    path: std::path::PathBuf,
    offset: u64,
}

impl LogTail {
    fn at_end(path: &std::path::Path) -> LogTail {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        LogTail {
            path: path.to_path_buf(),
            offset,
        }
    }

    fn read_new(&mut self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut text = Vec::new();
        if let Ok(mut file) = std::fs::File::open(&self.path) {
            if file.seek(SeekFrom::Start(self.offset)).is_ok() {
                let _ = file.read_to_end(&mut text);
            }
        }
        // Only whole lines; a partial last line is read again next time.
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.offset += whole as u64;
        String::from_utf8_lossy(&text[..whole]).into_owned()
    }
}

/// A worker process of the run and the last counters it reported.
struct Proc {
    name: &'static str,
    worker: Worker,
    last: Counters,
    /// Whether it was SIGKILLed (its counters then stop at `last`).
    killed: bool,
}

impl Proc {
    fn scrape(&mut self) {
        if self.killed {
            return;
        }
        if let Some(c) = Counters::parse(&self.worker.metrics()) {
            self.last = c;
        }
    }
}

fn total(procs: &[Proc], f: impl Fn(&Counters) -> u64) -> u64 {
    procs.iter().map(|p| f(&p.last)).sum()
}

/// Messages ready in each of the topology's queues but the dead one (the jobs queue and its
/// retry delay queues).
async fn pending(world: &World) -> u32 {
    let mut sum = 0;
    for q in retoucher::broker::topology::queue_names(&world.queue).expect("queue names") {
        if q != world.dead_queue() {
            sum += world.ready(&q).await;
        }
    }
    sum
}

/// The run CI does: a few hundred jobs, a SIGKILL and a broker restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_load_run_with_a_kill_and_a_broker_restart() {
    // Each job held 1 s: a worker's prefetch (8) bounds it to 8 jobs/s whatever the machine, so
    // the kill and the restart meet jobs in flight and jobs still queued.
    load_run(Plan {
        jobs: 300,
        invalid: 6,
        kill_at: 0.25,
        restart_at: Some(0.5),
        commit_wait: Duration::from_secs(5),
        pace: Some(Duration::from_secs(1)),
        timeout: Duration::from_secs(600),
    })
    .await;
}

/// The full run of `scripts/load-test.sh` (docs/load-test.md), sized by `LOAD_*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a load run of minutes: scripts/load-test.sh"]
async fn load_run_every_job_accounted_for() {
    load_run(Plan {
        jobs: env_or("LOAD_JOBS", 2000),
        invalid: env_or("LOAD_INVALID", 12),
        kill_at: env_or("LOAD_KILL_AT", 0.35),
        restart_at: std::env::var("LOAD_RESTART_AT")
            .ok()
            .and_then(|v| v.parse().ok()),
        commit_wait: Duration::from_secs(60),
        pace: None,
        timeout: Duration::from_secs(env_or("LOAD_TIMEOUT_SECS", 900)),
    })
    .await;
}

async fn load_run(plan: Plan) {
    let Plan {
        jobs,
        invalid,
        kill_at,
        restart_at,
        commit_wait,
        pace,
        timeout,
    } = plan;
    if restart_at.is_some() {
        if let Err(e) = rabbitmqctl_test_node(&["status"], CTL) {
            panic!(
                "this run restarts the broker with `rabbitmqctl stop_app` / `start_app`, and \
                 rabbitmqctl cannot control it here (see tests/broker_restart.rs):\n{e}"
            );
        }
    }
    let started_test = Instant::now();

    let mut world = World::new().await;
    let tag = unique("load").replace("load-", "");
    let small = small_image();
    let chelsea = example("chelsea-blemished.png");
    let chelsea_size = decode(&chelsea).dimensions();
    world.put(&world.input, "in/small.png", small).await;
    world.put(&world.input, "in/chelsea.png", chelsea).await;
    world
        .put(&world.forbidden, "in/small.png", small_image())
        .await;

    // The batch: ids carry the kind and this run's tag.
    let mut expected: HashMap<String, Kind> = HashMap::new();
    let mut batch: Vec<(String, Kind, Vec<u8>)> = Vec::new();
    let mut lines = String::new();
    for i in 0..jobs {
        let kind = Kind::of(i);
        let id = format!("{}-{tag}-{i:05}", kind.prefix());
        let image = match kind {
            Kind::Small | Kind::Boom | Kind::Commit => {
                format!("s3://{}/in/small.png", world.input)
            }
            Kind::Chelsea => format!("s3://{}/in/chelsea.png", world.input),
            Kind::Missing => format!("s3://{}/missing/{id}.png", world.input),
            Kind::Forbidden => format!("s3://{}/in/small.png", world.forbidden),
        };
        let body = json!({
            "job_id": id,
            "image": image,
            "prompt": "close up photo of a tabby cat",
            "metadata": {"run": tag, "kind": kind.prefix()},
        })
        .to_string();
        lines.push_str(&body);
        lines.push('\n');
        expected.insert(id.clone(), kind);
        batch.push((id, kind, body.into_bytes()));
    }
    let invalid_bodies = invalid_bodies(&tag, invalid);
    let dir = tempfile::tempdir().expect("temp dir");
    let jsonl = dir.path().join("jobs.jsonl");
    std::fs::write(&jsonl, &lines).expect("write jobs.jsonl");
    let published = (jobs + invalid) as u64;

    let events = EventLog::start(&world, &tag).await;
    let faults = match pace {
        Some(pace) => format!("{FAULTS},sleep@after_fetch={}", pace.as_millis()),
        None => FAULTS.to_string(),
    };
    let extra = [
        ("RETOUCHER_FAULTS", faults.as_str()),
        ("RETOUCHER__BROKER__PREFETCH", "8"),
        // Long enough to outlast the broker restart.
        ("RETOUCHER__BROKER__CONNECT_TIMEOUT_SECS", "120"),
    ];
    let mut procs = vec![
        Proc {
            name: "A",
            worker: world.spawn_worker(&extra),
            last: Counters::default(),
            killed: false,
        },
        Proc {
            name: "B",
            worker: world.spawn_worker(&extra),
            last: Counters::default(),
            killed: false,
        },
    ];
    for p in &mut procs {
        p.worker.try_wait_ready(READY).unwrap();
    }

    // Publish: half the invalid messages, the batch through `retoucher enqueue`, the rest.
    let wall = Instant::now();
    for body in &invalid_bodies[..invalid / 2] {
        world.publish(body).await;
    }
    let enqueue = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .args(["enqueue", "--queue", &world.queue])
            .arg(format!("@{}", jsonl.display()))
            .env("RETOUCHER__BROKER__URL", amqp_url()),
        Duration::from_secs(600),
    );
    let enqueue_log = String::from_utf8_lossy(&enqueue.stderr).to_string();
    assert!(
        enqueue.status.success(),
        "retoucher enqueue failed:\n{enqueue_log}"
    );
    assert!(
        enqueue_log.contains(&format!("published {jobs} jobs")),
        "every job confirmed by the broker:\n{enqueue_log}"
    );
    let enqueue_secs = wall.elapsed().as_secs_f64();
    for body in &invalid_bodies[invalid / 2..] {
        world.publish(body).await;
    }
    eprintln!(
        "load: {published} messages published in {enqueue_secs:.1} s ({jobs} via retoucher enqueue, {invalid} invalid raw)"
    );

    // Run: scrape every 0.5 s, drain dead letters, kill A once, wait for every outcome.
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut killed_inflight = 0;
    let mut killed_mid_commit = false;
    let mut kill_secs = 0.0;
    let mut last_progress = Instant::now();
    let mut last_check = Instant::now();
    let ok_ids: Vec<&String> = expected
        .iter()
        .filter(|(_, k)| k.dead_class().is_none())
        .map(|(id, _)| id)
        .collect();
    let dead_expected = published as usize - ok_ids.len();
    let mut complete: HashSet<String> = HashSet::new();
    let mut restart: Option<RestartSummary> = None;
    let done_wall = loop {
        for p in procs.iter_mut() {
            p.scrape();
            if !p.killed && !p.worker.is_running() {
                panic!(
                    "worker {} died unexpectedly:\n{}",
                    p.name,
                    p.worker.log_text()
                );
            }
        }
        let settled = total(&procs, Counters::settled);
        if procs.len() == 2 && settled as f64 >= kill_at * published as f64 {
            // The kill, once A holds a `commit-` job past its commit marker (bounded wait: the
            // kill happens anyway): a last scrape of A, then SIGKILL at once.
            let a = &mut procs[0];
            let mut tail = LogTail::at_end(&a.worker.log);
            let waited = Instant::now();
            while !killed_mid_commit && waited.elapsed() < commit_wait {
                killed_mid_commit = tail.read_new().lines().any(|l| {
                    l.contains("fault injection: sleeping") && l.contains("after_diagnostics")
                });
                if !killed_mid_commit {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            a.scrape();
            killed_inflight = a.last.inflight;
            a.worker.kill();
            a.killed = true;
            kill_secs = wall.elapsed().as_secs_f64();
            eprintln!(
                "load: SIGKILLed worker A at {kill_secs:.1} s, {settled} messages settled, {killed_inflight} in flight in A{}",
                if killed_mid_commit { ", one of them past its commit marker" } else { "" }
            );
            assert!(
                killed_inflight > 0,
                "A was idle when it was killed: the kill tested nothing (lengthen the jobs)"
            );
            tokio::time::sleep(RESTART_DELAY).await;
            let mut restarted = world.spawn_worker(&extra);
            restarted.try_wait_ready(READY).unwrap();
            eprintln!(
                "load: worker A' ready at {:.1} s",
                wall.elapsed().as_secs_f64()
            );
            procs.push(Proc {
                name: "A'",
                worker: restarted,
                last: Counters::default(),
                killed: false,
            });
            continue;
        }
        if restart.is_none()
            && procs.len() == 3
            && restart_at.is_some_and(|at| settled as f64 >= at * published as f64)
        {
            let at = wall.elapsed().as_secs_f64();
            let queued = pending(&world).await;
            let inflight: u64 = procs
                .iter()
                .filter(|p| !p.killed)
                .map(|p| p.last.inflight)
                .sum();
            let outage = restart_broker(&procs).await;
            // The harness's connection died with the broker.
            world.conn = connect_amqp_retry(CTL).await;
            let reconnect = Instant::now();
            let reconnected = wait_until(CTL, || {
                procs.iter().filter(|p| !p.killed).all(|p| {
                    metric_sum(&p.worker.metrics(), "retoucher_broker_connected", "") == 1.0
                })
            })
            .await;
            assert!(
                reconnected,
                "the workers did not reconnect within {CTL:?} of the broker's return"
            );
            let summary = RestartSummary {
                at,
                settled,
                queued,
                inflight,
                outage: outage.as_secs_f64(),
                reconnected_after: reconnect.elapsed().as_secs_f64(),
            };
            eprintln!("load: {summary}");
            assert!(
                summary.inflight > 0 && summary.queued > 0,
                "the restart found no job in flight or none queued: it tested nothing \
                 (lengthen the jobs): {summary}"
            );
            restart = Some(summary);
            continue;
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            last_progress = Instant::now();
            eprintln!(
                "load: {:.0} s: {settled}/{published} settled ({:.1} msg/s), {} dead letters",
                wall.elapsed().as_secs_f64(),
                settled as f64 / wall.elapsed().as_secs_f64(),
                dead.len()
            );
        }
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            dead.extend(world.drain_dead_letters().await);
            // The expensive check (listing S3) only once the queues look idle.
            let idle = procs.iter().all(|p| p.killed || p.last.inflight == 0)
                && pending(&world).await == 0;
            if idle && procs.len() == 3 && (restart_at.is_none() || restart.is_some()) {
                // A failed listing (S3 busy) is only retried on the next round.
                let keys = try_all_keys(&world.s3, &world.output, "results/")
                    .await
                    .unwrap_or_default();
                complete = keys
                    .iter()
                    .filter_map(|k| k.strip_suffix("/diagnostics.json"))
                    .filter_map(|k| k.strip_prefix("results/"))
                    .map(str::to_string)
                    .collect();
                let missing = ok_ids.iter().filter(|id| !complete.contains(**id)).count();
                let distinct_dead: HashSet<&[u8]> = dead.iter().map(|d| &d.body[..]).collect();
                if missing == 0 && distinct_dead.len() >= dead_expected {
                    break wall.elapsed();
                }
            }
        }
        assert!(
            started_test.elapsed() < timeout,
            "load run not finished after {timeout:?}: {} of {} successes complete, {} of {dead_expected} dead letters\nworker logs: {}",
            complete.len(),
            ok_ids.len(),
            dead.len(),
            procs
                .iter()
                .map(|p| p.worker.log.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "load: every outcome observed at {:.1} s",
        done_wall.as_secs_f64()
    );

    // Quiet: nothing in flight, nothing queued; final scrapes, then the survivors stop cleanly.
    let mut quiet = false;
    let deadline = Instant::now() + CTL;
    while !quiet && Instant::now() < deadline {
        for p in procs.iter_mut() {
            p.scrape();
        }
        quiet =
            procs.iter().all(|p| p.killed || p.last.inflight == 0) && pending(&world).await == 0;
        if !quiet {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(quiet, "the workers did not go idle within {CTL:?}");
    for p in procs.iter_mut().filter(|p| !p.killed) {
        let log = p.worker.log.clone();
        assert!(
            p.worker.terminate(),
            "worker {} did not stop cleanly: see {}",
            p.name,
            log.display()
        );
    }
    dead.extend(world.drain_dead_letters().await);
    for q in retoucher::broker::topology::queue_names(&world.queue).expect("queue names") {
        assert_eq!(world.ready(&q).await, 0, "{q} is empty at the end");
    }
    let events: Vec<Seen> = events.finish(&world).await;

    // ---- Every job accounted for. ----
    let keys: HashSet<String> = all_keys(&world.s3, &world.output, "results/")
        .await
        .into_iter()
        .collect();
    let small_size = (128, 128);
    let checks = futures_util::stream::iter(expected.iter().map(|(id, kind)| {
        let keys = &keys;
        let world = &world;
        async move {
            let has_marker = keys.contains(&format!("results/{id}/diagnostics.json"));
            let result = match kind {
                Kind::Small | Kind::Commit => {
                    Some(check_result_set(world, keys, id, small_size).await)
                }
                Kind::Chelsea => Some(check_result_set(world, keys, id, chelsea_size).await),
                _ => None,
            };
            (id.clone(), *kind, has_marker, result)
        }
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    let mut problems: Vec<String> = Vec::new();
    let mut redelivered_ok = 0;
    for (id, kind, has_marker, result) in &checks {
        match result {
            Some(Ok(diagnostics)) if diagnostics["attempt"].as_u64().unwrap_or(1) >= 2 => {
                redelivered_ok += 1;
            }
            Some(Ok(_)) => {}
            Some(Err(why)) => problems.push(why.clone()),
            None if *has_marker => problems.push(format!("{id} ({kind:?}) has a result set")),
            None => {}
        }
    }
    // Dead letters: by body, each expected failure exactly its class, nothing else.
    let mut name_of: HashMap<Vec<u8>, String> = HashMap::new();
    let mut want_class: HashMap<Vec<u8>, &str> = HashMap::new();
    for (id, kind, body) in &batch {
        name_of.insert(body.clone(), id.clone());
        if let Some(class) = kind.dead_class() {
            want_class.insert(body.clone(), class);
        }
    }
    for (i, body) in invalid_bodies.iter().enumerate() {
        name_of.insert(body.clone(), format!("invalid message #{i}"));
        want_class.insert(body.clone(), "invalid_message");
    }
    let mut dead_count: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut dead_by_class: BTreeMap<String, u64> = BTreeMap::new();
    for letter in &dead {
        let count = dead_count.entry(letter.body.clone()).or_default();
        *count += 1;
        if *count == 1 {
            *dead_by_class.entry(letter.class.clone()).or_default() += 1;
        }
        let name = name_of.get(&letter.body).cloned().unwrap_or_else(|| {
            String::from_utf8_lossy(&letter.body)
                .chars()
                .take(120)
                .collect()
        });
        match want_class.get(&letter.body) {
            Some(class) if *class == letter.class => {}
            Some(class) => problems.push(format!(
                "dead letter {name}: class {:?} ({}; x-death {:?}), expected {class}",
                letter.class, letter.reason, letter.death_reason
            )),
            None => problems.push(format!(
                "unexpected dead letter {name}: class {:?} ({}; x-death {:?})",
                letter.class, letter.reason, letter.death_reason
            )),
        }
    }
    let duplicate_dead: u64 = dead_count
        .values()
        .map(|n| (*n as u64).saturating_sub(1))
        .sum();
    let mut no_dead_letter = 0u64;
    for (body, class) in &want_class {
        if !dead_count.contains_key(body) {
            no_dead_letter += 1;
            problems.push(format!(
                "no dead letter for {} (expected {class})",
                name_of[body]
            ));
        }
    }

    // ---- Events. ----
    let mut succeeded_events: HashMap<&str, u64> = HashMap::new();
    let mut failed_events: HashMap<&str, u64> = HashMap::new();
    let mut retrying_events = 0u64;
    for e in &events {
        match e.status.as_str() {
            "retouched" | "clean" => *succeeded_events.entry(&e.job_id).or_default() += 1,
            "failed" => *failed_events.entry(&e.job_id).or_default() += 1,
            "retrying" => retrying_events += 1,
            _ => {}
        }
    }
    let e_succ: u64 = succeeded_events.values().sum();
    let e_fail: u64 = failed_events.values().sum();
    // Every success has its `job.succeeded` (a duplicate publishes it again, since the first
    // one may have been lost); a second one comes only from a delivery whose ack was lost.
    let ok_without_event = ok_ids
        .iter()
        .filter(|id| !succeeded_events.contains_key(id.as_str()))
        .count() as u64;
    if ok_without_event > 0 {
        problems.push(format!(
            "{ok_without_event} successes without a job.succeeded event"
        ));
    }
    let repeated_events = succeeded_events.values().filter(|n| **n > 1).count() as u64;

    // Events of messages without a readable job id carry `"job_id": "-"`: they cannot be told
    // from other runs' on the shared exchange, so they are counted from the bodies instead.
    let unattributed = invalid_bodies
        .iter()
        .filter(|b| retoucher::job::JobMessage::sniff_job_id(b).is_none())
        .count() as u64;
    let r = reconcile(
        &procs,
        published,
        killed_inflight,
        u64::from(restart.is_some()),
        e_succ,
        e_fail + unattributed,
        dead.len() as u64,
    );

    // ---- Summary. ----
    let secs = done_wall.as_secs_f64();
    let ok = ok_ids.len() as u64;
    let complete_ok = checks
        .iter()
        .filter(|(_, _, _, r)| matches!(r, Some(Ok(_))))
        .count() as u64;
    let distinct_dead = dead_count.len() as u64;
    let mut table = String::new();
    table.push_str(&format!(
        "\n=== load run {tag}: {published} messages, 2 worker processes (A killed and restarted as A'){}, {} CPUs ===\n",
        if restart.is_some() { ", broker restarted" } else { "" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    table.push_str(&format!("{:<44}{:>10}\n", "messages published", published));
    table.push_str(&format!("{:<44}{:>10}\n", "  via retoucher enqueue", jobs));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "  invalid, published raw", invalid
    ));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "succeeded (complete result set in S3)", complete_ok
    ));
    table.push_str(&format!("{:<44}{:>10}\n", "  expected", ok));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "  recomputed on a redelivery (attempt >= 2)", redelivered_ok
    ));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "dead-lettered (distinct messages)", distinct_dead
    ));
    for (class, n) in &dead_by_class {
        table.push_str(&format!("{:<44}{:>10}\n", format!("  {class}"), n));
    }
    table.push_str(&format!("{:<44}{:>10}\n", "  expected", dead_expected));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "unaccounted for (neither)",
        (ok - complete_ok) + no_dead_letter
    ));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "duplicates: result set already complete", r.duplicate
    ));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "duplicates: dead letters", duplicate_dead
    ));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "retried (transient failures)", r.retried
    ));
    table.push_str(&format!(
        "{:<44}{:>10}\n",
        "A in flight at SIGKILL", killed_inflight
    ));
    table.push_str(&format!("{:<44}{:>9.1}s\n", "enqueue time", enqueue_secs));
    table.push_str(&format!("{:<44}{:>9.1}s\n", "SIGKILL at", kill_secs));
    if let Some(restart) = &restart {
        table.push_str(&format!(
            "{:<44}{:>9.1}s\n",
            "broker restarted at", restart.at
        ));
        table.push_str(&format!(
            "{:<44}{:>10}\n",
            "  messages queued at the stop", restart.queued
        ));
        table.push_str(&format!(
            "{:<44}{:>10}\n",
            "  jobs in flight at the stop", restart.inflight
        ));
        table.push_str(&format!(
            "{:<44}{:>9.1}s\n",
            "  broker down (stop_app to started)", restart.outage
        ));
        table.push_str(&format!(
            "{:<44}{:>9.1}s\n",
            "  workers reconnected after", restart.reconnected_after
        ));
    }
    table.push_str(&format!(
        "{:<44}{:>9.1}s\n",
        "wall time (first publish to last outcome)", secs
    ));
    table.push_str(&format!(
        "{:<44}{:>10.1}\n",
        "messages/s",
        published as f64 / secs
    ));
    table.push_str("\n/metrics retoucher_jobs_total by process (A: last scrape before SIGKILL)\n");
    table.push_str(&format!(
        "{:<8}{:>10}{:>10}{:>10}{:>10}  errors by class\n",
        "process", "succeeded", "duplicate", "dead", "retried"
    ));
    for p in &procs {
        table.push_str(&format!(
            "{:<8}{:>10}{:>10}{:>10}{:>10}  {:?}\n",
            p.name, p.last.succeeded, p.last.duplicate, p.last.dead, p.last.retried, p.last.errors
        ));
    }
    table.push_str(&format!(
        "{:<8}{:>10}{:>10}{:>10}{:>10}\n",
        "sum", r.succeeded, r.duplicate, r.dead, r.retried
    ));
    table.push_str(&format!(
        "events: {e_succ} job.succeeded ({repeated_events} jobs twice), {e_fail} job.failed (+ {unattributed} for messages without a job id, not attributable), {retrying_events} job.retrying; {ok_without_event} successes without an event\n"
    ));
    for line in &r.lines {
        table.push_str(&format!("reconcile: {line}\n"));
    }
    eprintln!("{table}");
    if let Ok(path) = std::env::var("LOAD_REPORT") {
        let report = json!({
            "run": tag,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "published": published,
            "enqueued": jobs,
            "invalid": invalid,
            "succeeded": complete_ok,
            "expected_succeeded": ok,
            "redelivered_succeeded": redelivered_ok,
            "dead_distinct": distinct_dead,
            "dead_by_class": dead_by_class,
            "expected_dead": dead_expected,
            "duplicate_results": r.duplicate,
            "duplicate_dead_letters": duplicate_dead,
            "retried": r.retried,
            "killed_inflight": killed_inflight,
            "killed_mid_commit": killed_mid_commit,
            "enqueue_secs": enqueue_secs,
            "kill_at_secs": kill_secs,
            "broker_restart": restart,
            "wall_secs": secs,
            "messages_per_sec": published as f64 / secs,
            "processes": procs.iter().map(|p| json!({"name": p.name, "killed": p.killed, "counters": p.last})).collect::<Vec<_>>(),
            "events": {"succeeded": e_succ, "jobs_with_two_succeeded": repeated_events, "failed": e_fail, "failed_unattributed": unattributed, "retrying": retrying_events, "successes_without_event": ok_without_event},
            "reconcile": r.lines,
            "problems": problems,
        });
        let _ = std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap());
    }

    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        complete_ok, ok,
        "every expected success has a complete result set"
    );
    assert_eq!(
        distinct_dead as usize, dead_expected,
        "every expected failure is dead-lettered"
    );
    assert!(r.ok, "counts do not reconcile:\n{}", r.lines.join("\n"));
    if killed_mid_commit {
        assert!(
            r.duplicate >= 1,
            "the job killed past its commit marker comes back as a duplicate, acked without \
             recomputing ({} duplicates)",
            r.duplicate
        );
    }
    world.cleanup().await;
}

/// What the broker restart met and how long it took.
#[derive(Debug, Clone, serde::Serialize)]
struct RestartSummary {
    /// Seconds from the first publish.
    at: f64,
    settled: u64,
    /// Messages ready in the jobs and delay queues at the stop.
    queued: u32,
    /// Jobs in flight in the workers at the stop (their last scrapes).
    inflight: u64,
    /// Seconds from `stop_app` to the end of `await_startup`.
    outage: f64,
    /// Seconds from then until every worker said it was connected again.
    reconnected_after: f64,
}

impl std::fmt::Display for RestartSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "broker restarted at {:.1} s ({} settled, {} queued, {} in flight), down {:.1} s, \
             workers reconnected {:.1} s later",
            self.at, self.settled, self.queued, self.inflight, self.outage, self.reconnected_after
        )
    }
}

/// Stops the test broker (`rabbitmqctl stop_app`), checks that the workers notice, and starts it
/// again after [`OUTAGE`]; a guard starts it again whatever happens. Returns how long it was down.
async fn restart_broker(procs: &[Proc]) -> Duration {
    let guard = BrokerGuard;
    let stopped = Instant::now();
    rabbitmqctl_test_node(&["stop_app"], CTL).expect("stop the broker");
    let survivors: Vec<&Proc> = procs.iter().filter(|p| !p.killed).collect();
    let noticed = wait_until(OUTAGE.max(Duration::from_secs(30)), || {
        survivors
            .iter()
            .all(|p| metric_sum(&p.worker.metrics(), "retoucher_broker_connected", "") == 0.0)
    })
    .await;
    assert!(
        noticed,
        "the workers did not notice that the broker stopped"
    );
    if let Some(left) = OUTAGE.checked_sub(stopped.elapsed()) {
        tokio::time::sleep(left).await;
    }
    rabbitmqctl_test_node(&["start_app"], CTL).expect("start the broker again");
    rabbitmqctl_test_node(&["await_startup"], CTL).expect("wait for the broker to start");
    drop(guard);
    stopped.elapsed()
}

struct Reconciled {
    succeeded: u64,
    duplicate: u64,
    dead: u64,
    retried: u64,
    lines: Vec<String>,
    ok: bool,
}

/// Reconciles the workers' `retoucher_jobs_total` with what the broker was given and what the
/// events and the dead-letter queue say.
///
/// A worker counts a delivery it settles for good once, right after its ack, as
/// `retouched`/`clean` (after its `job.succeeded` event was confirmed), `duplicate` (the result
/// set was already complete: acked without recomputing, after `job.succeeded` was confirmed
/// again, since the first one may never have gone out) or `dead` (after the dead letter, then
/// `job.failed`, were confirmed). `retried` counts deliveries handed to a delay queue, whose
/// copy comes back as a new delivery, so it is not a settlement. Survivors' counters are exact
/// (scraped after the queues went idle). The killed A is known only up to its last scrape,
/// taken just before the SIGKILL. Of A's settlements:
/// - `X`: counted before that scrape, but the ack never reached the broker, so a survivor
///   settled the message again (counted twice);
/// - `G`: counted after that scrape (missing from the sum).
///
/// Every other message is counted exactly once, so `Σ settled − published = X − G`, and both are
/// at most the deliveries A held unacknowledged at the kill, at most the prefetch (8).
/// And since the event (or dead letter) is confirmed before the count:
/// - `job.succeeded events − (Σ succeeded + Σ duplicate)` = A's confirmed success events not in
///   its last scrape (counted after it, or killed between the event and the count: then the
///   survivor publishes the event a second time), in `0..=8`;
/// - `job.failed events − Σ dead` and `dead letters − Σ dead` likewise (a dead letter confirmed
///   by A whose ack was lost is dead-lettered again: a duplicate dead letter), in `0..=8`.
///
/// A kill that hits an idle A makes all four equalities.
///
/// A broker restart adds the same uncertainty for each surviving worker, at most its prefetch:
/// an ack the broker never processed (counted, then redelivered and counted again, as a
/// duplicate or a second dead letter), an event or dead letter confirmed to the broker whose
/// confirm never reached the worker (not counted; redelivered, then published again and
/// counted). So the bound is the prefetch × (1 + 2 × restarts): A at the kill, and B and A′ at
/// each restart.
fn reconcile(
    procs: &[Proc],
    published: u64,
    killed_inflight: u64,
    restarts: u64,
    e_succ: u64,
    e_fail: u64,
    dead_letters: u64,
) -> Reconciled {
    let succeeded = total(procs, |c| c.succeeded);
    let duplicate = total(procs, |c| c.duplicate);
    let dead = total(procs, |c| c.dead);
    let retried = total(procs, |c| c.retried);
    let settled = succeeded + duplicate + dead;
    let bound = PREFETCH * (1 + 2 * restarts);
    let mut lines = Vec::new();
    let mut ok = true;
    let diff = settled as i64 - published as i64;
    let pass = diff.unsigned_abs() <= bound;
    ok &= pass;
    lines.push(format!(
        "Σ settled (succeeded {succeeded} + duplicate {duplicate} + dead {dead}) = {settled} vs published {published}: \
         difference {diff:+} (= X − G, |·| ≤ {bound}, the prefetch × (1 + 2 × restarts); A held {killed_inflight} at its last scrape) {}",
        if pass { "OK" } else { "FAIL" }
    ));
    let gap = e_succ as i64 - (succeeded + duplicate) as i64;
    let pass = (0..=bound as i64).contains(&gap);
    ok &= pass;
    lines.push(format!(
        "job.succeeded events {e_succ} − (Σ succeeded {succeeded} + Σ duplicate {duplicate}) = {gap} \
         (A's published successes not in its last scrape, 0..={bound}) {}",
        if pass { "OK" } else { "FAIL" }
    ));
    let gap = e_fail as i64 - dead as i64;
    let pass = (0..=bound as i64).contains(&gap);
    ok &= pass;
    lines.push(format!(
        "job.failed events {e_fail} − Σ dead {dead} = {gap} (A's dead letters not in its last scrape, 0..={bound}) {}",
        if pass { "OK" } else { "FAIL" }
    ));
    let gap = dead_letters as i64 - dead as i64;
    let pass = (0..=bound as i64).contains(&gap);
    ok &= pass;
    lines.push(format!(
        "dead letters taken {dead_letters} − Σ dead {dead} = {gap} (the same, and duplicate dead letters, 0..={bound}) {}",
        if pass { "OK" } else { "FAIL" }
    ));
    Reconciled {
        succeeded,
        duplicate,
        dead,
        retried,
        lines,
        ok,
    }
}
