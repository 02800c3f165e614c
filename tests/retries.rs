//! Retries of transient failures through the delay queues of topology v2, against the real
//! RabbitMQ, the real S3 server and worker processes (issue 4, items 1–2):
//! - `retoucher migrate` upgrades a v1 broker to v2 idempotently, a worker refuses a v1
//!   broker naming the command to run, and a delay queue hands its messages back to the jobs
//!   queue, headers intact, after its per-message TTL and never later than its queue TTL;
//! - jobs that meet an S3 outage are retried with growing attempt numbers and complete once S3
//!   is back, with one complete result set;
//! - a job whose failure outlasts `retry.max_attempts` ends in the dead-letter queue.
//!
//! The outage is real: the worker talks to S3 through [`S3Gate`], a TCP proxy in front of the
//! shared S3 server that the test opens and closes (closing cuts live connections and drops new
//! ones). Stopping the S3 server itself would break the other tests that share it.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use retoucher::broker::{self, topology, BrokerError};
use retoucher::error::{ErrorClass, JobError};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(120);

/// A TCP proxy in front of the real S3 server that can be closed (every live connection cut,
/// new ones accepted and dropped at once, as a crashed server's host would) and opened again.
struct S3Gate {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl S3Gate {
    async fn start(target: &str) -> S3Gate {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
        let addr = listener.local_addr().expect("gate address");
        let (open, state) = watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !*state.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut closed = state.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = closed.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        S3Gate { addr, open, task }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for S3Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Collects the events of `job_ids` until `done` says the collection is complete.
async fn events_until(
    events: &mut Events,
    job_ids: &[String],
    seen: &mut Vec<Value>,
    timeout: Duration,
    done: impl Fn(&[Value]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(seen) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for events; got {seen:#?}"
        );
        for event in events.collect_for(Duration::from_millis(200)).await {
            if job_ids.iter().any(|id| event["job_id"] == id.as_str()) {
                seen.push(event);
            }
        }
    }
}

fn of_job<'a>(seen: &'a [Value], id: &str, status: &str) -> Vec<&'a Value> {
    seen.iter()
        .filter(|e| e["job_id"] == id && e["status"] == status)
        .collect()
}

/// Waits until every listed queue is empty (quorum commits and dead-lettering are
/// asynchronous) and says which are not.
async fn assert_empty(world: &World, queues: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut full = Vec::new();
        for q in queues {
            let n = world.ready(q).await;
            if n > 0 {
                full.push(format!("{q}: {n}"));
            }
        }
        if full.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "queues not empty: {full:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every queue of the world's topology.
fn all_queues(world: &World) -> Vec<String> {
    topology::queue_names(&world.queue).expect("queue names")
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_v1_to_v2_and_a_worker_refuses_a_v1_broker() {
    let world = World::new().await;
    let queue = format!("{}.jobs", unique("retoucher-test-v1"));
    let conn = &world.conn;

    // A broker left at v1 by an older binary.
    let report = topology::migrate_to(conn, &queue, 1)
        .await
        .expect("migrate to v1");
    assert_eq!((report.from, report.to), (0, 1), "{report}");
    assert_eq!(report.applied, [(1, "0001_initial".to_owned())]);
    assert_eq!(topology::current_version(conn, &queue).await.unwrap(), 1);
    let error = broker::verify(conn, &queue)
        .await
        .expect_err("v1 is too old");
    assert!(
        matches!(
            error,
            BrokerError::TopologyBehind {
                current: 1,
                needed: 2,
                ..
            }
        ),
        "{error}"
    );

    // The worker refuses to start on it, and says what to run.
    let port = free_port();
    let log = std::env::temp_dir().join(format!("{queue}-{port}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_retoucher"))
        .arg("worker")
        .envs(world.worker_env(port))
        .env("RETOUCHER__BROKER__QUEUE", &queue)
        .env("RUST_LOG", "info,lapin=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start worker");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!(
                "the worker kept running against a v1 broker:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("is at version 1, this worker needs 2: run `retoucher migrate`"),
        "{stderr}"
    );

    // `retoucher migrate` upgrades it, and a second run changes nothing.
    let migrate = || {
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_retoucher"))
                .args(["migrate", "--queue", &queue])
                .env("RETOUCHER__BROKER__URL", amqp_url()),
            CLI_LIMIT,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = migrate();
    assert!(
        first.contains("migrated from version 1 to 2 (0002_retry_delays)"),
        "{first}"
    );
    let second = migrate();
    assert!(second.contains("is up to date (version 2)"), "{second}");
    assert_eq!(broker::verify(conn, &queue).await.expect("verify"), 2);
    let report = broker::migrate(conn, &queue).await.expect("migrate again");
    assert!(
        report.applied.is_empty() && report.repaired.is_empty(),
        "{report}"
    );

    // A delay queue returns a message to the jobs queue after its per-message TTL, body and
    // headers intact and its expiration gone (or it would expire again in the jobs queue).
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert(broker::ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(2));
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let publish = |expiration: &'static str, body: &'static [u8]| {
        let channel = channel.clone();
        let headers = headers.clone();
        let queue = queue.clone();
        async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    broker::delay_queue(&queue, 1).as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_expiration(expiration.into())
                        .with_headers(headers),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(
                matches!(confirm, lapin::Confirmation::Ack(None)),
                "{confirm:?}"
            );
        }
    };
    let get = |from: Instant| {
        let channel = channel.clone();
        let queue = queue.clone();
        async move {
            loop {
                if let Some(msg) = channel
                    .basic_get(queue.as_str().into(), BasicGetOptions::default())
                    .await
                    .expect("basic.get")
                {
                    msg.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                    return (msg.delivery, from.elapsed());
                }
                assert!(
                    from.elapsed() < Duration::from_secs(15),
                    "nothing came back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let sent = Instant::now();
    publish("300", b"short").await;
    let (back, waited) = get(sent).await;
    assert_eq!(back.data, b"short");
    assert!(
        waited >= Duration::from_millis(250),
        "came back after {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "the per-message TTL (300 ms) was not honoured: {waited:?}"
    );
    assert_eq!(
        header(&back.properties, broker::ATTEMPT_HEADER),
        Some(&AMQPValue::LongLongInt(2))
    );
    assert_eq!(
        header(&back.properties, "tenant"),
        Some(&AMQPValue::LongString(LongString::from("acme")))
    );
    assert_eq!(*back.properties.expiration(), None);
    assert_eq!(broker::attempt_of(&back.properties), 2);
    // The queue TTL (1 s for step 1) caps a longer per-message TTL.
    let sent = Instant::now();
    publish("60000", b"capped").await;
    let (back, waited) = get(sent).await;
    assert_eq!(back.data, b"capped");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "the queue TTL (1 s) did not cap the message's: {waited:?}"
    );
    let _ = channel.close(0, "done".into()).await;

    delete_topology(conn, &queue).await;
    world.cleanup().await;
}

/// The example input uploaded, and a worker that reaches S3 only through a gate (open), with
/// one request per S3 call and the given retry ladder, so the worker's retries, not the SDK's,
/// are under test and a run takes seconds.
async fn worker_behind_a_gate(
    world: &World,
    delays_ms: &str,
    max_attempts: &str,
) -> (S3Gate, Events, Worker) {
    world
        .put(&world.input, "cat.png", example("chelsea-blemished.png"))
        .await;
    let gate = S3Gate::start(&world.endpoint).await;
    let events = world.events().await;
    let endpoint = gate.endpoint();
    let worker = world.start_worker(&[
        ("RETOUCHER__S3__ENDPOINT", &endpoint),
        ("RETOUCHER__S3__MAX_ATTEMPTS", "1"),
        ("RETOUCHER__RETRY__DELAYS_MS", delays_ms),
        ("RETOUCHER__RETRY__MAX_ATTEMPTS", max_attempts),
    ]);
    (gate, events, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_retried_through_an_s3_outage_and_complete() {
    let world = World::new().await;
    let (gate, mut events, worker) = worker_behind_a_gate(&world, "300,600,1200", "10").await;

    // S3 goes away; jobs arrive meanwhile.
    gate.set_open(false);
    let ids: Vec<String> = (0..3).map(|i| unique(&format!("outage-{i}"))).collect();
    for id in &ids {
        world
            .publish(
                json!({
                    "job_id": id,
                    "image": format!("s3://{}/cat.png", world.input),
                    "prompt": "a cat",
                    "metadata": {"tenant": "acme"}
                })
                .to_string()
                .as_bytes(),
            )
            .await;
    }
    // Every job fails and is retried at least twice before S3 comes back.
    let mut seen = Vec::new();
    events_until(&mut events, &ids, &mut seen, WAIT, |seen| {
        ids.iter().all(|id| of_job(seen, id, "retrying").len() >= 2)
    })
    .await;
    gate.set_open(true);
    events_until(&mut events, &ids, &mut seen, WAIT, |seen| {
        ids.iter()
            .all(|id| !of_job(seen, id, "retouched").is_empty())
    })
    .await;
    // Late duplicates would show up here.
    for event in events.collect_for(Duration::from_secs(2)).await {
        if ids.iter().any(|id| event["job_id"] == id.as_str()) {
            seen.push(event);
        }
    }

    for id in &ids {
        let retrying = of_job(&seen, id, "retrying");
        let attempts: Vec<u64> = retrying
            .iter()
            .map(|e| e["attempt"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=attempts.len() as u64).collect();
        assert_eq!(attempts, expected, "retry attempts of {id}");
        for event in &retrying {
            assert_eq!(event["error"]["class"], "storage_unavailable", "{event}");
            assert_eq!(event["metadata"]["tenant"], "acme", "{event}");
        }
        let done = of_job(&seen, id, "retouched");
        assert_eq!(done.len(), 1, "{id} completed once: {done:?}");
        let attempt = done[0]["attempt"].as_u64().unwrap();
        assert_eq!(
            attempt,
            attempts.len() as u64 + 1,
            "{id}: succeeded on the attempt after the last retry"
        );
        assert!(of_job(&seen, id, "failed").is_empty());

        // One complete result set that records the attempt.
        let prefix = format!("results/{id}/");
        let keys = world.keys(&world.output, &prefix).await;
        for name in ["retouched.png", "diagnostics.json", "saliency-0.png"] {
            assert!(
                keys.contains(&format!("{prefix}{name}")),
                "{name} missing: {keys:?}"
            );
        }
        let diagnostics: Value = serde_json::from_slice(
            &world
                .get(&world.output, &format!("{prefix}diagnostics.json"))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(diagnostics["attempt"], attempt, "{id}");
        assert_eq!(diagnostics["status"], "retouched");
    }

    // Nothing left anywhere: jobs, delay and dead-letter queues.
    assert_empty(&world, &all_queues(&world)).await;
    let metrics = worker.metrics();
    let retries: usize = ids
        .iter()
        .map(|id| of_job(&seen, id, "retrying").len())
        .sum();
    assert_eq!(
        metric_sum(&metrics, "retoucher_jobs_total", "outcome=\"retried\""),
        retries as f64,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "retoucher_jobs_total", "outcome=\"retouched\""),
        ids.len() as f64
    );
    assert_eq!(
        metric_sum(&metrics, "retoucher_jobs_total", "outcome=\"dead\""),
        0.0
    );
    drop(worker);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_past_max_attempts_is_dead_lettered() {
    let world = World::new().await;
    let (gate, mut events, worker) = worker_behind_a_gate(&world, "100,200", "3").await;
    // S3 stays away for good.
    gate.set_open(false);
    let id = unique("doomed");
    let body = json!({
        "job_id": id,
        "image": format!("s3://{}/cat.png", world.input),
        "prompt": "a cat"
    })
    .to_string()
    .into_bytes();
    world.publish(&body).await;

    let ids = [id.clone()];
    let mut seen = Vec::new();
    events_until(&mut events, &ids, &mut seen, WAIT, |seen| {
        !of_job(seen, &id, "failed").is_empty()
    })
    .await;
    let retrying: Vec<u64> = of_job(&seen, &id, "retrying")
        .iter()
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(retrying, [1, 2], "{seen:#?}");
    let failed = of_job(&seen, &id, "failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["attempt"], 3);
    assert_eq!(failed[0]["error"]["class"], "storage_unavailable");
    let message = failed[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("gave up after 3 attempts: "),
        "{message}"
    );

    // The dead letter: the original body, the class and the reason.
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead.extend(world.drain_dead().await);
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (dead_body, class, reason) = &dead[0];
    assert_eq!(dead_body, &body, "the body is untouched");
    assert_eq!(class, "storage_unavailable");
    assert!(reason.starts_with("gave up after 3 attempts: "), "{reason}");
    assert!(reason.contains("S3"), "{reason}");

    assert_empty(&world, &all_queues(&world)).await;
    let metrics = worker.metrics();
    assert_eq!(
        metric_sum(&metrics, "retoucher_jobs_total", "outcome=\"retried\""),
        2.0
    );
    assert_eq!(
        metric_sum(&metrics, "retoucher_jobs_total", "outcome=\"dead\""),
        1.0
    );
    drop(worker);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_retry_comes_back_untouched_with_its_attempt_and_reason() {
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("RabbitMQ on RETOUCHER_TEST_AMQP_URL");
    let queue = format!("{}.jobs", unique("retoucher-test-retry"));
    broker::migrate(&conn, &queue).await.expect("migrate");
    let publisher = broker::Publisher::new(&conn).await.expect("publisher");

    let body: Vec<u8> = (0..=255u8).chain(*b"{\"job_id\":\"x\"}").collect();
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    // What the jobs queue adds to a redelivery: it must not travel with the retry.
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(1));
    let original = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    let sent = Instant::now();
    publisher
        .retry(
            &broker::delay_queue(&queue, 2),
            &body,
            &original,
            3,
            &JobError::new(
                ErrorClass::StorageUnavailable,
                "S3 request failed:\nconnection refused",
            ),
            Duration::from_millis(200),
        )
        .await
        .expect("retry published and confirmed");
    assert!(
        publisher
            .retry(
                &broker::delay_queue(&queue, 99),
                &body,
                &original,
                3,
                &JobError::new(ErrorClass::StorageUnavailable, "x"),
                Duration::from_millis(200),
            )
            .await
            .is_err(),
        "a retry to a missing delay queue is an error, not a silent drop"
    );

    let channel = conn.create_channel().await.expect("channel");
    let back = loop {
        if let Some(msg) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            msg.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            break msg.delivery;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "nothing came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_millis(4000),
        "{waited:?}"
    );
    assert_eq!(back.data, body, "the body is untouched");
    assert_eq!(broker::attempt_of(&back.properties), 3);
    let text = |name: &str| match header(&back.properties, name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(text("tenant"), "acme");
    assert_eq!(text(broker::ERROR_CLASS_HEADER), "storage_unavailable");
    assert_eq!(
        text(broker::ERROR_HEADER),
        "S3 request failed: connection refused"
    );
    assert_eq!(
        back.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("m-1")
    );
    assert_eq!(*back.properties.timestamp(), Some(1_700_000_000));
    assert_eq!(*back.properties.delivery_mode(), Some(2));
    assert_eq!(*back.properties.expiration(), None);
    let _ = channel.close(0, "done".into()).await;
    delete_topology(&conn, &queue).await;
}
